"""From an accelerate loop: the same Run and Predictor under accelerate.Accelerator.

    python -m examples.accelerate_loop --writer localhost:50051 --token "$TOKEN"
    accelerate launch --num_processes 2 -m examples.accelerate_loop ...   (CPU: gloo)

Only the main process owns the run (active=accelerator.is_main_process: the other ranks'
calls are no-ops); every rank takes part in the predictions pass (each generates its share of
the sample, rank 0 gets all results).
"""

import argparse

import torch
from accelerate import Accelerator

from examples.batches import loader, toy_setup
from trainer_client import PredictionsConfig, Predictor, Run


def train(model, tokenizer, train_rows: list[dict], eval_rows: list[dict], *, writer: str,
          token: str | None, config: PredictionsConfig, epochs: int = 2, batch_size: int = 8,
          learning_rate: float = 5e-3, run_name: str = "accelerate-loop") -> tuple[Run, dict]:
    """Trains and logs; returns the run (finished on the main process) and the mean loss
    across processes logged at each step."""
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model, optimizer, batches = accelerator.prepare(
        model, optimizer, loader(tokenizer, train_rows, batch_size))
    predictor = Predictor(eval_rows, tokenizer, config)
    losses, step = {}, 0
    with Run(run_name, model_name="toy-llama", dataset_name="toy-reverse", config=config,
             writer=writer, token=token, active=accelerator.is_main_process) as run:
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in batches:
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                losses[step] = accelerator.gather(loss.detach()).mean().item()
                run.log_metrics(step, {"loss": losses[step]}, epoch=step / len(batches))
            results = predictor.predict(accelerator.unwrap_model(model), step=step)
            if results is not None:
                run.log_predictions(epoch, step, results)
        accelerator.wait_for_everyone()
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
    if run.report is not None:
        print(f"run {run.run_id}: {run.report.describe()}")


if __name__ == "__main__":
    main()
