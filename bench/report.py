"""Report benchmark: `epochlens report` for one run of --samples x --epochs
predictions (100 x 50 = 5,000 at the defaults) against the real query service,
then the file it writes loaded in headless Chromium.

Seeds a throwaway PostgreSQL database (real schema, RLS and roles) by asyncpg
COPY as the superuser, with texts of about --prompt-chars / --truth-chars /
--prediction-chars characters (300 / 300 / 600) whose predictions drift toward
the ground truth epoch by epoch (every --exact-every-th sample ends on an exact
match), and builds the per-epoch summary the writer would have kept. Then:

* runs `python -m services.cli.main report RUN -o FILE` as a subprocess with the
  query address and a bearer token in its environment, and prints its wall time,
  the file size and the CLI's peak RSS against the target < --target-s (10 s);
* opens the file in headless Chromium and prints, from performance.now() in the
  page, when the first render finished (after navigation start) and the first
  contentful paint, then the time to switch to --switches other samples: the
  script and layout alone, and until the next frame.

The verdict is printed; the exit status is not tied to it.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth; Debian
chromium and chromium-driver, `make browser`):
    . .venv/bin/activate && python bench/report.py
"""

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from _stack import REPO_ROOT, add_stack_args, bench_stack
from query import EPOCH_SUMMARY_SQL, RUN_COLUMNS, copy_predictions
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from epochlens.v1 import common_pb2
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.writer.models import SCHEMA

SWITCH_JS = """
const t0 = performance.now();
window.epochlensReport.select(arguments[0]);
void document.body.offsetHeight;
return performance.now() - t0;
"""
SWITCH_TO_FRAME_JS = """
const done = arguments[arguments.length - 1];
const t0 = performance.now();
window.epochlensReport.select(arguments[0]);
requestAnimationFrame(() => setTimeout(() => done(performance.now() - t0), 0));
"""
FIRST_RENDER_JS = """
const paint = performance.getEntriesByName("first-contentful-paint")[0];
return [window.epochlensReport.renderedAt, paint ? paint.startTime : null,
        document.querySelectorAll("#prediction-list .pred-card").length];
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--samples", type=int, default=100, help="samples per epoch (default %(default)s)")
    add("--epochs", type=int, default=50, help="epochs (default %(default)s)")
    add("--prompt-chars", type=int, default=300, help="prompt length (default %(default)s)")
    add("--truth-chars", type=int, default=300, help="ground truth length (default %(default)s)")
    add("--prediction-chars", type=int, default=600,
        help="prediction length (default %(default)s)")
    add("--exact-every", type=int, default=4,
        help="every n-th sample ends on an exact match (default %(default)s)")
    add("--target-s", type=float, default=10.0, help="wall time target (default %(default)s)")
    add("--switches", type=int, default=20, help="sample switches timed (default %(default)s)")
    add("--chromium", default="/usr/bin/chromium", help="browser (default %(default)s)")
    add("--chromedriver", default="/usr/bin/chromedriver", help="driver (default %(default)s)")
    add("--output", type=Path, default=None,
        help="where to keep the report (default: a temporary file, removed)")
    add("--seed", type=int, default=1, help="random seed (default %(default)s)")
    add_stack_args(p)
    return p.parse_args()


def words(rng: random.Random, vocabulary: list[str], chars: int) -> list[str]:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(vocabulary))
    return out


def drift(rng: random.Random, vocabulary: list[str], truth: list[str], args) -> list[str]:
    """One sample's prediction per epoch: random words drifting toward the truth."""
    current = words(rng, vocabulary, args.prediction_chars)
    texts = []
    for epoch in range(args.epochs):
        progress = (epoch + 1) / args.epochs
        for i in range(len(current)):
            if rng.random() < 0.15:
                toward = i < len(truth) and rng.random() < progress
                current[i] = truth[i] if toward else rng.choice(vocabulary)
        texts.append(" ".join(current))
    return texts


def prediction_records(args, run_id: uuid.UUID) -> list[tuple]:
    """The run's predictions in PREDICTION_COLUMNS order."""
    rng = random.Random(args.seed)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
                  for _ in range(3000)]
    start, records = datetime.now(UTC), []
    for sample in range(args.samples):
        prompt = " ".join(words(rng, vocabulary, args.prompt_chars))
        truth_words = words(rng, vocabulary, args.truth_chars)
        truth = " ".join(truth_words)
        for epoch, text in enumerate(drift(rng, vocabulary, truth_words, args)):
            exact = sample % args.exact_every == 0 and epoch >= args.epochs * 0.8
            records.append((run_id, epoch * 10, sample, args.bench_user, epoch, prompt, truth,
                            truth if exact else text, rng.uniform(50.0, 900.0),
                            args.prompt_chars // 4, args.prediction_chars // 4,
                            start + timedelta(seconds=epoch, milliseconds=sample)))
    return records


