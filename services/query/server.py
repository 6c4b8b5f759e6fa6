"""Entry point of the query service: `epochlens-query`."""

from epochlens.v1 import query_pb2, query_pb2_grpc
from services.common.config import AuthSettings
from services.common.db import is_postgres
from services.common.schema_check import open_engine
from services.common.server import (
    RunningServer,
    create_server,
    run_service,
)
from services.judge.models import SCHEMA as JUDGE_SCHEMA
from services.query.config import QuerySettings
from services.query.repository import QueryRepository
from services.query.servicer import QueryServicer
from services.query.watch import CommitListener, CommitSignals
from services.writer.models import SCHEMA as WRITER_SCHEMA

SERVICE_NAME = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name


async def start(settings: QuerySettings, auth: AuthSettings) -> RunningServer:
    """Starts the query service on settings.host:settings.port (0 = a free port)."""
    engine = await open_engine(settings, (WRITER_SCHEMA, JUDGE_SCHEMA), read_only=True,
                               application_name="epochlens-query")
    signals = CommitSignals()
    listener = CommitListener(engine, signals, settings) if is_postgres(engine) else None
    servicer = QueryServicer(QueryRepository(engine), settings, signals, listener is not None)
    running = await create_server(
        settings, auth,
        lambda server: query_pb2_grpc.add_QueryServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], on_failure=engine.dispose)
    if listener is not None:
        listener.start()

    async def stop() -> None:
        if listener is not None:
            await listener.stop()
        await engine.dispose()
    running.on_stop = stop
    return running


def main() -> None:
    run_service(QuerySettings, start)


if __name__ == "__main__":
    main()
