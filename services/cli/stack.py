"""`epochlens up` / `epochlens down`: the docker-compose stack as local processes.

The same steps as docker-compose.yml: migrate, then judge, writer, query and web,
each waited on through its health service (the web service's /healthz over HTTP, or HTTPS
when it has a certificate; it is pointed at the query service started here unless
EPOCHLENS_WEB_QUERY_ADDRESS is set). The health checks are made as the CLI: over TLS when
EPOCHLENS_CLI_TLS_* ask for it, as services configured with TLS need.
Pid files and logs go to the state dir.
Before anything starts, every service's settings are loaded (a bad or missing setting is one
ConfigurationError naming them all) and the public example secrets of .env.example are
refused unless allow_example_secrets is set.
"""

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.cli.config import CliSettings
from services.common.config import ENV_FILE, AuthSettings
from services.common.health import wait_until_serving
from services.common.server import port_in_use
from services.common.startup import ConfigurationError, example_secrets_in_use, load_settings
from services.judge.config import JudgeSettings
from services.query.config import QuerySettings
from services.web.config import WebSettings
from services.writer.config import MigrateSettings, WriterSettings
from trainer_client.tls import ClientTLS, TLSFileError

SERVICES = (("judge", "services.judge.server"), ("writer", "services.writer.server"),
            ("query", "services.query.server"), ("web", "services.web.server"))


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EPOCHLENS_STACK_", env_file=ENV_FILE,
                                      extra="ignore")

    state_dir: Path = Field(Path(".run"), description="Pid files and service logs.")
    start_timeout_s: float = Field(30.0, gt=0, description="Wait for a service to be healthy.")
    stop_timeout_s: float = Field(10.0, gt=0, description="Wait after SIGTERM before SIGKILL.")
    health_poll_s: float = Field(0.2, gt=0, description="Pause between health checks.")
    allow_example_secrets: bool = Field(
        False, description="Start even when the auth or page token secret is the public "
        "example value of .env.example (only for a stack nobody else can reach).")


class StackError(RuntimeError):
    """A step of bringing the stack up or down failed; the message says which and why."""


def up(settings: StackSettings) -> dict[str, str]:
    """Checks the configuration, migrates, starts the services, waits until healthy.
    Returns name -> address. A service already running is a StackError before anything
    is migrated or started."""
    auth, judge, writer, query, web, _, cli = load_settings(
        AuthSettings, JudgeSettings, WriterSettings, QuerySettings, WebSettings, MigrateSettings,
        CliSettings)
    refuse_example_secrets(settings, (auth, query))
    checks = HealthChecks(settings, _health_tls(cli), cli.tls_ca_file)
    already = running(settings)
    if already:
        raise StackError("already running: " + ", ".join(
            f"{name} (pid {pid}, pid file {_pid_file(settings, name)})"
            for name, pid in already.items()) + "; nothing was started (`epochlens down` "
            "stops them)")
    _refuse_busy_ports({"judge": judge, "writer": writer, "query": query, "web": web})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    migrate = subprocess.run([sys.executable, "-m", "services.writer.migrate"],
                             capture_output=True, text=True)
    if migrate.returncode != 0:
        raise StackError(f"migrate failed:\n{migrate.stderr[-2000:]}")
    scheme = "https" if web.tls_cert_file is not None else "http"
    addresses = {"judge": _address(judge), "writer": _address(writer), "query": _address(query),
                 "web": f"{scheme}://{_address(web)}"}
    environments = {"web": _web_environment(web, addresses["query"])}
    for name, module in SERVICES:
        log = (settings.state_dir / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, "-m", module], stdout=log, stderr=log,
                                   start_new_session=True, env=environments.get(name))
        _pid_file(settings, name).write_text(str(process.pid))
    for name, _ in SERVICES:
        _wait_healthy(checks, name, addresses[name])
    return addresses


@dataclass(frozen=True)
class HealthChecks:
    """How up() asks the services whether they are healthy: as the CLI does, over TLS when
    the EPOCHLENS_CLI_TLS_* settings ask for it (services configured with TLS need them)."""

    settings: StackSettings
    tls: ClientTLS | None
    ca_file: Path | None


