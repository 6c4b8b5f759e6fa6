"""Export benchmark: `epochlens export` of a large run, through the real query service.

Seeds a throwaway PostgreSQL database (real schema, RLS and roles) by asyncpg
COPY with two runs of the same shape but different sizes: a large one of
--epochs x --samples predictions (1,000,000 at the defaults) and a small one of
--small-epochs x --samples (100,000), builds the per-epoch summary the writer
would have kept, and VACUUM ANALYZEs. Then, for each run, starts
`epochlens export RUN --format jsonl -o FILE` (--format) as a subprocess (the installed
console script, configured only by its environment: the query address, a
bearer token, and the export page size and prefetch depth given here), and
prints its wall time, predictions per second (wall time includes the
interpreter's start), and peak RSS: the process's VmHWM from /proc, read
every --rss-sample-s until it exits (wait4's ru_maxrss is not used: Linux
carries the parent's high-water mark over fork and exec, so it would report
this benchmark's own size), with the current RSS sampled alongside to show
that it stays flat. The output file is checked to hold exactly one line per
prediction and deleted.

Targets: >= --target-rate (20,000) predictions/s on the large run, and
constant memory: the large run's peak RSS within --rss-slack-mib of the small
run's. The verdicts are printed; the exit status is not tied to them.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/export.py
"""

import argparse
import asyncio
import copy
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from _stack import REPO_ROOT, add_stack_args, bench_stack, peak_rss_mib
from query import (
    EPOCH_SUMMARY_SQL,
    RUN_COLUMNS,
    copy_runs_predictions,
    run_records,
    text_pool,
)

from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.writer.models import SCHEMA

EXPORT_COMMAND = Path(sys.executable).parent / "epochlens"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--epochs", type=int, default=50, help="epochs of the large run (default %(default)s)")
    add("--small-epochs", type=int, default=5,
        help="epochs of the small run (default %(default)s)")
    add("--samples", type=int, default=20000, help="samples per epoch (default %(default)s)")
    add("--step-stride", type=int, default=10, help="step = epoch * stride (default %(default)s)")
    add("--prompt-chars", type=int, default=100, help="prompt length (default %(default)s)")
    add("--truth-chars", type=int, default=100, help="ground truth length (default %(default)s)")
    add("--prediction-chars", type=int, default=200,
        help="prediction length (default %(default)s)")
    add("--text-pool", type=int, default=4096,
        help="distinct random texts per field (default %(default)s)")
    add("--seed", type=int, default=1, help="random seed (default %(default)s)")
    add("--format", choices=("jsonl", "csv"), default="jsonl",
        help="export format (default %(default)s)")
    add("--page-size", type=int, default=500,
        help="EPOCHLENS_CLI_EXPORT_PAGE_SIZE of the export (default %(default)s)")
    add("--prefetch-pages", type=int, default=4,
        help="EPOCHLENS_CLI_PREFETCH_PAGES of the export (default %(default)s)")
    add("--rss-sample-s", type=float, default=0.05,
        help="interval of the RSS samples (default %(default)s)")
    add("--output-dir", type=Path, default=None,
        help="where the export files go (default: a temporary folder)")
    add("--target-rate", type=float, default=20000.0,
        help="predictions/s target (default %(default)s)")
    add("--rss-slack-mib", type=float, default=16.0,
        help="allowed peak RSS growth from the small to the large run (default %(default)s)")
    add_stack_args(p)
    return p.parse_args()


def shaped(args: argparse.Namespace, epochs: int, runs: int = 1) -> argparse.Namespace:
    """The arguments query.py's seeding reads, for runs of `epochs` epochs."""
    ns = copy.copy(args)
    ns.epochs, ns.runs = epochs, runs
    return ns


async def seed(admin_dsn: str, args: argparse.Namespace) -> list[tuple[str, int]]:
    """The two runs by COPY (one connection each); returns (run id, predictions) pairs."""
    rng = random.Random(args.seed)
    pools = tuple(text_pool(rng, args.text_pool, n)
                  for n in (args.prompt_chars, args.truth_chars, args.prediction_chars))
    sizes = (args.epochs, args.small_epochs)
    runs = run_records(shaped(args, 0, runs=len(sizes)))
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.copy_records_to_table("runs", schema_name=SCHEMA, columns=list(RUN_COLUMNS),
                                         records=runs)
        await asyncio.gather(*(copy_runs_predictions(admin_dsn, shaped(args, epochs), [run[0]],
                                                     pools, args.seed + k)
                               for k, (run, epochs) in enumerate(zip(runs, sizes, strict=True))))
        await conn.execute(EPOCH_SUMMARY_SQL)
        await conn.execute("VACUUM ANALYZE")
        stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.predictions")
    finally:
        await conn.close()
    expected = [epochs * args.samples for epochs in sizes]
    if stored != sum(expected):
        raise RuntimeError(f"seeded {stored} predictions, expected {sum(expected)}")
    return [(str(run[0]), count) for run, count in zip(runs, expected, strict=True)]


@dataclass
class Export:
    """What one export subprocess did."""

    label: str
    predictions: int
    wall_s: float
    peak_rss_mib: float
    rss_samples_mib: list[float]
    file_mib: float

    @property
    def rate(self) -> float:
        return self.predictions / self.wall_s

    def rss_at(self, fraction: float) -> float:
        samples = self.rss_samples_mib
        return samples[min(len(samples) - 1, int(len(samples) * fraction))] if samples else 0.0


