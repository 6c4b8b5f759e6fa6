"""Builds and runs a gRPC server: interceptors, health, reflection, graceful stop.

create_server() is separate from serve() so tests start the very same server
on port 0.
"""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import TokenVerifier
from services.common.config import AuthSettings, ServiceSettings
from services.common.interceptors import ServiceInterceptor

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

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Reports NOT_SERVING, lets in-flight RPCs finish for grace_s, then runs on_stop."""
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
        if self.on_stop is not None:
            await self.on_stop()


async def create_server(settings: ServiceSettings, auth: AuthSettings, registrar: Registrar,
                        service_names: Sequence[str]) -> RunningServer:
    """Starts a server with the given servicers registered; binds settings.host:settings.port."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    server = grpc.aio.server(
        interceptors=[ServiceInterceptor(TokenVerifier(auth))], options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    registrar(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ", ".join(service_names), settings.host, port)
    return RunningServer(server, port, health_servicer, service_names)


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


def run_service(settings: ServiceSettings,
                start: Callable[[Any, AuthSettings], Awaitable[RunningServer]]) -> None:
    """A service's entry point: configures logging, starts the server with `start`, and
    serves until SIGINT/SIGTERM."""
    async def serve() -> None:
        configure_logging(settings.log_level)
        running = await start(settings, AuthSettings())
        await serve_until_signalled(running, settings.shutdown_grace_s)

    asyncio.run(serve())


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
