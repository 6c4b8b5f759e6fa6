"""Distributed predictions pass: the same sample on 1 rank vs 2 ranks (CPU, gloo).

A pass is what the callback does at an epoch end: every rank generates its shard
of the sample (trainer_client.distributed.shard, round robin) with the
Generator, and rank 0 gathers the results (gather_lists). This script starts
itself under torchrun once with 1 process and once with 2 (each process gets
--threads torch threads, so 2 ranks use twice the cores), and on 2 ranks also
with the model sharded by FSDP2 ``fully_shard`` (the parameters are gathered
once per pass). Each run does a warm-up pass, then --passes timed passes; it
prints, side by side, the median wall seconds of a pass (on rank 0, barrier to
gather) and each rank's share: samples, and the wall and CPU seconds spent
generating them (CPU seconds show the work a rank did even when the cores are
shared with other processes and the wall time is not).

The model is built from a config (trainer_client.toy: a Llama of --hidden x
--layers, random weights, EOS suppressed so every prompt decodes exactly
--max-new-tokens), so nothing is downloaded.

Run from the repository root:
    . .venv/bin/activate && python bench/distributed_pass.py
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer_client import distributed
from trainer_client.config import PredictionsConfig
from trainer_client.generator import Generator
from trainer_client.sampler import Sampler
from trainer_client.toy import ToyTask, build_model, build_tokenizer, model_config

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="sample size (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=8,
                   help="generation_batch_size (default %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="model depth (default %(default)s)")
    p.add_argument("--passes", type=int, default=3, help="timed passes (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank (default %(default)s)")
    p.add_argument("--worker", choices=["replicated", "fsdp"], default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _build(args: argparse.Namespace):
    task = ToyTask("reverse", "abcdefgh", 4, 8)
    rows, _ = task.split(args.prompts * 2, 0, 0)
    tokenizer = build_tokenizer(r["prompt"] + r["completion"] for r in rows)
    config = model_config(tokenizer, hidden_size=args.hidden, layers=args.layers,
                          heads=8, max_positions=256)
    model = build_model(config, seed=0)
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    predictions = PredictionsConfig(_env_file=None, sample_count=args.prompts,
                                    max_sample_count=args.prompts,
                                    generation_batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens)
    return model, Generator(predictions, tokenizer), Sampler(rows, predictions, tokenizer).samples


def _one_pass(model, generator: Generator, samples) -> tuple[float, float, int, float]:
    """(pass wall seconds on this rank, seconds generating, samples generated, CPU seconds
    generating: the work itself, which contention for the cores does not inflate)."""
    dist.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    results = generator.generate(model, distributed.shard(samples), None)
    generated, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    gathered = distributed.gather_lists(results)
    failed = [r for r in (gathered or []) if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} samples failed: {failed[0].error}")
    return time.perf_counter() - started, generated, len(results), cpu


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    model, generator, samples = _build(args)
    if args.worker == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    _one_pass(model, generator, samples)  # warm-up
    timed = [_one_pass(model, generator, samples) for _ in range(args.passes)]
    mine = {"generate_s": statistics.median(t[1] for t in timed), "samples": timed[0][2],
            "cpu_s": statistics.median(t[3] for t in timed)}
    shares = distributed.gather_lists([mine])
    if distributed.rank() == 0:
        report = {"wall_s": statistics.median(t[0] for t in timed), "shares": shares}
        args.out.write_text(json.dumps(report))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: argparse.Namespace, ranks: int, mode: str, out: Path) -> dict:
    """Runs this script's worker under torchrun; returns rank 0's report."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), "--worker", mode, "--out", str(out),
               "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", str(args.batch_size), "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--passes", str(args.passes),
               "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun {ranks} x {mode} exited {done.returncode}:\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    print(f"CPU, gloo, {os.cpu_count()} cores visible, {args.threads} torch thread(s) per "
          f"rank; {args.prompts} prompts x {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, Llama {args.layers}x{args.hidden}; median of {args.passes} passes")
    print(f"{'setup':<22} {'pass wall s':>11} {'speed-up':>9}   "
          "per rank: samples, generate wall s / CPU s")
    with tempfile.TemporaryDirectory() as folder:
        base = None
        for ranks, mode in ((1, "replicated"), (2, "replicated"), (2, "fsdp")):
            report = launch(args, ranks, mode, Path(folder) / f"{ranks}-{mode}.json")
            base = base or report["wall_s"]
            shares = ", ".join(f"r{i}: {s['samples']}, {s['generate_s']:.2f}/{s['cpu_s']:.2f}s"
                               for i, s in enumerate(report["shares"]))
            label = f"{ranks} rank{'s' if ranks > 1 else ''} {mode}"
            print(f"{label:<22} {report['wall_s']:>11.2f} {base / report['wall_s']:>8.2f}x   "
                  f"{shares}")


if __name__ == "__main__":
    main()
