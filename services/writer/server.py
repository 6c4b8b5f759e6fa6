"""Entry point of the writer service: `epochlens-writer`."""


from epochlens.v1 import (
    auth_pb2_grpc,
    evaluation_pb2,
    evaluation_pb2_grpc,
    writer_pb2,
    writer_pb2_grpc,
)
from services.common.config import AuthSettings
from services.common.schema_check import open_engine
from services.common.server import (
    RunningServer,
    create_server,
    run_service,
)
from services.common.tls import client_tls
from services.writer.api_keys import ApiKeyRepository
from services.writer.auth_servicer import SERVICE_NAME as AUTH_SERVICE_NAME
from services.writer.auth_servicer import AuthServicer
from services.writer.config import WriterSettings
from services.writer.deletion import JudgePurge, RunDeleter
from services.writer.evaluation import EvaluationServicer
from services.writer.judge_check import JudgeConfigCheck
from services.writer.models import SCHEMA
from services.writer.outbox import OutboxDispatcher
from services.writer.repository import WriterRepository
from services.writer.servicer import WriterServicer
from services.writer.telemetry import outbox_gauge

SERVICE_NAME = writer_pb2.DESCRIPTOR.services_by_name["PredictionWriterService"].full_name
EVALUATION_SERVICE_NAME = evaluation_pb2.DESCRIPTOR.services_by_name[
    "EvaluationService"].full_name


async def start(settings: WriterSettings, auth: AuthSettings) -> RunningServer:
    """Starts the writer on settings.host:settings.port (0 = a free port) and its retention
    sweep; with a judge_address, also the judge outbox dispatcher (stopped after the
    server), the judge's check of CreateRun's judge section and DeleteRun's PurgeRun over
    the dispatcher's channel (TLS from the judge_tls* settings, read before anything is
    opened)."""
    judging = settings.judge_address is not None
    judge_tls = client_tls(settings, "judge_", "judge service") if judging else None
    engine = await open_engine(settings, (SCHEMA,), application_name="epochlens-writer")
    repository = WriterRepository(engine, judging=judging)
    dispatcher = (OutboxDispatcher(engine, settings, auth, repository.seconds_since_commit,
                                   judge_tls) if judging else None)
    check = JudgeConfigCheck(dispatcher.stub, auth, settings) if dispatcher else None
    deleter = RunDeleter(engine, settings,
                         JudgePurge(dispatcher.stub, auth, settings) if dispatcher else None)
    servicer = WriterServicer(repository, settings, check, deleter)
    evaluation = EvaluationServicer(repository, settings, auth,
                                    dispatcher.stub if dispatcher else None, check)
    keys = AuthServicer(ApiKeyRepository(engine, settings.api_key_max_per_user), settings, auth)
    gauge = outbox_gauge(engine, settings)

    async def on_stop() -> None:
        await deleter.stop()
        if gauge is not None:
            await gauge.stop()
        if dispatcher is not None:
            await dispatcher.stop()
        await engine.dispose()

    def register(server) -> None:
        writer_pb2_grpc.add_PredictionWriterServiceServicer_to_server(servicer, server)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(keys, server)
        evaluation_pb2_grpc.add_EvaluationServiceServicer_to_server(evaluation, server)

    running = await create_server(settings, auth, register,
                                  [SERVICE_NAME, AUTH_SERVICE_NAME, EVALUATION_SERVICE_NAME],
                                  on_failure=on_stop)
    if dispatcher is not None:
        dispatcher.start()
    deleter.start()
    if gauge is not None:
        gauge.start()
    running.on_stop = on_stop
    return running


def main() -> None:
    run_service(WriterSettings, start)


if __name__ == "__main__":
    main()
