"""Entry point of the web service: `epochlens-web`.

start() binds the socket itself (port 0 picks a free one; a port in use is a StartupError,
never shared) and runs uvicorn on it in the current event loop, so tests start the very
same server in-process. Stopping (SIGINT/SIGTERM in main, stop() in tests) first closes the
open event streams, then lets uvicorn finish in-flight requests for shutdown_grace_s, then
the lifespan closes the channel to the query service. Start-up failures are one line on
stderr (services.common.startup).
"""

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import uvicorn

from services.common.server import PortInUse, configure_logging, port_in_use
from services.common.startup import StartupError, exit_with, load_settings
from services.common.telemetry.metrics import start_metrics_endpoint
from services.web.app import create_app
from services.web.config import WebSettings
from services.web.state import WebState
from trainer_client.tls import TLSFileError, read_key_pair

log = logging.getLogger(__name__)


@dataclass
class RunningWeb:
    """A started web server and how to stop it."""

    server: uvicorn.Server
    state: WebState
    task: asyncio.Task
    host: str
    port: int
    https: bool = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"{'https' if self.https else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        """Closes the event streams, then stops uvicorn gracefully and waits for it."""
        self.state.stopping.set()
        self.server.should_exit = True
        await self.task


async def start(settings: WebSettings) -> RunningWeb:
    """Starts the web service on settings.host:settings.port (0 = a free port): HTTPS when
    tls_cert_file and tls_key_file are set (checked first: a StartupError when unusable)."""
    https = _check_https(settings)
    app, state = create_app(settings)
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(app, lifespan="on", log_config=None, server_header=False,
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            ssl_certfile=settings.tls_cert_file if https else None,
                            ssl_keyfile=settings.tls_key_file if https else None)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    try:
        await server.startup(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits when the app's lifespan fails to start
        sock.close()
        raise StartupError("the app did not start (see the log above)") from exc
    port = sock.getsockname()[1]
    log.info("web service on %s://%s:%d", "https" if https else "http", settings.host, port)
    task = asyncio.create_task(_serve(server, sock), name="epochlens-web")
    return RunningWeb(server, state, task, settings.host, port, https)


def _check_https(settings: WebSettings) -> bool:
    """Whether the web service serves HTTPS; its certificate and key are read and checked to
    be a pair first, so an unusable file is one StartupError line, not a traceback."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return False
    try:
        read_key_pair(settings.tls_cert_file, settings.tls_key_file)
    except TLSFileError as exc:
        raise StartupError(str(exc)) from None
    return True


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    await server.main_loop()
    await server.shutdown(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); PortInUse when another process
    listens there."""
    if port_in_use(host, port):
        raise PortInUse(host, port)
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it a response's headers and body wait on Nagle (40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind port {port} on {host}: {exc}") from exc
    sock.set_inheritable(True)
    return sock


async def serve(settings: WebSettings) -> None:
    """Runs the web service until SIGINT/SIGTERM (or until uvicorn stops on its own)."""
    configure_logging(settings.log_level, settings.log_format)
    metrics = start_metrics_endpoint(settings.metrics_host, settings.metrics_port)
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, running.task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    log.info("stopping (grace %.1fs)", settings.shutdown_grace_s)
    await running.stop()
    if metrics is not None:
        metrics.close()


def main() -> None:
    try:
        (settings,) = load_settings(WebSettings)
        asyncio.run(serve(settings))
    except StartupError as exc:
        exit_with(exc, "web")


if __name__ == "__main__":
    main()
