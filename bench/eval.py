"""`epochlens eval` benchmark: rows per second for a dataset whose rows already hold their
responses, from the start of the command to its end (stored, judged, summarized).

Starts the judge, writer and query services as processes on a throwaway PostgreSQL database
(bench/_stack.py) and the fake OpenAI server (tests/judge/fake_llm.py, its own process) with
--latency-s per reply (100 ms), then runs the real CLI (`python -m services.cli.main eval
... --yes --json`) on fresh rows (new texts at each level: no LLM cache hit) for:

* rules only (exact_match, chrf): --rule-rows rows;
* one LLM criterion (openai/gpt-4o-mini against the fake) at each --concurrency (8 and 32),
  about --duration-s of work at the ideal rate, printed against the ideal
  rows/s = concurrency / latency.

The CLI's wall time includes its start (about a second of imports) and its polling of
GetRunSummary (EPOCHLENS_CLI_EVAL_POLL_S, set to --poll-s here).

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/eval.py
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _stack import (
    REPO_ROOT,
    add_stack_args,
    create_database,
    drop_database,
    migrate_database,
    start_service,
    stop_service,
    wait_healthy,
)
from judge_llm import start_fake


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--latency-s", type=float, default=0.1, help="fake reply latency (default %(default)s)")
    add("--concurrency", default="8,32", help="LLM levels, comma separated (default %(default)s)")
    add("--duration-s", type=float, default=6.0,
        help="LLM work per level at the ideal rate, seconds (default %(default)s)")
    add("--rule-rows", type=int, default=2000, help="rows of the rules-only level "
        "(default %(default)s)")
    add("--chunk-size", type=int, default=500, help="rows per Evaluate call "
        "(default %(default)s)")
    add("--poll-s", type=float, default=0.1, help="the CLI's GetRunSummary polling "
        "(default %(default)s)")
    add("--model", default="gpt-4o-mini", help="LLM judge model (default %(default)s)")
    add("--timeout-s", type=float, default=300.0, help="longest wait for one level "
        "(default %(default)s)")
    add_stack_args(p)
    return p.parse_args()


def write_rows(folder: Path, tag: str, count: int) -> Path:
    """count prompt/response/reference rows whose texts are new (tag), half of them right."""
    path = folder / f"{tag}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            answer = f"{tag} answer {i}"
            handle.write(json.dumps({"prompt": f"{tag}: question {i}?", "reference": answer,
                                     "response": answer if i % 2 else f"{tag} guess {i}"})
                         + "\n")
    return path


async def run_cli(env: dict[str, str], dataset: Path, extra: list[str],
                  timeout_s: float) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "eval", str(dataset), "--yes", "--json",
        *extra, cwd=REPO_ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"epochlens eval exited {proc.returncode}: {err.decode()[-2000:]}")
    return seconds, json.loads(out)


def level_result(name: str, rows: int, seconds: float, result: dict,
                 ideal: float | None) -> dict:
    judged = result["judging"]["pending"] == 0 and result["inserted"] + \
        result["already_stored"] == rows
    return {"name": name, "rows": rows, "seconds": seconds, "rate": rows / seconds,
            "ideal": ideal, "complete": judged and not result["failures"],
            "cost": result["judging"]["cost_usd"]}


async def levels(args: argparse.Namespace, env: dict[str, str], folder: Path) -> list[dict]:
    results = []
    data = write_rows(folder, "rules", args.rule_rows)
    seconds, result = await run_cli(env, data, ["--criteria", "exact_match,chrf",
                                                "--chunk-size", str(args.chunk_size)],
                                    args.timeout_s)
    results.append(level_result("rules only", args.rule_rows, seconds, result, None))
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        ideal = concurrency / args.latency_s
        rows = max(1, int(ideal * args.duration_s))
        data = write_rows(folder, f"llm{concurrency}", rows)
        config = folder / f"llm{concurrency}.json"
        config.write_text(json.dumps({"rules": {"enabled": False}, "llm": {
            "provider": "openai", "model": args.model, "criteria": ["helpfulness"],
            "concurrency": concurrency, "budget_usd": 50}}))
        seconds, result = await run_cli(env, data, ["--judge-config", str(config),
                                                    "--chunk-size", str(args.chunk_size)],
                                        args.timeout_s)
        results.append(level_result(f"LLM, concurrency {concurrency}", rows, seconds, result,
                                    ideal))
    return results


def report(args: argparse.Namespace, results: list[dict]) -> None:
    print(f"\nepochlens eval, rows with responses; fake LLM latency {args.latency_s * 1000:.0f} "
          "ms; ideal LLM rows/s = concurrency / latency (one criterion per row)")
    print(f"{'level':<20} {'rows':>6} {'seconds':>8} {'rows/s':>8} {'ideal/s':>8} "
          f"{'share':>6} {'cost $':>9} complete")
    for r in results:
        ideal = f"{r['ideal']:>8.0f}" if r["ideal"] else f"{'-':>8}"
        share = f"{r['rate'] / r['ideal']:>6.0%}" if r["ideal"] else f"{'-':>6}"
        print(f"{r['name']:<20} {r['rows']:>6} {r['seconds']:>8.2f} {r['rate']:>8.1f} "
              f"{ideal} {share} {r['cost']:>9.5f} {r['complete']}")


async def main_async(args: argparse.Namespace) -> int:
    fake, port = start_fake(args.latency_s)
    dbname = await create_database(args)
    services = {}
    try:
        await migrate_database(args, dbname)
        services["judge"] = start_service(args, "judge", dbname, {
            "EPOCHLENS_JUDGE_OPENAI_API_KEY": "sk-bench",
            "EPOCHLENS_JUDGE_OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "EPOCHLENS_JUDGE_IDLE_POLL_S": "0.05"})
        services["query"] = start_service(args, "query", dbname)
        services["writer"] = start_service(args, "writer", dbname, {
            "EPOCHLENS_WRITER_JUDGE_ADDRESS": services["judge"].address,
            "EPOCHLENS_WRITER_OUTBOX_POLL_S": "0.05"})
        for service in services.values():
            await wait_healthy(args, service)
        env = cli_env(args, services)
        with tempfile.TemporaryDirectory() as folder:
            results = await levels(args, env, Path(folder))
    finally:
        for service in services.values():
            stop_service(args, service)
        fake.kill()
        fake.wait()
        if not args.keep:
            await drop_database(args, dbname)
    report(args, results)
    return 0 if all(r["complete"] for r in results) else 1


def cli_env(args: argparse.Namespace, services: dict) -> dict[str, str]:
    env = {**os.environ, "EPOCHLENS_AUTH_JWT_ALGORITHM": "HS256",
           "EPOCHLENS_AUTH_JWT_SECRET": args.jwt_secret, "EPOCHLENS_CLI_USER": args.bench_user,
           "EPOCHLENS_CLI_WRITER_ADDRESS": services["writer"].address,
           "EPOCHLENS_CLI_QUERY_ADDRESS": services["query"].address,
           "EPOCHLENS_CLI_JUDGE_ADDRESS": services["judge"].address,
           "EPOCHLENS_CLI_EVAL_POLL_S": str(args.poll_s),
           "EPOCHLENS_CLI_EVAL_WAIT_S": str(args.timeout_s)}
    env.pop("EPOCHLENS_CLI_TOKEN", None)
    return env


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parse_args())))


if __name__ == "__main__":
    main()
