"""`epochlens eval` end to end: the judge, writer and query services as processes on a fresh
migrated PostgreSQL database (bench/_stack.py starts them as an operator would), the real
OpenAI and Anthropic SDKs in the judge pointed at the local fake wire server
(tests/judge/fake_llm.py), and the CLI as a process.

* a 200-row JSONL that holds its responses, judged by rules and the OpenAI judge: the CLI is
  killed with SIGKILL while it stores, run again, and resumes: 200 predictions, exactly one
  judgment per prediction and criterion, and exactly one paid call per prediction;
* the same rows judged by the Anthropic judge while the judge process is killed -9 and
  started again: every prediction judged once, and no paid call made twice beyond those in
  flight at the kill;
* --fail-under sets the exit status both ways (1 below, 0 above, 2 for an unknown
  criterion), --json prints the summary; without a terminal and --yes, paid judging is
  refused (exit 2) before any call;
* a tiny local model with a LoRA adapter (--model, --adapter) generates a handful of rows.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bench import _stack
from tests.judge.fake_llm import DEFAULT_SCORES, ECHO_PREFIX, EchoLlmServer, FakeLlmServer

ROOT = Path(__file__).resolve().parents[2]
ROWS = 200
CORRECT = 120  # rows whose response equals the reference
RUN_TIMEOUT_S = 180
OPENAI_PATH, ANTHROPIC_PATH = "/v1/chat/completions", "/v1/messages"
# Longest time a judge takes from a reply's arrival to its commit (cost, cache row): a call
# answered that shortly before the kill may not be settled, so it is still in flight.
SETTLE_S = 1.0
# The judge's task lease (renewed every third of it while a batch is judged). With 3 s, one
# full-suite run saw one prompt asked three times (206 calls for 200 rows and 5 in flight),
# not seen again in 5 runs alone or under CPU load: a renewal that comes late on a loaded
# 2-core machine lets a second worker take a live task, which a longer lease makes unlikely.
LEASE_S = "8"


@dataclass
class EvalStack:
    args: argparse.Namespace
    dbname: str
    services: dict[str, _stack.Service]
    judge_env: dict[str, str]
    fake: FakeLlmServer
    cli_env: dict[str, str]
    echo: EchoLlmServer

    async def fetch(self, query: str, *params) -> list:
        conn = await asyncpg.connect(_stack.dsn(self.args, self.args.pg_admin_user, self.dbname))
        try:
            return await conn.fetch(query, *params)
        finally:
            await conn.close()

    def restart_judge(self) -> None:
        """The judge again, on the same port (the writer knows that address)."""
        old = self.services["judge"]
        port = int(old.address.rsplit(":", 1)[1])
        env = {**_stack.service_env(self.args, "judge", self.dbname, port), **self.judge_env}
        with old.log_path.open("ab") as log_file:
            popen = subprocess.Popen([sys.executable, "-m", "services.judge.server"], cwd=ROOT,
                                     env=env, stdout=log_file, stderr=subprocess.STDOUT)
        self.services["judge"] = _stack.Service("judge", old.address, popen, old.log_path)


def stack_args(tmp: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _stack.add_stack_args(parser)
    args = parser.parse_args([])
    args.db_prefix, args.log_dir = "epochlens_e2e_eval", tmp / "logs"
    return args


def judge_env(fake: FakeLlmServer, echo: EchoLlmServer) -> dict[str, str]:
    endpoints = {"echo": {"base_url": echo.openai_url, "api_key": "echo-key"}}
    return {"EPOCHLENS_JUDGE_LLM_ENDPOINTS": json.dumps(endpoints),
            "EPOCHLENS_JUDGE_OPENAI_API_KEY": "sk-test", "EPOCHLENS_JUDGE_ANTHROPIC_API_KEY":
            "sk-ant-test", "EPOCHLENS_JUDGE_OPENAI_BASE_URL": fake.openai_url,
            "EPOCHLENS_JUDGE_ANTHROPIC_BASE_URL": fake.anthropic_url,
            "EPOCHLENS_JUDGE_IDLE_POLL_S": "0.05", "EPOCHLENS_JUDGE_LEASE_S": LEASE_S,
            "EPOCHLENS_JUDGE_CLAIM_BATCH": "16", "EPOCHLENS_JUDGE_RETRY_BACKOFF_BASE_S": "0.2",
            "EPOCHLENS_JUDGE_LLM_RESERVATION_GRACE_S": "1"}


@pytest.fixture(scope="module")
async def eval_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    args = stack_args(tmp)
    fake = FakeLlmServer(latency_s=0.02).start()
    echo = EchoLlmServer(latency_s=0.01).start()
    dbname = await _stack.create_database(args)
    services: dict[str, _stack.Service] = {}
    env = judge_env(fake, echo)
    try:
        await _stack.migrate_database(args, dbname)
        services["judge"] = _stack.start_service(args, "judge", dbname, env)
        services["query"] = _stack.start_service(args, "query", dbname)
        services["writer"] = _stack.start_service(args, "writer", dbname, {
            "EPOCHLENS_WRITER_JUDGE_ADDRESS": services["judge"].address,
            "EPOCHLENS_WRITER_OUTBOX_POLL_S": "0.05",
            "EPOCHLENS_WRITER_OUTBOX_BACKOFF_BASE_S": "0.1",
            "EPOCHLENS_WRITER_OUTBOX_BACKOFF_MAX_S": "0.5"})
        for service in services.values():
            await _stack.wait_healthy(args, service)
        cli_env = {**os.environ, "EPOCHLENS_AUTH_JWT_ALGORITHM": "HS256",
                   "EPOCHLENS_AUTH_JWT_SECRET": args.jwt_secret,
                   "EPOCHLENS_CLI_USER": args.bench_user,
                   "EPOCHLENS_CLI_WRITER_ADDRESS": services["writer"].address,
                   "EPOCHLENS_CLI_QUERY_ADDRESS": services["query"].address,
                   "EPOCHLENS_CLI_JUDGE_ADDRESS": services["judge"].address,
                   "EPOCHLENS_CLI_EVAL_POLL_S": "0.1", "EPOCHLENS_CLI_EVAL_WAIT_S": "120"}
        cli_env.pop("EPOCHLENS_CLI_TOKEN", None)
        yield EvalStack(args, dbname, services, env, fake, cli_env, echo)
    finally:
        for service in services.values():
            _stack.stop_service(args, service)
        fake.stop()
        echo.stop()
        await _stack.drop_database(args, dbname)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i),
             "response": str(2 * i) if i < CORRECT else f"maybe {i}"} for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def eval_command(dataset: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.cli.main", "eval", str(dataset), "--json", *extra]


async def run_cli(stack: EvalStack, command: list[str], env: dict[str, str] | None = None
                  ) -> tuple[int, dict | None, str]:
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env={**stack.cli_env, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    text = out.decode()
    return proc.returncode, (json.loads(text) if text.strip() else None), err.decode()


async def stored(stack: EvalStack, run_name: str) -> int:
    rows = await stack.fetch("SELECT count(*) FROM writer.predictions p JOIN writer.runs r "
                             "ON r.id = p.run_id WHERE r.name = $1", run_name)
    return rows[0][0]


async def judgment_counts(stack: EvalStack, run_id: str) -> dict[tuple[str, int], int]:
    rows = await stack.fetch("SELECT criterion, status, count(*) FROM judge.judgments "
                             "WHERE run_id = $1::uuid GROUP BY criterion, status", run_id)
    return {(r[0], r[1]): r[2] for r in rows}


def calls(fake: FakeLlmServer, path: str) -> int:
    return sum(1 for r in fake.requests if r.path.startswith(path))


def spawn(command: list[str], env: dict[str, str], output: int) -> subprocess.Popen:
    """The CLI as a process the test can kill (stdin is no terminal)."""
    return subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=output, text=True)


async def kill_when(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not await condition():
        assert proc.poll() is None, f"{what}: the process ended before the kill"
        assert time.monotonic() < deadline, f"{what}: timed out"
        await asyncio.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


async def test_cli_killed_mid_run_resumes_without_duplicates(eval_stack, dataset):
    stack, name = eval_stack, "qa-openai"
    command = eval_command(dataset, "--name", name, "--llm", "openai/gpt-4o-mini",
                           "--criteria", "exact_match,chrf,helpfulness", "--yes",
                           "--chunk-size", "2")
    proc = spawn(command, stack.cli_env, subprocess.DEVNULL)

    async def some_stored() -> bool:
        return await stored(stack, name) >= 20

    await kill_when(proc, some_stored, "storing")
    at_kill = await stored(stack, name)
    assert 20 <= at_kill < ROWS, "the CLI was not killed while it stored"
    code, result, err = await run_cli(stack, command)
    assert code == 0, err
    assert result["rows"] == ROWS and result["failures"] == []
    assert result["already_stored"] + result["inserted"] == ROWS
    assert result["already_stored"] >= at_kill
    assert await stored(stack, name) == ROWS
    assert await judgment_counts(stack, result["run_id"]) == {
        ("exact_match", 1): ROWS, ("chrf", 1): ROWS, ("helpfulness", 1): ROWS}
    assert calls(stack.fake, OPENAI_PATH) == ROWS  # one paid call per prediction, none twice
    assert result["criteria"]["exact_match"]["pass_rate"] == pytest.approx(CORRECT / ROWS)
    assert result["criteria"]["helpfulness"]["mean_score"] == DEFAULT_SCORES["helpfulness"]
    assert result["judging"]["pending"] == 0 and result["judging"]["cost_usd"] > 0
    run = await stack.fetch("SELECT kind, state FROM writer.runs WHERE id = $1::uuid",
                            result["run_id"])
    assert tuple(run[0]) == (2, 2)  # RUN_KIND_EVALUATION, RUN_STATE_SUCCEEDED


async def test_fail_under_sets_the_exit_status(eval_stack, dataset):
    stack = eval_stack
    base = eval_command(dataset, "--name", "qa-openai", "--llm", "openai/gpt-4o-mini",
                        "--criteria", "exact_match,chrf,helpfulness", "--yes")
    code, result, err = await run_cli(stack, [*base, "--fail-under", "exact_match=pass:0.5",
                                              "--fail-under", "helpfulness=9"])
    assert code == 0, err
    assert [t["passed"] for t in result["thresholds"]] == [True, True]
    assert result["already_stored"] + result["inserted"] == ROWS
    before = calls(stack.fake, OPENAI_PATH)
    code, result, _ = await run_cli(stack, [*base, "--fail-under", "exact_match=pass:0.61",
                                            "--fail-under", "helpfulness=9"])
    assert code == 1
    assert [t["passed"] for t in result["thresholds"]] == [False, True]
    assert result["thresholds"][0]["measured"] == pytest.approx(0.6)
    code, result, _ = await run_cli(stack, [*base, "--fail-under", "helpfulness=9.5"])
    assert code == 1 and result["passed"] is False
    code, result, err = await run_cli(stack, [*base, "--fail-under", "clarity=1"])
    assert code == 2 and result is None
    assert "no judgment of: clarity" in err
    assert calls(stack.fake, OPENAI_PATH) == before  # nothing judged again


async def test_paid_judging_needs_a_terminal_or_yes(eval_stack, dataset):
    stack = eval_stack
    before = calls(stack.fake, ANTHROPIC_PATH)
    code, result, err = await run_cli(stack, eval_command(
        dataset, "--name", "qa-refused", "--llm", "anthropic/claude-3-5-haiku-latest"))
    assert code == 2 and result is None
    assert "LLM judging of 200" in err and "--yes" in err
    assert await stored(stack, "qa-refused") == 0
    assert calls(stack.fake, ANTHROPIC_PATH) == before


async def test_judge_killed_and_restarted_judges_everything_once(eval_stack, dataset, tmp_path):
    stack, name = eval_stack, "qa-anthropic"
    config = tmp_path / "judge.json"
    config.write_text(json.dumps({"rules": {"criteria": ["exact_match"]},
                                  "llm": {"provider": "anthropic",
                                          "model": "claude-3-5-haiku-latest",
                                          "criteria": ["accuracy"], "concurrency": 4}}))
    stack.fake.latency_s = 0.1
    before = calls(stack.fake, ANTHROPIC_PATH)
    proc = spawn(eval_command(dataset, "--name", name, "--judge-config", str(config), "--yes"),
                 stack.cli_env, subprocess.PIPE)
    try:
        judge = stack.services["judge"].popen

        async def judging_half_done() -> bool:
            return calls(stack.fake, ANTHROPIC_PATH) - before >= ROWS // 3

        await kill_when(judge, judging_half_done, "judging")
        killed_at = time.monotonic()
        stack.restart_judge()
        await _stack.wait_healthy(stack.args, stack.services["judge"])
        out, err = await asyncio.to_thread(proc.communicate, timeout=RUN_TIMEOUT_S)
    finally:
        stack.fake.latency_s = 0.02
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["inserted"] == ROWS and result["judging"]["pending"] == 0
    assert await judgment_counts(stack, result["run_id"]) == {
        ("exact_match", 1): ROWS, ("accuracy", 1): ROWS}
    repeated = repeated_calls(stack.fake, ANTHROPIC_PATH, killed_at)
    for first, *again in repeated:
        # asked again only when its first call was still unsettled in the dead judge: sent
        # before the kill and answered (if at all) at most SETTLE_S before it
        assert len(again) == 1 and first[0] < 0 and first[1] > -SETTLE_S, repeated
    assert calls(stack.fake, ANTHROPIC_PATH) - before == ROWS + len(repeated), repeated


def repeated_calls(fake: FakeLlmServer, path: str, killed_at: float) -> list:
    """Each prompt asked more than once: its calls' (arrival, finish) times relative to the
    kill (finish None: never answered)."""
    seen: dict[str, list] = {}
    for r in fake.requests:
        if r.path.startswith(path):
            finished = r.finished - killed_at if r.finished else None
            seen.setdefault(r.text, []).append(
                (r.arrived - killed_at, float("inf") if finished is None else finished))
    return [sorted(times) for times in seen.values() if len(times) > 1]


async def test_local_model_with_adapter(eval_stack, tmp_path):
    peft = pytest.importorskip("peft")
    from tests.trainer import tiny

    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer)
    tokenizer.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "model")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.reversal_rows(6)))
    code, result, err = await run_cli(eval_stack, eval_command(
        data, "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"),
        "--limit", "5", "--batch-size", "2", "--max-new-tokens", "4",
        "--criteria", "exact_match"))
    assert code == 0, err
    assert (result["source"], result["generated"], result["inserted"]) == ("model", 5, 5)
    assert str(tmp_path / "adapter") in result["model_name"]
    assert await judgment_counts(eval_stack, result["run_id"]) == {("exact_match", 1): 5}
    rows = await eval_stack.fetch("SELECT sample_index, prompt FROM writer.samples "
                                  "WHERE run_id = $1::uuid ORDER BY sample_index",
                                  result["run_id"])
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0][1] == tiny.reversal_rows(6)[0]["prompt"]


def answer_in_terminal(command: list[str], env: dict[str, str], answer: str
                       ) -> tuple[int, str, str]:
    """The CLI with a terminal on stdin (a pty) that types `answer`."""
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(controller, answer.encode())
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        os.close(controller)
        os.close(terminal)
    return proc.returncode, out, err


async def test_cost_confirmation_in_a_terminal(eval_stack, dataset):
    stack, name = eval_stack, "qa-confirm"
    command = eval_command(dataset, "--name", name, "--limit", "10",
                           "--llm", "anthropic/claude-3-5-haiku-latest", "--criteria", "clarity")
    before = calls(stack.fake, ANTHROPIC_PATH)
    code, _, err = await asyncio.to_thread(answer_in_terminal, command, stack.cli_env, "n\n")
    assert code == 1 and "stopped before any paid call" in err
    assert "LLM judging of 10 of 10 new rows" in err
    assert await stored(stack, name) == 0 and calls(stack.fake, ANTHROPIC_PATH) == before
    code, out, err = await asyncio.to_thread(answer_in_terminal, command, stack.cli_env, "y\n")
    assert code == 0, err
    result = json.loads(out)
    assert result["inserted"] == 10
    assert result["criteria"]["clarity"]["scored"] == 10
    assert calls(stack.fake, ANTHROPIC_PATH) == before + 10


async def test_endpoint_generates_missing_responses_once(eval_stack, tmp_path):
    stack = eval_stack
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"echo: say {i}"})
                            + "\n" for i in range(30)))
    command = eval_command(data, "--endpoint", "echo", "--endpoint-model", "m", "--limit", "20",
                           "--criteria", "exact_match", "--chunk-size", "8")
    code, result, err = await run_cli(stack, command)
    assert code == 0, err
    assert (result["source"], result["generated"], result["inserted"]) == ("endpoint", 20, 20)
    assert result["model_name"] == "echo/m"
    assert result["criteria"]["exact_match"]["pass_rate"] == 1.0
    rows = await stack.fetch("SELECT prediction FROM writer.predictions WHERE run_id = $1::uuid "
                             "ORDER BY sample_index", result["run_id"])
    assert [r[0] for r in rows] == [f"{ECHO_PREFIX}say {i}" for i in range(20)]
    asked = len(stack.echo.requests)
    assert asked == 20
    code, result, err = await run_cli(stack, command)
    assert code == 0, err
    assert (result["already_stored"], result["generated"], result["inserted"]) == (20, 0, 0)
    assert len(stack.echo.requests) == asked


async def test_unfinished_judging_does_not_pass(eval_stack, dataset):
    stack, name = eval_stack, "qa-unfinished"
    command = eval_command(dataset, "--name", name, "--limit", "30", "--yes",
                           "--llm", "anthropic/claude-3-5-haiku-latest", "--criteria", "safety")
    stack.fake.latency_s = 0.5
    try:
        code, result, err = await run_cli(stack, command,
                                          {"EPOCHLENS_CLI_EVAL_WAIT_S": "0"})
    finally:
        stack.fake.latency_s = 0.02
    assert code == 1, err
    assert result["judging"]["complete"] is False and result["judging"]["pending"] > 0
    assert result["inserted"] == 30 and result["passed"] is False
    code, result, err = await run_cli(stack, command)
    assert code == 0, err
    assert result["judging"]["complete"] is True and result["already_stored"] == 30
    assert result["criteria"]["safety"]["scored"] == 30
