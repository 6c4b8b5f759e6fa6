"""Entry point of the judge service: `epochlens-judge`. The queue workers start with the server
and stop after it: in-flight RPCs finish, batches in progress get shutdown_grace_s to settle."""


from epochlens.v1 import judge_pb2, judge_pb2_grpc
from services.common.config import AuthSettings
from services.common.schema_check import open_engine
from services.common.server import (
    RunningServer,
    create_server,
    run_service,
)
from services.judge.config import JudgeSettings
from services.judge.generation import Generator
from services.judge.models import SCHEMA
from services.judge.pairwise.worker import PairwiseWorkers
from services.judge.queue import JudgeWorkers, Judging
from services.judge.servicer import JudgeServicer
from services.judge.store import JudgeStore
from services.judge.telemetry import queue_gauge
from services.writer.models import SCHEMA as WRITER_SCHEMA

SERVICE_NAME = judge_pb2.DESCRIPTOR.services_by_name["JudgeService"].full_name


async def start(settings: JudgeSettings, auth: AuthSettings) -> RunningServer:
    """Starts the judge on settings.host:settings.port (0 = a free port) with its workers."""
    # Schema writer too: the judge reads runs and predictions acting for a user
    # (services.judge.stored).
    engine = await open_engine(settings, (SCHEMA, WRITER_SCHEMA),
                               application_name="epochlens-judge")
    store = JudgeStore(engine)
    judging = Judging(settings, engine)
    workers = JudgeWorkers(settings, store, judging)
    generator = Generator(settings)
    pairwise = PairwiseWorkers(settings, engine)
    servicer = JudgeServicer(settings, store, judging, workers, generator, pairwise)
    gauge = queue_gauge(engine, settings)

    async def on_stop() -> None:
        try:
            if gauge is not None:
                await gauge.stop()
            await workers.stop(settings.shutdown_grace_s)
            await pairwise.stop(settings.shutdown_grace_s)
            await judging.close()
            await pairwise.close()
            await generator.aclose()
        finally:
            await engine.dispose()

    running = await create_server(
        settings, auth,
        lambda server: judge_pb2_grpc.add_JudgeServiceServicer_to_server(servicer, server),
        [SERVICE_NAME], on_failure=on_stop)
    workers.start()
    pairwise.start()
    if gauge is not None:
        gauge.start()
    running.on_stop = on_stop
    return running


def main() -> None:
    run_service(JudgeSettings, start)


if __name__ == "__main__":
    main()
