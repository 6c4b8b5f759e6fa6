"""Web UI benchmark: the JSON API, the run page in Chromium, and live updates.

Seeds a throwaway PostgreSQL database like bench/query.py (--runs x --epochs x --samples
predictions, 1,000,000 at the defaults, by COPY) plus --metric-steps steps of training
metrics (loss, learning_rate, grad_norm every step, eval_loss every --eval-every steps)
on the newest run; starts the real writer and query services and the web service
(`python -m services.web.server`) as subprocesses, then prints:
  * API: p50/p99 ms per JSON endpoint (httpx, bearer token, sequential, --api-iterations
    timed calls after --api-warmup), against the target p99 < --target-api-p99-ms (50);
    the metrics calls are over the run with --metric-steps steps: the two series the run
    page asks for (--page-points each, as the page asks), and every name at the default
    budget (1000 points per series) for reference;
  * page: in headless Chromium, logged in through the login form, the run page of the
    run with metrics opened --page-loads times: first contentful paint and the time until
    the loss chart and the epochs table are drawn (performance.now() from navigation
    start), against the target < --target-page-ms (1000);
  * live: a new RUNNING run's page stays open while --live-epochs epochs of
    --live-samples predictions are written through the writer (WritePredictions); for
    each, the time from the write's return (committed) to the epoch's row in the page's
    epochs table (a MutationObserver stamps Date.now()), p50/p99, against the target
    < --target-live-ms (2000).

The verdicts are printed; the exit status is not tied to them.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/web.py
"""

import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import httpx
from _stack import REPO_ROOT, bench_stack, free_port, percentile, rollup_statements
from query import build_parser, seed_database
from report import start_browser
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from epochlens.v1 import common_pb2, writer_pb2, writer_pb2_grpc
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.writer.models import ROLLUP_WIDTHS, SCHEMA

METRIC_COLUMNS = ("run_id", "step", "name", "user_id", "value", "epoch", "wall_time",
                  "create_time")
PAGE_JS = """
const paint = performance.getEntriesByName("first-contentful-paint")[0];
return [paint ? paint.startTime : null, window.__drawnAt || null];
"""
# Stamps performance.now() once the loss chart has a line and the epochs table has rows.
DRAWN_JS = """
const done = () => document.querySelector('[data-chart="loss"] path.line')
  && document.querySelector('#epochs-table tbody tr');
if (done()) { window.__drawnAt = performance.now(); return; }
new MutationObserver((records, observer) => {
  if (done()) { window.__drawnAt = performance.now(); observer.disconnect(); }
}).observe(document.body, {childList: true, subtree: true});
"""
# Records Date.now() when each epoch's row first appears in the epochs table.
LIVE_JS = """
window.__rows = {};
const stamp = () => document.querySelectorAll('#epochs-table tbody tr').forEach((row) => {
  const epoch = row.dataset.epoch;
  if (epoch !== undefined && !(epoch in window.__rows)) window.__rows[epoch] = Date.now();
});
stamp();
new MutationObserver(stamp).observe(document.body, {childList: true, subtree: true});
"""


def parse_args():
    p = build_parser(__doc__)
    add = p.add_argument
    add("--metric-steps", type=int, default=100_000, help="metric steps (default %(default)s)")
    add("--eval-every", type=int, default=1000, help="eval_loss interval (default %(default)s)")
    add("--api-iterations", type=int, default=200, help="timed calls per endpoint")
    add("--api-warmup", type=int, default=20, help="untimed calls per endpoint first")
    add("--page-loads", type=int, default=5, help="timed loads of the run page")
    add("--page-points", type=int, default=500,
        help="max_points of the run page's metrics call (SERIES_POINTS in charts.js)")
    add("--live-epochs", type=int, default=20, help="epochs written while the page is open")
    add("--live-samples", type=int, default=100, help="predictions per live epoch")
    add("--live-pause-s", type=float, default=1.0, help="pause between live epochs")
    add("--target-api-p99-ms", type=float, default=50.0)
    add("--target-page-ms", type=float, default=1000.0)
    add("--target-live-ms", type=float, default=2000.0)
    add("--chromium", default="/usr/bin/chromium", help="browser (default %(default)s)")
    add("--chromedriver", default="/usr/bin/chromedriver", help="driver (default %(default)s)")
    return p.parse_args()