def _health_tls(cli: CliSettings) -> ClientTLS | None:
    try:
        return ClientTLS.from_settings(cli)
    except TLSFileError as exc:
        raise StackError(f"TLS of the health checks (EPOCHLENS_CLI_TLS_*): {exc}") from None


def _refuse_busy_ports(services: dict[str, BaseSettings]) -> None:
    """StackError when a service's port is taken by a process this stack did not start:
    its health check would be answered by that process while the new one fails to bind."""
    busy = [f"{name} {svc.host}:{svc.port}" for name, svc in services.items()
            if svc.port and port_in_use(svc.host, svc.port)]
    if busy:
        raise StackError("port in use by another process: " + ", ".join(busy)
                         + "; nothing was started")


def refuse_example_secrets(settings: StackSettings, loaded: tuple[BaseSettings, ...]) -> None:
    """ConfigurationError when a secret among `loaded` is the one .env.example publishes,
    unless settings.allow_example_secrets."""
    names = example_secrets_in_use(loaded)
    if not names or settings.allow_example_secrets:
        return
    raise ConfigurationError(
        [f"{name}: the public example value of .env.example" for name in names]
        + ["set secrets of your own (`make .env` writes a new .env with fresh ones), or "
           "EPOCHLENS_STACK_ALLOW_EXAMPLE_SECRETS=true for a stack nobody else can reach"])


def running(settings: StackSettings) -> dict[str, int]:
    """name -> pid of each service whose pid file names a live process."""
    pids = {name: _running_pid(settings, name) for name, _ in SERVICES}
    return {name: pid for name, pid in pids.items() if pid is not None}


def down(settings: StackSettings) -> list[str]:
    """Stops every service that up() started. Returns the names stopped."""
    stopped = []
    for name, _ in SERVICES:
        pid = _running_pid(settings, name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            _wait_exit(pid, settings.stop_timeout_s)
            stopped.append(name)
        _pid_file(settings, name).unlink(missing_ok=True)
    return stopped


def _web_environment(web: WebSettings, query_address: str) -> dict[str, str]:
    """The web service's environment: the query service started here, unless its own
    query_address is set (in the environment or .env)."""
    if "query_address" in web.model_fields_set:
        return dict(os.environ)
    return {**os.environ, "EPOCHLENS_WEB_QUERY_ADDRESS": query_address}


def _address(settings: JudgeSettings | WriterSettings | QuerySettings | WebSettings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "[::]") else settings.host
    return f"{host}:{settings.port}"


def _pid_file(settings: StackSettings, name: str) -> Path:
    return settings.state_dir / f"{name}.pid"


def _running_pid(settings: StackSettings, name: str) -> int | None:
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _wait_healthy(checks: HealthChecks, name: str, address: str) -> None:
    settings = checks.settings

    def still_starting() -> bool:
        return _running_pid(settings, name) is not None

    if address.startswith(("http://", "https://")):
        healthy = _wait_http_ok(f"{address}/healthz", checks, still_starting)
    else:
        healthy = wait_until_serving(address, settings.start_timeout_s, settings.health_poll_s,
                                     still_starting, checks.tls)
    if healthy:
        return
    log_tail = (settings.state_dir / f"{name}.log").read_text(errors="replace")[-2000:]
    raise StackError(f"{name} did not become healthy at {address}; its log ends:\n{log_tail}")


def _wait_http_ok(url: str, checks: HealthChecks, still_starting) -> bool:
    """True once GET url answers 200 (an https URL's certificate checked against the CLI's
    tls_ca_file, else the system's CAs); False after start_timeout_s or once the process is
    gone."""
    settings = checks.settings
    context = ssl.create_default_context(cafile=checks.ca_file)
    deadline = time.monotonic() + settings.start_timeout_s
    while time.monotonic() < deadline and still_starting():
        try:
            with urllib.request.urlopen(url, timeout=settings.health_poll_s * 5,
                                        context=context) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(settings.health_poll_s)
    return False


def _wait_exit(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
