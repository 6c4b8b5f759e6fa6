"""Trainer overhead benchmark: what the PredictionsCallback costs a training loop,
generation excluded.

The same tiny model (trainer_client.toy, built from a config, seeded) is trained
by a real transformers.Trainer for --steps steps, alternately without the
callback and with it (frequency "steps", every --step-interval steps, streaming
to a real writer service on a throwaway PostgreSQL database), --repeats times
each. For each run with the callback:

    callback cost = wall(with) - generation time - wall(without, median)

where generation time is the callback's own timer around batched generation.
What remains is the callback's own cost: the hooks, serialization, the upload
thread (it shares the GIL and the CPUs with training) and the network. Also
printed: the trainer-thread time spent in submit() (the hand-off to the upload
thread), the spread of the runs without the callback (the resolution of this
measurement) and that the writer stored every prediction.

Target: callback cost under 2% of the training wall time.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/trainer_overhead.py
"""

import argparse
import asyncio
import statistics
import tempfile
import time

import torch
from _stack import add_stack_args, bench_stack
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from trainer_client import PredictionsCallback, PredictionsConfig
from trainer_client.toy import ToyTask, build_model, build_tokenizer, model_config, train_features


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--steps", type=int, default=400, help="training steps per run (default %(default)s)")
    add("--step-interval", type=int, default=10,
        help="steps between prediction passes (default %(default)s)")
    add("--samples", type=int, default=16, help="predicted samples (default %(default)s)")
    add("--max-new-tokens", type=int, default=8, help="default %(default)s")
    add("--batch-size", type=int, default=32, help="training batch (default %(default)s)")
    add("--hidden", type=int, default=64, help="model width (default %(default)s)")
    add("--layers", type=int, default=2, help="model depth (default %(default)s)")
    add("--train-rows", type=int, default=4000, help="training rows (default %(default)s)")
    add("--repeats", type=int, default=3, help="runs of each kind (default %(default)s)")
    add("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    add("--seed", type=int, default=0, help="default %(default)s")
    add_stack_args(p)
    return p.parse_args()


def build(args: argparse.Namespace):
    task = ToyTask("reverse", "abcdefgh", 3, 6)
    train, evaluation = task.split(args.train_rows, args.samples * 2, args.seed)
    tokenizer = build_tokenizer(r["prompt"] + r["completion"] for r in train)
    config = model_config(tokenizer, hidden_size=args.hidden, layers=args.layers)
    return tokenizer, config, train_features(tokenizer, train), evaluation


def train_once(args, parts, callbacks: list, out_dir: str) -> float:
    tokenizer, config, features, _ = parts
    training = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3, save_strategy="no", report_to=[], logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
    trainer = Trainer(model=build_model(config, seed=args.seed), args=training,
                      train_dataset=features, data_collator=DataCollatorForSeq2Seq(tokenizer),
                      processing_class=tokenizer, callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def callback_for(args, parts, stack, spool_dir: str) -> PredictionsCallback:
    tokenizer, _, _, evaluation = parts
    config = PredictionsConfig(
        _env_file=None, sample_count=args.samples, frequency="steps",
        step_interval=args.step_interval, max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.samples, spool_dir=spool_dir, measure_speed=False,
        seed=args.seed)
    token = stack.metadata()[0][1].removeprefix("Bearer ")
    return PredictionsCallback(config, dataset=evaluation, tokenizer=tokenizer,
                               writer=stack.services["writer"].address, token=token,
                               run_name="overhead-bench", model_name="toy")


async def stored_rows(stack) -> int:
    import asyncpg
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM writer.predictions")
    finally:
        await conn.close()


def measure(args, parts, stack) -> tuple[list[float], list[tuple[float, float, float]]]:
    plain, with_cb = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            plain.append(train_once(args, parts, [], f"{tmp}/plain{repeat}"))
            callback = callback_for(args, parts, stack, f"{tmp}/spool{repeat}")
            wall = train_once(args, parts, [callback], f"{tmp}/cb{repeat}")
            with_cb.append((wall, callback.generation_s, callback.submit_s))
            report = callback.last_report
            assert report is not None and report.complete, report
    return plain, with_cb


def report(args, plain, with_cb, stored: int) -> None:
    base = statistics.median(plain)
    print(f"{args.steps} steps, batch {args.batch_size}, model {args.layers}x{args.hidden}, "
          f"{args.samples} samples x {args.max_new_tokens} new tokens every "
          f"{args.step_interval} steps, torch threads {torch.get_num_threads()}")
    print(f"without callback: {', '.join(f'{w:.2f}' for w in plain)} s (median {base:.2f}, "
          f"spread {100 * (max(plain) - min(plain)) / base:.1f}%)")
    print(f"{'run':>4} {'wall s':>8} {'generation s':>13} {'submit ms':>10} "
          f"{'callback cost s':>16} {'% of training':>14}")
    costs = []
    for i, (wall, generation, submit) in enumerate(with_cb):
        cost = wall - generation - base
        costs.append(100 * cost / base)
        print(f"{i:>4} {wall:>8.2f} {generation:>13.2f} {1000 * submit:>10.1f} "
              f"{cost:>16.3f} {costs[-1]:>13.2f}%")
    median = statistics.median(costs)
    print(f"callback cost, median: {median:.2f}% of training wall time "
          f"(target < 2%: {'PASS' if median < 2 else 'FAIL'}); predictions stored: {stored} "
          f"(expected {args.repeats * args.samples * (args.steps // args.step_interval)})")


async def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    parts = build(args)
    async with bench_stack(args, ["writer"]) as stack:
        plain, with_cb = await asyncio.to_thread(measure, args, parts, stack)
        report(args, plain, with_cb, await stored_rows(stack))


if __name__ == "__main__":
    asyncio.run(main())
