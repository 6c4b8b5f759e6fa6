"""What both example loops share: a toy task, a tiny model from a config, and padded batches
of its training rows. Nothing is downloaded."""

import torch

from trainer_client import toy

IGNORE_INDEX = -100


def toy_setup(train_size: int = 32, eval_size: int = 8, seed: int = 0) -> tuple:
    """(model, tokenizer, training rows, evaluation rows) of the reversal task."""
    task = toy.ToyTask("reverse", "abcdef", 3, 5)
    train_rows, eval_rows = task.split(train_size, eval_size, seed)
    tokenizer = toy.build_tokenizer(row["prompt"] + row["completion"]
                                    for row in train_rows + eval_rows)
    model = toy.build_model(toy.model_config(tokenizer), seed)
    return model, tokenizer, train_rows, eval_rows


def collate(pad_id: int):
    """A DataLoader collate_fn: right-padded input_ids, attention_mask and labels."""
    def pad(features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for feature in features:
            gap = width - len(feature["input_ids"])
            out["input_ids"].append(feature["input_ids"] + [pad_id] * gap)
            out["attention_mask"].append(feature["attention_mask"] + [0] * gap)
            out["labels"].append(feature["labels"] + [IGNORE_INDEX] * gap)
        return {name: torch.tensor(rows) for name, rows in out.items()}
    return pad


def loader(tokenizer, rows: list[dict], batch_size: int) -> torch.utils.data.DataLoader:
    """Batches of the rows' features in a fixed order."""
    features = toy.train_features(tokenizer, rows)
    return torch.utils.data.DataLoader(features, batch_size=batch_size, shuffle=False,
                                       collate_fn=collate(tokenizer.pad_token_id))
