"""Builds and runs a gRPC server: interceptors, health, reflection, graceful stop.

create_server() is separate from serve() so tests start the very same server
on port 0. A port another process listens on is refused (PortInUse), never shared:
gRPC's SO_REUSEPORT is turned off, so a second server cannot split the traffic of the
first. run_service() turns every start-up failure (configuration, port, schema) into one
line on stderr and a non-zero exit (services.common.startup).
"""

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import TokenVerifier
from services.common.config import AuthSettings, ServiceSettings
from services.common.interceptors import ServiceInterceptor
from services.common.startup import StartupError, example_secrets_in_use, exit_with, load_settings
from services.common.telemetry import logs
from services.common.telemetry.metrics import (
    MetricsEndpoint,
    rpc_interceptors,
    start_metrics_endpoint,
)
from services.common.telemetry.tracing import install_tracing, server_interceptors, shutdown_tracing
from services.common.tls import server_credentials, transport
from services.common.validation import EdgeLimits, RequestChecker

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    """A started server and what is needed to stop it cleanly."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    on_stop: Callable[[], Awaitable[None]] | None = None
    metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Reports NOT_SERVING, lets in-flight RPCs finish for grace_s, then runs on_stop."""
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
        if self.metrics is not None:
            self.metrics.close()
        if self.on_stop is not None:
            await self.on_stop()


async def create_server(settings: ServiceSettings, auth: AuthSettings, registrar: Registrar,
                        service_names: Sequence[str],
                        on_failure: Callable[[], Awaitable[None]] | None = None,
                        ) -> RunningServer:
    """Starts a server with the given servicers registered; binds settings.host:settings.port.
    When it cannot start (PortInUse: another process listens there) on_failure runs first,
    to release what the caller opened for it, and the StartupError is raised."""
    try:
        return await _create_server(settings, auth, registrar, service_names)
    except StartupError:
        if on_failure is not None:
            await on_failure()
        raise


async def _create_server(settings: ServiceSettings, auth: AuthSettings, registrar: Registrar,
                         service_names: Sequence[str]) -> RunningServer:
    if port_in_use(settings.host, settings.port):
        raise PortInUse(settings.host, settings.port)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # On by default in gRPC: a second server on the same port would share its traffic.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        interceptors=[*server_interceptors(settings), *rpc_interceptors(settings),
                      _interceptor(settings, auth)], options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    registrar(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = await _bind(server, settings)
    await server.start()
    metrics = await _start_metrics(server, settings)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ", ".join(service_names), settings.host, port)
    return RunningServer(server, port, health_servicer, service_names, metrics=metrics)


class PortInUse(StartupError):
    """Another process listens on the port this server was configured for."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is already in use")


def port_in_use(host: str, port: int) -> bool:
    """Whether a socket cannot bind host:port because something listens there (port 0: no).
    Probed with SO_REUSEADDR, as gRPC binds, so a port in TIME_WAIT is not "in use"."""
    if port == 0:
        return False
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # gRPC reports the bad host itself when it binds
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


async def _bind(server: grpc.aio.Server, settings: ServiceSettings) -> int:
    """server.add_secure_port when TLS is configured (services.common.tls), else
    add_insecure_port; a failure (unusable TLS files, a port taken since the probe, a host
    that is not this machine's) stops the unstarted server and is a StartupError."""
    host, port = settings.host, settings.port
    try:
        credentials = server_credentials(settings)
        bound = (server.add_secure_port(f"{host}:{port}", credentials)
                 if credentials is not None else server.add_insecure_port(f"{host}:{port}"))
        log.info("%s:%d speaks %s", host, bound, transport(settings))
        return bound
    except StartupError:
        await server.stop(None)
        raise
    except RuntimeError as exc:
        await server.stop(None)
        if port_in_use(host, port):
            raise PortInUse(host, port) from exc
        raise StartupError(f"cannot bind port {port} on {host}: {exc}") from exc


async def _start_metrics(server: grpc.aio.Server, settings: ServiceSettings
                         ) -> MetricsEndpoint | None:
    """The /metrics endpoint (metrics_port set); when it cannot start, the server stops."""
    try:
        return start_metrics_endpoint(settings.metrics_host, settings.metrics_port)
    except StartupError:
        await server.stop(None)
        raise


def _interceptor(settings: ServiceSettings, auth: AuthSettings) -> ServiceInterceptor:
    checker = RequestChecker(EdgeLimits(max_abs_integer=settings.max_abs_integer,
                                        max_struct_depth=settings.max_struct_depth))
    return ServiceInterceptor(TokenVerifier(auth), checker, settings.max_reported_violations)


async def serve_until_signalled(running: RunningServer, grace_s: float) -> None:
    """Blocks until SIGINT/SIGTERM, then stops the server gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping (grace %.1fs)", grace_s)
    finally:
        await running.stop(grace_s)


def run_service(settings_class: type[ServiceSettings],
                start: Callable[[Any, AuthSettings], Awaitable[RunningServer]]) -> None:
    """A service's entry point: loads its settings and the auth settings, configures logging,
    starts the server with `start`, and serves until SIGINT/SIGTERM. A start-up failure is
    one line on stderr, `configuration error: ...` (exit 2) or `<service>: ...` (exit 1)."""
    label = service_label(settings_class)
    try:
        settings, auth = load_settings(settings_class, AuthSettings)
        asyncio.run(_serve(settings, auth, start, label))
    except StartupError as exc:
        exit_with(exc, label)


async def _serve(settings: ServiceSettings, auth: AuthSettings,
                 start: Callable[[Any, AuthSettings], Awaitable[RunningServer]],
                 label: str) -> None:
    configure_logging(settings.log_level, settings.log_format)
    install_tracing(settings, label)
    for name in example_secrets_in_use((settings, auth)):
        log.warning("%s is the public example value from .env.example: anyone can use it to "
                    "mint or forge tokens for this service; set a secret of your own (`make "
                    ".env` writes fresh ones)", name)
    try:
        running = await start(settings, auth)
        await serve_until_signalled(running, settings.shutdown_grace_s)
    finally:
        shutdown_tracing()


def service_label(settings_class: type[ServiceSettings]) -> str:
    """The service's short name, from its env prefix: EPOCHLENS_WRITER_ -> writer."""
    prefix = settings_class.model_config.get("env_prefix") or settings_class.__name__
    return prefix.removeprefix("EPOCHLENS_").strip("_").lower()


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging: text or JSON lines (services.common.telemetry.logs)."""
    logs.configure_logging(level, log_format)
