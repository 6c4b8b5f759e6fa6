"""LLM judge benchmark: judgments per second against the local fake API with a fixed latency.

Starts the fake OpenAI/Anthropic server (tests/judge/fake_llm.py) as a subprocess with
--latency-s per reply (100 ms), creates a throwaway PostgreSQL database migrated like
production (schema judge, row-level security, the judge login role), and runs the real
LlmJudge (OpenAI SDK, cache lookups, budget bookkeeping in judge.run_llm_state and the cache
store in judge.llm_cache, all as the judge role) over fresh items at each concurrency
(--concurrency, default 1, 8 and 32). Each level gets its own run and items whose texts are new
(no cache hit), about --duration-s of work at the ideal rate. Prints judgments/s against
"ideal = concurrency x (1 / latency)/s, target >= --target-share of ideal", then the cost of
each run (from the verdicts and from run_llm_state) at the configured price of --model.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):
    . .venv/bin/activate && python bench/judge_llm.py
"""

import argparse
import asyncio
import math
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.judge.llm.judge import LlmJudge
from services.judge.llm.settings import LlmSettings
from services.judge.models import run_llm_state_table
from services.judge.schema import STANDARD_LLM_CRITERIA, Item, LlmJudgeConfig
from services.writer.config import MigrateSettings
from services.writer.migrate import migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
USER = "bench-user"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--latency-s", type=float, default=0.1, help="fake reply latency (default %(default)s)")
    add("--concurrency", default="1,8,32", help="levels, comma separated (default %(default)s)")
    add("--duration-s", type=float, default=8.0,
        help="work per level at the ideal rate, seconds (default %(default)s)")
    add("--criteria", type=int, default=5, help="criteria per item, 1-5 (default %(default)s)")
    add("--target-share", type=float, default=0.8,
        help="share of the ideal rate to reach (default %(default)s)")
    add("--model", default="gpt-4o-mini",
        help="model priced from the default prices (default %(default)s)")
    add("--pg-host", default="127.0.0.1", help="PostgreSQL host (default %(default)s)")
    add("--pg-port", type=int, default=5432, help="PostgreSQL port (default %(default)s)")
    add("--pg-admin-user", default="postgres", help="superuser (default %(default)s)")
    add("--judge-role", default="epochlens_judge",
        help="login role the judge uses (default %(default)s)")
    add("--keep", action="store_true", help="keep the database at the end")
    return p.parse_args()


def start_fake(latency_s: float) -> tuple[subprocess.Popen, int]:
    """The fake API in its own process (its threads do not compete for the bench's GIL)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.judge.fake_llm",
                             "--latency-s", str(latency_s)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"fake LLM server did not start (printed {line!r})")
    return proc, int(line)


@asynccontextmanager
async def database(args: argparse.Namespace):
    """A migrated throwaway database; yields its name."""
    name = f"epochlens_bench_llm_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(host=args.pg_host, port=args.pg_port,
                                  user=args.pg_admin_user, database="postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql+asyncpg://{args.pg_admin_user}@{args.pg_host}:{args.pg_port}/{name}"
        await migrate(MigrateSettings(database_url=url, judge_role=args.judge_role,
                                      _env_file=None))
        yield name
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def make_items(run_id: uuid.UUID, count: int) -> list[Item]:
    tag = uuid.uuid4().hex
    return [Item(run_id=run_id, step=10, sample_index=i, epoch=1,
                 prompt=f"Reverse the words of sentence {i} [{tag}]",
                 ground_truth=f"expected reversal {i}", prediction=f"model reversal {i}")
            for i in range(count)]


async def spent(engine: AsyncEngine, run_id: uuid.UUID) -> tuple[float, int, int]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(
            run_llm_state_table.c.spent_usd, run_llm_state_table.c.input_tokens,
            run_llm_state_table.c.output_tokens).where(
            run_llm_state_table.c.run_id == run_id))).one()
    return row.spent_usd, row.input_tokens, row.output_tokens


async def level(judge: LlmJudge, admin: AsyncEngine, args: argparse.Namespace,
                concurrency: int) -> dict:
    criteria = list(STANDARD_LLM_CRITERIA[:args.criteria])
    ideal = concurrency / args.latency_s
    items = math.ceil(args.duration_s * ideal / len(criteria))
    run_id = uuid.uuid4()
    config = LlmJudgeConfig(provider="openai", model=args.model, criteria=criteria,
                            concurrency=concurrency, budget_usd=1000.0)
    started = time.perf_counter()
    verdicts = await judge.judge(USER, make_items(run_id, items), config)
    elapsed = time.perf_counter() - started
    scored = sum(1 for v in verdicts if v.status == 1)
    if scored != len(verdicts):
        raise RuntimeError(f"{len(verdicts) - scored} of {len(verdicts)} verdicts unscored")
    state = await spent(admin, run_id)
    return {"concurrency": concurrency, "judgments": len(verdicts), "seconds": elapsed,
            "rate": len(verdicts) / elapsed, "ideal": ideal,
            "cost": sum(v.cost_usd for v in verdicts), "state": state}


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\nLLM judge, fake API latency {args.latency_s * 1000:.0f} ms, "
          f"{args.criteria} criteria per item, model {args.model}")
    print(f"ideal = concurrency x {1 / args.latency_s:g}/s, "
          f"target >= {args.target_share:.0%} of ideal")
    print(f"{'conc':>5} {'judgments':>10} {'seconds':>8} {'judg/s':>8} {'ideal/s':>8} "
          f"{'share':>6}  verdict")
    for r in results:
        share = r["rate"] / r["ideal"]
        verdict = "PASS" if share >= args.target_share else "FAIL"
        print(f"{r['concurrency']:>5} {r['judgments']:>10} {r['seconds']:>8.2f} "
              f"{r['rate']:>8.1f} {r['ideal']:>8.1f} {share:>6.0%}  {verdict}")
    print("\ncost per run (verdict sum | judge.run_llm_state spent, input/output tokens):")
    for r in results:
        spent_usd, tokens_in, tokens_out = r["state"]
        print(f"  concurrency {r['concurrency']:>3}: ${r['cost']:.6f} | ${spent_usd:.6f} "
              f"({tokens_in} in / {tokens_out} out)")
    total = sum(r["cost"] for r in results)
    print(f"  total: ${total:.6f} for {sum(r['judgments'] for r in results)} judgments")


async def run(args: argparse.Namespace, port: int) -> list[dict]:
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = LlmSettings(openai_api_key="bench-key", anthropic_api_key=None,
                           openai_base_url=f"http://127.0.0.1:{port}/v1",
                           llm_max_concurrency=max(levels))
    async with database(args) as name:
        base = f"{args.pg_host}:{args.pg_port}/{name}"
        engine = create_async_engine(f"postgresql+asyncpg://{args.judge_role}@{base}",
                                     pool_size=max(levels) + 4)
        admin = create_async_engine(f"postgresql+asyncpg://{args.pg_admin_user}@{base}")
        judge = LlmJudge(settings, engine)
        try:
            return [await level(judge, admin, args, c) for c in levels]
        finally:
            await judge.aclose()
            await engine.dispose()
            await admin.dispose()


def main() -> None:
    args = parse_args()
    proc, port = start_fake(args.latency_s)
    try:
        results = asyncio.run(run(args, port))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    report(results, args)


if __name__ == "__main__":
    main()