async def seed_run(admin_dsn: str, args: argparse.Namespace) -> tuple[str, float]:
    """One finished run and its predictions by COPY, the epoch summary, ANALYZE."""
    began = time.perf_counter()
    run_id, now = uuid.uuid4(), datetime.now(UTC)
    run = (run_id, args.bench_user, "bench-report", "bench-model", "bench-data",
           json.dumps({"learning_rate": 0.0002, "epochs": args.epochs,
                       "predictions": {"samples": args.samples}}),
           common_pb2.RUN_STATE_SUCCEEDED, None, now, now + timedelta(hours=1))
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.copy_records_to_table("runs", schema_name=SCHEMA, columns=list(RUN_COLUMNS),
                                         records=[run])
        await copy_predictions(conn, prediction_records(args, run_id))
        await conn.execute(EPOCH_SUMMARY_SQL)
        await conn.execute("ANALYZE")
        stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.predictions")
    finally:
        await conn.close()
    if stored != args.samples * args.epochs:
        raise RuntimeError(f"seeded {stored} predictions, expected {args.samples * args.epochs}")
    return str(run_id), time.perf_counter() - began


def run_report(args, address: str, run_id: str, output: Path) -> tuple[float, float]:
    """Runs the CLI; returns its wall seconds and peak RSS (MiB, largest child so far)."""
    token = mint_token(AuthSettings(jwt_algorithm="HS256", jwt_secret=args.jwt_secret),
                       args.bench_user)
    env = dict(os.environ, EPOCHLENS_CLI_QUERY_ADDRESS=address, EPOCHLENS_CLI_TOKEN=token)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "report", run_id,
                           "-o", str(output)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"epochlens report exited {done.returncode}: {done.stderr.strip()}")
    print(done.stdout.strip())
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def start_browser(args, profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(args.chromedriver), options=options)


def measure_browser(args, output: Path, profile: Path) -> dict:
    """First render and sample switch times, from performance.now() in the page."""
    driver = start_browser(args, profile)
    try:
        began = time.perf_counter()
        driver.get(output.as_uri())
        load_s = time.perf_counter() - began
        rendered_ms, paint_ms, cards = driver.execute_script(FIRST_RENDER_JS)
        order = random.Random(args.seed).sample(range(1, args.samples), args.switches)
        script_ms = [driver.execute_script(SWITCH_JS, k) for k in order]
        frame_ms = [driver.execute_async_script(SWITCH_TO_FRAME_JS, k) for k in order[::-1]]
    finally:
        driver.quit()
    return {"load_s": load_s, "rendered_ms": rendered_ms, "paint_ms": paint_ms, "cards": cards,
            "script_ms": script_ms, "frame_ms": frame_ms}


def report(args, seed_s: float, wall: float, size: int, rss: float, browser: dict) -> None:
    total = args.samples * args.epochs
    print(f"seeded {total:,} predictions (1 run: {args.samples} samples x {args.epochs} epochs; "
          f"~{args.prompt_chars}/{args.truth_chars}/{args.prediction_chars} chars) "
          f"in {seed_s:.1f} s")
    verdict = "PASS" if wall < args.target_s else "FAIL"
    print(f"epochlens report: {wall:.2f} s wall, {size / 1e6:.2f} MB file, CLI peak RSS "
          f"{rss:.0f} MiB; target < {args.target_s:g} s: {verdict}")
    paint = f"{browser['paint_ms']:.0f} ms" if browser["paint_ms"] is not None else "n/a"
    print(f"chromium: driver.get {browser['load_s']:.2f} s; first render done "
          f"{browser['rendered_ms']:.0f} ms after navigation start ({browser['cards']} epoch "
          f"cards); first contentful paint {paint}")
    for label, key in (("script + layout", "script_ms"), ("to next frame", "frame_ms")):
        times = browser[key]
        print(f"switch sample ({label}): median {statistics.median(times):.1f} ms, "
              f"max {max(times):.1f} ms over {len(times)} switches")


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="epochlens-report-bench-") as tmp:
        output = args.output or Path(tmp) / "report.html"
        async with bench_stack(args, ("query",)) as stack:
            run_id, seed_s = await seed_run(stack.admin_dsn, args)
            wall, rss = run_report(args, stack.services["query"].address, run_id, output)
        browser = measure_browser(args, output, Path(tmp) / "chromium-profile")
        report(args, seed_s, wall, output.stat().st_size, rss, browser)
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
