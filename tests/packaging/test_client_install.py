"""The light client (clients/python, distribution epochlens-client) as a training environment
gets it: built from this checkout into a fresh virtual environment, with none of the server
packages, and the upload API importing without torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
PIP_TIMEOUT_S = 300
SERVER_PACKAGES = {"sqlalchemy", "asyncpg", "alembic", "openai", "anthropic", "sacrebleu",
                   "rapidfuzz", "typer", "torch", "transformers", "aiosqlite", "pyjwt",
                   "grpcio-reflection", "grpcio-health-checking", "google-re2", "rich"}
HEAVY_MODULES = ["torch", "transformers", "sqlalchemy", "typer", "services"]
UPLOAD_MODULES = ["trainer_client.config", "trainer_client.credentials", "trainer_client.spool",
                  "trainer_client.payload", "trainer_client.streaming", "trainer_client.offline",
                  "trainer_client.cli", "trainer_client.results", "trainer_client.run",
                  "trainer_client.tracing"]

IMPORT_CHECK = """
import importlib, importlib.util, json, sys
import trainer_client
from trainer_client.streaming import StreamingClient
modules = sys.argv[1].split(",")
for name in modules:
    importlib.import_module(name)
heavy = sys.argv[2].split(",")
def callback_error():
    try:
        trainer_client.PredictionsCallback
    except ModuleNotFoundError as exc:
        return [exc.name, str(exc)]
    return None
print(json.dumps({
    "streaming_client": StreamingClient.__module__,
    "lazy_streaming_client": trainer_client.StreamingClient is StreamingClient,
    "loaded_heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "demo_installed": importlib.util.find_spec("trainer_client.demo") is not None,
    "trainer_client_file": trainer_client.__file__,
    "lazy_run": trainer_client.Run.__module__,
    "callback_without_torch": callback_error(),
}))
"""


def pip(venv_python: Path, *args: str) -> subprocess.CompletedProcess:
    """The project's pip acting on venv_python's environment (`pip --python`)."""
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), *args],
                            capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert result.returncode == 0, f"pip {args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv (no pip, no site packages) holding only epochlens-client and its needs."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    pip(python, "install", "--quiet", str(CLIENT))
    return python


def installed(python: Path) -> dict[str, str]:
    listed = json.loads(pip(python, "list", "--format=json").stdout)
    return {row["name"].lower().replace("_", "-"): row["version"] for row in listed}


def test_client_install_has_none_of_the_server_packages(client_venv):
    packages = installed(client_venv)
    assert packages["epochlens-client"] == "0.1.0"
    assert sorted(SERVER_PACKAGES & set(packages)) == []
    assert {"grpcio", "protobuf", "googleapis-common-protos", "pydantic-settings"} <= set(packages)


def test_client_declares_exactly_the_upload_dependencies(client_venv):
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps(m.requires('epochlens-client')))")
    out = subprocess.run([str(client_venv), "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == [
        "grpcio>=1.85.1", "protobuf<8,>=7.35.1", "googleapis-common-protos>=1.66",
        "pydantic-settings>=2.6", 'torch>=2.4; extra == "torch"',
        'transformers>=5.0; extra == "torch"', 'accelerate>=1.10; extra == "torch"']


def test_upload_api_imports_without_torch(client_venv, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([str(client_venv), "-c", IMPORT_CHECK, ",".join(UPLOAD_MODULES),
                             ",".join(HEAVY_MODULES)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    site = str(client_venv.parent.parent / "lib")
    assert report.pop("trainer_client_file").startswith(site)
    # callback.py imports transformers and torch; whichever it imports first is named.
    missing, message = report.pop("callback_without_torch")
    assert missing in ("torch", "transformers")
    assert message == (f"trainer_client.PredictionsCallback needs {missing}, which is not "
                       "installed: pip install 'epochlens-client[torch]' (or the torch extra "
                       "of your install)")
    assert report == {"streaming_client": "trainer_client.streaming",
                      "lazy_streaming_client": True, "loaded_heavy": [],
                      "torch_installed": False, "demo_installed": False,
                      "lazy_run": "trainer_client.run"}


def test_epochlens_sync_runs_from_the_light_install(client_venv, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    spool = tmp_path / "spool"
    spool.mkdir()
    sync = client_venv.parent / "epochlens-sync"
    result = subprocess.run([str(sync), "--spool-dir", str(spool)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "nothing to sync\n"), result.stderr
    bad = subprocess.run([str(sync), "--finish", "maybe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    # argparse quotes the choices on some Python versions and not on others.
    assert bad.stderr.splitlines()[-1].replace("'cancelled'", "cancelled").replace(
        "'failed'", "failed").replace("'succeeded'", "succeeded") == (
        "epochlens-sync: error: argument --finish: invalid choice: 'maybe' "
        "(choose from cancelled, failed, succeeded)")