def export_env(args: argparse.Namespace, address: str) -> dict[str, str]:
    """The export's whole configuration: where the query service is, a token, paging."""
    auth = AuthSettings(jwt_algorithm="HS256", jwt_secret=args.jwt_secret, _env_file=None)
    return {**os.environ, "EPOCHLENS_CLI_QUERY_ADDRESS": address,
            "EPOCHLENS_CLI_TOKEN": mint_token(auth, args.bench_user),
            "EPOCHLENS_CLI_EXPORT_PAGE_SIZE": str(args.page_size),
            "EPOCHLENS_CLI_PREFETCH_PAGES": str(args.prefetch_pages)}


def sample_rss(pid: int, interval_s: float, samples: list[tuple[float, float]],
               stop: threading.Event) -> None:
    """Appends (current RSS, VmHWM) in MiB every interval until stopped or the process is
    gone (a zombie has neither)."""
    process = psutil.Process(pid)
    while not stop.wait(interval_s):
        try:
            samples.append((process.memory_info().rss / 2**20, peak_rss_mib(pid)))
        except (psutil.Error, OSError, RuntimeError):
            return


def count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(16 * 2**20):
            lines += chunk.count(b"\n")
    return lines


def run_export(args, address: str, label: str, run_id: str, expected: int,
               folder: Path) -> Export:
    """One `epochlens export` subprocess, its memory sampled while it runs."""
    path = folder / f"{label}.{args.format}"
    command = [str(EXPORT_COMMAND), "export", run_id, "--format", args.format, "-o", str(path)]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        popen = subprocess.Popen(command, cwd=REPO_ROOT, env=export_env(args, address),
                                 stdout=subprocess.DEVNULL, stderr=errors)
        sampler = threading.Thread(target=sample_rss,
                                   args=(popen.pid, args.rss_sample_s, samples, stop))
        sampler.start()
        status = popen.wait()
        wall_s = time.perf_counter() - start
        stop.set()
        sampler.join()
        errors.seek(0)
        if status != 0:
            raise RuntimeError(f"{command} exited {status}: {errors.read().decode()}")
    # One line per prediction (the seeded texts hold no newline), plus the CSV header.
    written = count_lines(path) - (args.format == "csv")
    if written != expected:
        raise RuntimeError(f"{path} holds {written} lines, expected {expected}")
    size = path.stat().st_size / 2**20
    path.unlink()
    if not samples:
        raise RuntimeError("the export ended before its memory could be sampled")
    return Export(label, expected, wall_s, max(hwm for _, hwm in samples),
                  [rss for rss, _ in samples], size)


def report(args, seeded: int, seed_s: float, large: Export, small: Export,
           query_rss_mib: float) -> None:
    print(f"seeded {seeded:,} predictions (runs of {args.epochs} and {args.small_epochs} "
          f"epochs x {args.samples:,} samples) in {seed_s:.1f} s")
    print(f"command: epochlens export RUN --format {args.format} -o FILE (export page size "
          f"{args.page_size}, prefetch {args.prefetch_pages} pages)")
    print(f"{'run':<6} {'predictions':>11} {'wall s':>7} {'pred/s':>8} {'peak RSS MiB':>12} "
          f"{'RSS 25/50/75% MiB':>19} {'file MiB':>8}")
    for e in (large, small):
        quartiles = "/".join(f"{e.rss_at(q):.0f}" for q in (0.25, 0.5, 0.75))
        print(f"{e.label:<6} {e.predictions:>11,} {e.wall_s:>7.2f} {e.rate:>8,.0f} "
              f"{e.peak_rss_mib:>12.1f} {quartiles:>19} {e.file_mib:>8.1f}")
    print(f"target: >= {args.target_rate:,.0f} predictions/s, constant memory")
    rate_ok = large.rate >= args.target_rate
    print(f"throughput ({large.predictions:,} predictions): {large.rate:,.0f}/s "
          f"{'PASS' if rate_ok else 'FAIL'}")
    growth = large.peak_rss_mib - small.peak_rss_mib
    print(f"memory: peak RSS {large.peak_rss_mib:.1f} MiB for {large.predictions:,} vs "
          f"{small.peak_rss_mib:.1f} MiB for {small.predictions:,} (growth {growth:+.1f} MiB, "
          f"allowed {args.rss_slack_mib:g}) {'PASS' if growth <= args.rss_slack_mib else 'FAIL'}")
    print(f"query service peak RSS (VmHWM): {query_rss_mib:.1f} MiB")


async def main_async(args: argparse.Namespace) -> int:
    async with bench_stack(args, ("query",)) as stack:
        start = time.perf_counter()
        (large_id, large_n), (small_id, small_n) = await seed(stack.admin_dsn, args)
        seed_s = time.perf_counter() - start
        query = stack.services["query"]
        with tempfile.TemporaryDirectory(dir=args.output_dir) as folder:
            large = run_export(args, query.address, "large", large_id, large_n, Path(folder))
            small = run_export(args, query.address, "small", small_id, small_n, Path(folder))
        query_rss = query.peak_rss_mib()
    report(args, large_n + small_n, seed_s, large, small, query_rss)
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