def metric_records(run_id: uuid.UUID, args):
    start = datetime.now(UTC) - timedelta(seconds=args.metric_steps)
    per_epoch = max(1, args.metric_steps // args.epochs)
    for step in range(args.metric_steps):
        wall = start + timedelta(seconds=step)
        epoch = step / per_epoch
        loss = 2.5 * math.exp(-3 * step / args.metric_steps) + 0.05 * math.sin(step / 7)
        yield (run_id, step, "loss", args.bench_user, loss, epoch, wall, wall)
        yield (run_id, step, "learning_rate", args.bench_user,
               1e-4 * (1 - step / args.metric_steps), epoch, wall, wall)
        yield (run_id, step, "grad_norm", args.bench_user, 1 + math.cos(step / 13), epoch,
               wall, wall)
        if step % args.eval_every == 0:
            yield (run_id, step, "eval_loss", args.bench_user, loss * 1.1, epoch, wall, wall)


async def seed_metrics(admin_dsn: str, run_id: str, args) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.copy_records_to_table("metrics", schema_name=SCHEMA,
                                         columns=list(METRIC_COLUMNS),
                                         records=metric_records(uuid.UUID(run_id), args))
        for statement in rollup_statements(SCHEMA, ROLLUP_WIDTHS):  # what the writer keeps
            await conn.execute(statement)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


def start_web(args, query_address: str, dbname: str) -> tuple[subprocess.Popen, str]:
    port = free_port(args.service_host)
    env = {**os.environ, "EPOCHLENS_WEB_HOST": args.service_host,
           "EPOCHLENS_WEB_PORT": str(port), "EPOCHLENS_WEB_QUERY_ADDRESS": query_address,
           "EPOCHLENS_WEB_LOG_LEVEL": args.service_log_level}
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with (args.log_dir / f"{dbname}_web.log").open("wb") as log:
        popen = subprocess.Popen([sys.executable, "-m", "services.web.server"], cwd=REPO_ROOT,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{args.service_host}:{port}"
    deadline = time.monotonic() + args.health_timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return popen, url
        except httpx.HTTPError:
            pass
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"web service did not become healthy (exit {popen.poll()})")
        time.sleep(args.health_poll_s)


def endpoints(runs: list[str], metric_run: str, args) -> dict[str, str]:
    run = runs[0]
    return {
        "GET /v1/runs": "/v1/runs",
        "GET /v1/runs/{id}": f"/v1/runs/{run}",
        "GET .../epochs": f"/v1/runs/{run}/epochs",
        "GET .../predictions": f"/v1/runs/{run}/predictions?page_size={args.page_size}",
        "GET .../predictions?epoch": f"/v1/runs/{run}/predictions?epoch={args.epochs // 2}"
                                     f"&page_size={args.page_size}",
        "GET .../samples/{n}": f"/v1/runs/{run}/samples/{args.samples // 2}",
        "GET .../summary": f"/v1/runs/{run}/summary",
        "GET .../metrics (the page's call)": f"/v1/runs/{metric_run}/metrics"
                                             f"?names=loss&names=eval_loss&max_points={args.page_points}",
        "GET .../metrics (all 4 names, 1000 points each)": f"/v1/runs/{metric_run}/metrics",
    }


def measure_api(url: str, token: str, paths: dict[str, str], args) -> list[tuple]:
    rows = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        for name, path in paths.items():
            times, size = [], 0
            for i in range(args.api_warmup + args.api_iterations):
                started = time.perf_counter()
                response = client.get(path)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
                size = len(response.content)
                if i >= args.api_warmup:
                    times.append(elapsed)
            rows.append((name, size, percentile(times, 50), percentile(times, 99)))
    return rows


def log_in(driver: webdriver.Chrome, url: str, token: str) -> None:
    driver.get(f"{url}/login")
    field = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "token"))
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, '#login-form button[type="submit"]').click()
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#runs-table, #runs-empty"))


def measure_page(driver: webdriver.Chrome, url: str, run_id: str, args) -> list[tuple]:
    """(first contentful paint ms, drawn ms) per load of the run page."""
    loads = []
    for _ in range(args.page_loads):
        driver.get("about:blank")
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
            "document.addEventListener('DOMContentLoaded', () => {" + DRAWN_JS + "});")})
        driver.get(f"{url}/runs/{run_id}")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(PAGE_JS)[1] is not None)
        loads.append(tuple(driver.execute_script(PAGE_JS)))
    return loads


