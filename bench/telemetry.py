"""Cost of the metrics interceptor on a unary RPC: the same query service, in-process on an
embedded SQLite store, once with metrics off (no metrics interceptor) and once with the
metrics endpoint on (every RPC counted and timed), called alternately in rounds.

Prints, per RPC and setup, the best and the median rate (calls/s) over the rounds, and the
median CPU time of the process per call (client and server together: what other processes
on a busy machine disturb least); the cost of the interceptor is the difference of the
CPU times: Health/Check (no database, no token: the interceptor's share is
largest there) and QueryService/GetRun of an unknown run (a token, one indexed read, ends
NOT_FOUND: the abort path of the interceptor).

Run from the repository root:
    . .venv/bin/activate && python bench/telemetry.py
"""

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.server import RunningServer
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.writer.config import MigrateSettings
from services.writer.migrate import migrate

SECRET = "bench-telemetry-secret-for-hs256-at-least-32-bytes"
USER = "bench-user"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per round and setup")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds per setup")
    return p.parse_args()


async def _rate(call: Callable[[], Awaitable], calls: int,
                concurrency: int) -> tuple[float, float]:
    """Calls per second of `calls` calls, `concurrency` at a time, and the process's CPU
    seconds per call."""
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls / (time.perf_counter() - started), (time.process_time() - cpu) / calls


async def _get_run(stub: query_pb2_grpc.QueryServiceStub, metadata) -> None:
    try:
        await stub.GetRun(query_pb2.GetRunRequest(run_id=str(uuid.uuid4())), metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise


def _calls(channel: grpc.aio.Channel, metadata) -> dict[str, Callable[[], Awaitable]]:
    health = health_pb2_grpc.HealthStub(channel)
    query = query_pb2_grpc.QueryServiceStub(channel)
    return {"Health/Check": lambda: health.Check(health_pb2.HealthCheckRequest()),
            "QueryService/GetRun (NOT_FOUND)": lambda: _get_run(query, metadata)}


async def _measure(servers: dict[str, RunningServer], args, metadata) -> dict:
    """rates[rpc][setup] = (rate, CPU seconds per call) of every round."""
    rates: dict[str, dict[str, list[tuple[float, float]]]] = {}
    channels = {name: grpc.aio.insecure_channel(s.address) for name, s in servers.items()}
    calls = {name: _calls(channel, metadata) for name, channel in channels.items()}
    try:
        for rpc in calls["off"]:
            for setup in servers:  # warm-up
                await _rate(calls[setup][rpc], args.calls // 10, args.concurrency)
            for _ in range(args.rounds):
                for setup in servers:
                    rates.setdefault(rpc, {}).setdefault(setup, []).append(
                        await _rate(calls[setup][rpc], args.calls, args.concurrency))
    finally:
        for channel in channels.values():
            await channel.close()
    return rates


async def main_async(args) -> None:
    auth = AuthSettings(jwt_secret=SECRET, _env_file=None)
    with tempfile.TemporaryDirectory() as folder:
        await migrate(MigrateSettings(sqlite_dir=folder, _env_file=None))
        common = {"port": 0, "sqlite_dir": folder, "page_token_secret": SECRET,
                  "_env_file": None}
        servers = {"off": await start_query(QuerySettings(**common), auth),
                   "on": await start_query(QuerySettings(metrics_port=0, **common), auth)}
        try:
            rates = await _measure(servers, args, (("authorization",
                                                    f"Bearer {mint_token(auth, USER)}"),))
        finally:
            for server in servers.values():
                await server.stop(0)
    print(f"unary RPCs, {args.concurrency} in flight, {args.calls} calls x {args.rounds} "
          "rounds per setup, client and server in one process")
    for rpc, by_setup in rates.items():
        cpu = {}
        for setup in ("off", "on"):
            rounds = by_setup[setup]
            cpu[setup] = statistics.median(c for _, c in rounds) * 1e6
            print(f"{rpc:32s} metrics {setup:3s}: best {max(r for r, _ in rounds):7.0f}/s, "
                  f"median {statistics.median(r for r, _ in rounds):7.0f}/s, "
                  f"CPU {cpu[setup]:6.1f} us/call")
        print(f"{rpc:32s} interceptor cost: {cpu['on'] - cpu['off']:+.1f} us CPU per call "
              f"({100 * (cpu['on'] - cpu['off']) / cpu['off']:+.1f}%)")


def main() -> None:
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()
