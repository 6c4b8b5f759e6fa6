"""From any training loop: a plain PyTorch loop with trainer_client.Run and Predictor.

    python -m examples.plain_loop --writer localhost:50051 --token "$TOKEN"

Every optimizer step logs its loss and learning rate; every epoch ends with a predictions
pass over the fixed sample, logged with the pass's exact-match rate. The with-block
finishes the run (FAILED if training raises).
"""

import argparse

import torch

from examples.batches import loader, toy_setup
from trainer_client import PredictionsConfig, Predictor, Run


def train(model, tokenizer, train_rows: list[dict], eval_rows: list[dict], *, writer: str,
          token: str | None, config: PredictionsConfig, epochs: int = 2, batch_size: int = 8,
          learning_rate: float = 5e-3, run_name: str = "plain-loop") -> tuple[Run, dict]:
    """Trains and logs; returns the finished run and the losses logged, by step."""
    predictor = Predictor(eval_rows, tokenizer, config)
    batches = loader(tokenizer, train_rows, batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    losses, step = {}, 0
    with Run(run_name, model_name="toy-llama", dataset_name="toy-reverse", config=config,
             writer=writer, token=token, run_config={"learning_rate": learning_rate}) as run:
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                losses[step] = loss.item()
                run.log_metrics(step, {"loss": losses[step], "learning_rate": learning_rate},
                                epoch=step / len(batches))
            results = predictor.predict(model, step=step)
            run.log_predictions(epoch, step, results)
            rate = predictor.exact_match_rate(results)
            if rate is not None:
                run.log_metrics(step, {"exact_match": rate}, epoch=float(epoch))
    return run, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writer", default="localhost:50051")
    parser.add_argument("--token", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer, train_rows, eval_rows = toy_setup()
    run, _ = train(model, tokenizer, train_rows, eval_rows, writer=args.writer,
                   token=args.token, config=PredictionsConfig(max_new_tokens=8),
                   epochs=args.epochs)
    print(f"run {run.run_id}: {run.report.describe()}")


if __name__ == "__main__":
    main()