async def measure_live(driver, url: str, writer_address: str, md, args) -> list[float]:
    """ms from each live epoch's committed write to its row on the open page."""
    async with grpc.aio.insecure_channel(writer_address) as channel:
        stub = writer_pb2_grpc.PredictionWriterServiceStub(channel)
        run = await stub.CreateRun(writer_pb2.CreateRunRequest(
            name="live", model_name="bench-model", dataset_name="bench-data"), metadata=md)
        await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
            run_id=run.id, predictions=live_epoch(0, args)), metadata=md)
        driver.get(f"{url}/runs/{run.id}")
        WebDriverWait(driver, 30).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#epochs-table tbody tr[data-epoch="0"]'))
        driver.execute_script(LIVE_JS)
        committed = {}
        for epoch in range(1, args.live_epochs + 1):
            await asyncio.sleep(args.live_pause_s)
            await stub.WritePredictions(writer_pb2.WritePredictionsRequest(
                run_id=run.id, predictions=live_epoch(epoch, args)), metadata=md)
            committed[str(epoch)] = time.time() * 1000
        WebDriverWait(driver, 30).until(
            lambda d: str(args.live_epochs) in d.execute_script("return window.__rows"))
        seen = driver.execute_script("return window.__rows")
        await stub.FinishRun(writer_pb2.FinishRunRequest(
            run_id=run.id, state=common_pb2.RUN_STATE_SUCCEEDED), metadata=md)
    return [max(0.0, seen[e] - at) for e, at in committed.items()]


def live_epoch(epoch: int, args) -> list:
    return [common_pb2.PredictionInput(
        epoch=epoch, step=epoch * 10, sample_index=s, prompt=f"prompt {s}",
        ground_truth=f"answer {s}", prediction=f"guess {epoch} {s}", generation_time_ms=1.0)
        for s in range(args.live_samples)]


def verdict(value: float, target: float) -> str:
    return "PASS" if value < target else "FAIL"


def report(args, seeded: tuple, api: list[tuple], loads: list[tuple], live: list[float]):
    predictions, seed_s, metric_s = seeded
    print(f"seeded {predictions:,} predictions in {seed_s:.1f} s and {args.metric_steps:,} "
          f"metric steps in {metric_s:.1f} s")
    print(f"\nAPI (target p99 < {args.target_api_p99_ms:g} ms)")
    width = max(len(row[0]) for row in api)
    print(f"{'endpoint':<{width}}  {'bytes':>9}  {'p50 ms':>7}  {'p99 ms':>7}")
    for name, size, p50, p99 in api:
        print(f"{name:<{width}}  {size:>9,}  {p50:>7.2f}  {p99:>7.2f}  "
              f"{verdict(p99, args.target_api_p99_ms)}")
    paints = [paint for paint, _ in loads if paint is not None]
    drawn = [d for _, d in loads]
    print(f"\nrun page with {args.metric_steps:,} metric steps, {len(loads)} loads "
          f"(target < {args.target_page_ms:g} ms)")
    if paints:
        print(f"first contentful paint ms: median {percentile(paints, 50):.0f}, "
              f"max {max(paints):.0f}  {verdict(max(paints), args.target_page_ms)}")
    print(f"charts and epochs drawn ms: median {percentile(drawn, 50):.0f}, max "
          f"{max(drawn):.0f}  {verdict(max(drawn), args.target_page_ms)}")
    print(f"\nlive: {len(live)} epochs committed while the page was open "
          f"(target < {args.target_live_ms:g} ms)")
    print(f"commit to visible ms: p50 {percentile(live, 50):.0f}, p99 "
          f"{percentile(live, 99):.0f}  {verdict(percentile(live, 99), args.target_live_ms)}")


async def main_async(args) -> int:
    async with bench_stack(args, ("writer", "query")) as stack:
        runs, seed_s = await seed_database(stack.admin_dsn, args)
        metric_run = runs[-1]  # the newest: first in the runs list
        metric_s = await seed_metrics(stack.admin_dsn, metric_run, args)
        token = mint_token(AuthSettings(jwt_algorithm="HS256", jwt_secret=args.jwt_secret),
                           args.bench_user)
        web, url = start_web(args, stack.services["query"].address, stack.dbname)
        try:
            api = measure_api(url, token, endpoints(runs, metric_run, args), args)
            with tempfile.TemporaryDirectory(prefix="epochlens-web-bench-") as profile:
                driver = start_browser(args, Path(profile))
                try:
                    log_in(driver, url, token)
                    loads = measure_page(driver, url, metric_run, args)
                    live = await measure_live(driver, url, stack.services["writer"].address,
                                              stack.metadata(), args)
                finally:
                    driver.quit()
        finally:
            web.terminate()
            web.wait(timeout=args.stop_timeout_s)
    seeded = (args.runs * args.epochs * args.samples, seed_s, metric_s)
    report(args, seeded, api, loads, live)
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
