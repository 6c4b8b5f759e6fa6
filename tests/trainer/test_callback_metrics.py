"""PredictionsCallback on the Run API: the trainer's logged scalars become metrics, and each
pass's headline numbers reach the trainer's log_history (through trainer.log when the
callback is attached, so report_to integrations see them)."""

import numbers
import sqlite3
import uuid

import pytest
from transformers import IntervalStrategy, TrainerCallback

from tests.trainer.test_callback_training import predictions_config
from tests.trainer.tiny import build_model, make_trainer, reversal_rows, train_features
from trainer_client import PredictionsCallback

SAMPLES = 4
EPOCHS = 2
STEPS = 8  # 32 rows, batches of 8, 2 epochs
HEADLINE = ("epochlens/exact_match", "epochlens/failed_samples", "epochlens/pass_seconds",
            "epochlens/predictions")


class SeenLogs(TrainerCallback):
    """What an integration placed before the callback (like report_to's) receives."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs or {}))


def stored_metrics(writer, run_id: str) -> list[tuple[int, str, float]]:
    with sqlite3.connect(writer.data_dir / "writer.db") as db:
        rows = db.execute("SELECT run_id, step, name, value FROM metrics").fetchall()
    return sorted(r[1:] for r in rows if uuid.UUID(str(r[0])) == uuid.UUID(run_id))


def expected_metrics(log_history: list[dict]) -> list[tuple[int, str, float]]:
    """Every numeric scalar of the log history but its position (epoch, step)."""
    return sorted((entry["step"], name, float(value)) for entry in log_history
                  for name, value in entry.items()
                  if name not in ("epoch", "step") and isinstance(value, numbers.Real))


@pytest.mark.parametrize("attached", [False, True], ids=["callbacks-list", "attached"])
def test_logged_scalars_and_pass_numbers_are_metrics(tmp_path, tokenizer, writer, token,
                                                     attached):
    callback = PredictionsCallback(predictions_config(tmp_path), dataset=reversal_rows(20, 7),
                                   tokenizer=tokenizer, writer=writer.address, token=token,
                                   run_name=f"metrics-{attached}")
    seen = SeenLogs()
    trainer = make_trainer(build_model(tokenizer), tokenizer,
                           train_features(tokenizer, reversal_rows(32)), tmp_path / "out",
                           [seen] if attached else [seen, callback], epochs=EPOCHS)
    trainer.args.logging_strategy, trainer.args.logging_steps = IntervalStrategy.STEPS, 1
    if attached:
        callback.attach(trainer)
    trainer.train()

    history = trainer.state.log_history
    passes = [entry for entry in history if "epochlens/predictions" in entry]
    assert [(e["step"], e["epochlens/predictions"]) for e in passes] == [(4, 4.0), (8, 4.0)]
    assert all(set(HEADLINE) <= set(e) for e in passes)
    assert [e["loss"] for e in history if "loss" in e] and len(
        [e for e in history if "loss" in e]) == STEPS
    stored = stored_metrics(writer, callback.last_report.run_id)
    # transformers' PrinterCallback (added after the callbacks given to the Trainer, before
    # one added by attach) pops total_flos from the logs it prints: attached, it is not seen.
    dropped = {"total_flos"} if attached else set()
    assert stored == [m for m in expected_metrics(history) if m[1] not in dropped]
    assert {name for _, name, _ in stored} >= {"loss", "learning_rate", "grad_norm",
                                               "train_loss", *HEADLINE}
    assert callback.last_report.metrics_inserted == len(stored)
    headline_seen = sum(1 for keys in seen.keys if "epochlens/exact_match" in keys)
    assert headline_seen == (EPOCHS if attached else 0)
