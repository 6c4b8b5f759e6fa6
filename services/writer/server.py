"""Entry point of the writer service: `epochlens-writer`."""

import asyncio

from epochlens.v1 import writer_pb2, writer_pb2_grpc
from services.common.config import AuthSettings
from services.common.db import create_engine
from services.common.server import (
    RunningServer,
    configure_logging,
    create_server,
    serve_until_signalled,
)
from services.writer.config import WriterSettings
from services.writer.models import SCHEMA
from services.writer.repository import WriterRepository
from services.writer.servicer import WriterServicer

SERVICE_NAME = writer_pb2.DESCRIPTOR.services_by_name["PredictionWriterService"].full_name


async def start(settings: WriterSettings, auth: AuthSettings) -> RunningServer:
    """Starts the writer on settings.host:settings.port (0 = a free port)."""
    engine = create_engine(settings, (SCHEMA,), application_name="epochlens-writer")
    servicer = WriterServicer(WriterRepository(engine), settings)
    running = await create_server(
        settings, auth,
        lambda server: writer_pb2_grpc.add_PredictionWriterServiceServicer_to_server(
            servicer, server),
        [SERVICE_NAME])
    running.on_stop = engine.dispose
    return running


async def _serve() -> None:
    settings, auth = WriterSettings(), AuthSettings()
    configure_logging(settings.log_level)
    running = await start(settings, auth)
    await serve_until_signalled(running, settings.shutdown_grace_s)


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
