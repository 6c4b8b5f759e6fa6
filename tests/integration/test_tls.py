"""TLS and mutual TLS with real servers and certificates made on the spot (tests/pki.py), on
the embedded SQLite store: a judge that requires client certificates (mutual TLS), a writer
and a query service that serve TLS, the writer's hand-off to the judge over mutual TLS end
to end, the refusals (plaintext client, untrusted server CA, no client certificate, a client
certificate of another CA), the web service over HTTPS to a TLS query service, the CLI and
the trainer's streaming client over TLS, and unusable files at start-up."""

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from epochlens.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    writer_pb2,
    writer_pb2_grpc,
)
from services.cli.main import app
from services.common.auth import mint_token
from services.common.convert import dict_to_struct
from services.common.health import wait_until_serving
from services.common.server import RunningServer
from services.common.startup import ConfigurationError, StartupError, load_settings
from services.judge.config import JudgeSettings
from services.judge.server import start as start_judge
from services.query.config import QuerySettings
from services.query.server import start as start_query
from services.web.config import WebSettings
from services.web.server import start as start_web
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.server import start as start_writer
from tests.conftest import PAGE_SECRET
from tests.e2e.test_startup import BIN, bare_env, one_line_failure
from tests.helpers import item
from tests.pki import Pki, make_pki
from trainer_client.cli import run as sync_main
from trainer_client.config import PredictionsConfig
from trainer_client.credentials import ApiKeyCredentials, CredentialsError, CredentialSettings
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient
from trainer_client.tls import ClientTLS, TLSFileError, open_aio_channel

USER = "tls-user"
# One rule criterion: one judgment per prediction, and CreateRun's judge check has a section
# to send to the judge (over the writer's mutual TLS channel).
JUDGE_CONFIG = {"judge": {"rules": {"criteria": ["exact_match"]}}}
WAIT_S = 30.0


@dataclass
class TlsStack:
    pki: Pki
    judge: RunningServer
    writer: RunningServer
    query: RunningServer
    sqlite_dir: Path
    auth: object

    def metadata(self, user: str = USER) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {mint_token(self.auth, user)}"),)

    def tls(self, **fields) -> ClientTLS:
        """A client's TLS trusting the stack's CA (fields override)."""
        return ClientTLS(root_certificates=self.pki.ca.read_bytes(), **fields)


def common(sqlite_dir: Path, pki: Pki, **fields) -> dict:
    return {"port": 0, "shutdown_grace_s": 0.2, "sqlite_dir": sqlite_dir, "_env_file": None,
            "tls_cert_file": pki.server.cert, "tls_key_file": pki.server.key, **fields}


def writer_settings(stack_dir: Path, pki: Pki, judge: RunningServer, **judge_tls) -> WriterSettings:
    return WriterSettings(judge_address=judge.address, outbox_poll_s=0.05,
                          outbox_backoff_base_s=0.1, outbox_backoff_max_s=0.5,
                          judge_check_timeout_s=5.0, judge_tls_ca_file=pki.ca,
                          **common(stack_dir, pki), **judge_tls)


@pytest.fixture(scope="module")
async def tls_stack(tmp_path_factory, auth_settings) -> AsyncIterator[TlsStack]:
    """Judge (mutual TLS required), writer (TLS; mutual TLS to the judge) and query (TLS)."""
    folder = tmp_path_factory.mktemp("tls")
    pki = make_pki(folder)
    sqlite_dir = folder / "store"
    await migrate(MigrateSettings(sqlite_dir=sqlite_dir, _env_file=None))
    judge = await start_judge(JudgeSettings(idle_poll_s=0.05, tls_client_ca_file=pki.ca,
                                            **common(sqlite_dir, pki)), auth_settings)
    writer = await start_writer(writer_settings(
        sqlite_dir, pki, judge, judge_tls_cert_file=pki.client.cert,
        judge_tls_key_file=pki.client.key), auth_settings)
    query = await start_query(QuerySettings(page_token_secret=PAGE_SECRET,
                                            **common(sqlite_dir, pki)), auth_settings)
    yield TlsStack(pki, judge, writer, query, sqlite_dir, auth_settings)
    for server in (writer, query, judge):
        await server.stop(0.2)


async def health(address: str, tls: ClientTLS | None) -> int:
    """The server's health status over a channel with `tls`; raises the RPC error."""
    async with open_aio_channel(address, tls) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5.0)
    return reply.status


async def refused(address: str, tls: ClientTLS | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(address, tls)
    return caught.value.code()


# ----- the servers' side -----

async def test_tls_client_reaches_every_tls_server(tls_stack):
    serving = health_pb2.HealthCheckResponse.SERVING
    for server in (tls_stack.writer, tls_stack.query):
        assert await health(server.address, tls_stack.tls()) == serving
    client = tls_stack.pki.client
    with_cert = tls_stack.tls(certificate_chain=client.cert.read_bytes(),
                              private_key=client.key.read_bytes())
    assert await health(tls_stack.judge.address, with_cert) == serving


async def test_health_wait_of_the_local_stack_over_tls(tls_stack):
    """`epochlens up` waits on each service's health (services.common.health) with the CLI's
    TLS: the mutual TLS judge is SERVING to it, and never to a plaintext wait."""
    client = tls_stack.pki.client
    tls = tls_stack.tls(certificate_chain=client.cert.read_bytes(),
                        private_key=client.key.read_bytes())
    address = tls_stack.judge.address
    assert await asyncio.to_thread(wait_until_serving, address, 5.0, 0.05, tls=tls)
    assert not await asyncio.to_thread(wait_until_serving, address, 0.5, 0.05)


async def test_server_name_override_is_what_the_certificate_is_checked_against(tls_stack):
    """judge.internal is in the certificate, wrong.internal is not: the override is used."""
    address = tls_stack.query.address
    assert await health(address, tls_stack.tls(server_name="judge.internal")) == \
        health_pb2.HealthCheckResponse.SERVING
    assert await refused(address, tls_stack.tls(server_name="wrong.internal")) == \
        grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_and_untrusted_server_ca_are_refused(tls_stack):
    rogue = ClientTLS(root_certificates=tls_stack.pki.rogue_ca.read_bytes())
    for server in (tls_stack.writer, tls_stack.query, tls_stack.judge):
        assert await refused(server.address, None) == grpc.StatusCode.UNAVAILABLE
        assert await refused(server.address, rogue) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_judge_refuses_clients_without_a_certificate_of_its_ca(tls_stack):
    rogue = tls_stack.pki.rogue_client
    no_cert = tls_stack.tls()
    wrong_ca = tls_stack.tls(certificate_chain=rogue.cert.read_bytes(),
                             private_key=rogue.key.read_bytes())
    assert await refused(tls_stack.judge.address, no_cert) == grpc.StatusCode.UNAVAILABLE
    assert await refused(tls_stack.judge.address, wrong_ca) == grpc.StatusCode.UNAVAILABLE


# ----- writer to judge -----

async def create_run(stack: TlsStack, writer: RunningServer, name: str):
    async with open_aio_channel(writer.address, stack.tls()) as channel:
        return await writer_pb2_grpc.PredictionWriterServiceStub(channel).CreateRun(
            writer_pb2.CreateRunRequest(name=name, model_name="tiny", dataset_name="toy",
                                        config=dict_to_struct(JUDGE_CONFIG)),
            metadata=stack.metadata(), timeout=10.0)


async def judgments(stack: TlsStack, run_id: str) -> list:
    async with open_aio_channel(stack.query.address, stack.tls()) as channel:
        reply = await query_pb2_grpc.QueryServiceStub(channel).ListJudgments(
            query_pb2.ListJudgmentsRequest(run_id=run_id, page_size=100),
            metadata=stack.metadata(), timeout=10.0)
    return list(reply.judgments)


async def test_writer_hands_predictions_to_the_judge_over_mutual_tls(tls_stack):
    """CreateRun's judge check and the outbox hand-off both cross the mutual TLS channel;
    every prediction written gets its one judgment, read back through the TLS query."""
    run = await create_run(tls_stack, tls_stack.writer, "over-mtls")
    async with open_aio_channel(tls_stack.writer.address, tls_stack.tls()) as channel:
        reply = await writer_pb2_grpc.PredictionWriterServiceStub(channel).WritePredictions(
            writer_pb2.WritePredictionsRequest(run_id=run.id, predictions=[
                item(10, i, prediction=f"truth {i}" if i % 2 else "wrong") for i in range(6)]),
            metadata=tls_stack.metadata(), timeout=10.0)
    assert reply.inserted_count == 6
    deadline = time.monotonic() + WAIT_S
    while len(stored := await judgments(tls_stack, run.id)) < 6:
        assert time.monotonic() < deadline, f"{len(stored)} of 6 judgments after {WAIT_S}s"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # nothing more comes: one judgment per prediction
    stored = await judgments(tls_stack, run.id)
    assert sorted((j.prediction.sample_index, j.criterion, j.score) for j in stored) == [
        (i, "exact_match", 1.0 if i % 2 else 0.0) for i in range(6)]


@pytest.mark.parametrize("client", ["none", "rogue"])
async def test_writer_without_a_trusted_client_certificate_cannot_reach_the_judge(
        tls_stack, client):
    """A writer whose channel to the judge has no client certificate, or one of another CA:
    the judge refuses the handshake, so CreateRun's judge check is UNAVAILABLE."""
    pair = tls_stack.pki.rogue_client
    cert = {} if client == "none" else {"judge_tls_cert_file": pair.cert,
                                        "judge_tls_key_file": pair.key}
    writer = await start_writer(writer_settings(tls_stack.sqlite_dir, tls_stack.pki,
                                                tls_stack.judge, **cert), tls_stack.auth)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create_run(tls_stack, writer, f"refused-{client}")
    finally:
        await writer.stop(0.2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "judge" in caught.value.details()


# ----- clients: web, CLI, trainer -----

async def test_web_serves_https_and_reaches_the_query_service_over_tls(tls_stack):
    pki = tls_stack.pki
    web = await start_web(WebSettings(
        port=0, query_address=tls_stack.query.address, query_tls_ca_file=pki.ca,
        tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, shutdown_grace_s=0.2,
        _env_file=None))
    try:
        assert web.url.startswith("https://")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=pki.ca)) as client:
            reply = await client.get(f"{web.url}/healthz")
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as client:
                await client.get(f"{web.url.replace('https', 'http', 1)}/healthz")
    finally:
        await web.stop()
    assert reply.status_code == 200, reply.text


async def cli(stack: TlsStack, *args: str, **env: str):
    base = {"EPOCHLENS_CLI_QUERY_ADDRESS": stack.query.address,
            "EPOCHLENS_CLI_WRITER_ADDRESS": stack.writer.address,
            "EPOCHLENS_CLI_TOKEN": mint_token(stack.auth, USER), "EPOCHLENS_API_KEY": None}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={**base, **env})


async def test_cli_over_tls(tls_stack):
    run = await create_run(tls_stack, tls_stack.writer, "cli-run")
    ca = str(tls_stack.pki.ca)
    listed = await cli(tls_stack, "runs", "--json", EPOCHLENS_CLI_TLS_CA_FILE=ca)
    assert listed.exit_code == 0, listed.output
    assert run.id in {row["id"] for row in json.loads(listed.output)}
    checked = await cli(tls_stack, "health", "--address", tls_stack.judge.address,
                        EPOCHLENS_CLI_TLS_CA_FILE=ca,
                        EPOCHLENS_CLI_TLS_CERT_FILE=str(tls_stack.pki.client.cert),
                        EPOCHLENS_CLI_TLS_KEY_FILE=str(tls_stack.pki.client.key))
    assert (checked.exit_code, checked.output.strip()) == (
        0, f"{tls_stack.judge.address}: SERVING")
    plaintext = await cli(tls_stack, "runs")
    assert plaintext.exit_code == 1
    assert "cannot reach the query service" in plaintext.output
    missing = await cli(tls_stack, "runs", EPOCHLENS_CLI_TLS_CA_FILE=ca + ".missing")
    assert missing.exit_code == 2
    assert "cannot read the CA file" in missing.output


def upload(stack: TlsStack, spool_dir: Path, **tls) -> tuple[StreamingClient, object]:
    config = PredictionsConfig(_env_file=None, spool_dir=spool_dir, backoff_base_s=0.05,
                               backoff_max_s=0.2, flush_timeout_s=10.0, **tls)
    spool = Spool.create(spool_dir, RunRecord(spool_dir.name, "trainer-tls", "tiny", "toy", {}))
    client = StreamingClient(config, spool, stack.writer.address, mint_token(stack.auth, USER))
    client.start()
    client.submit(1, 10, [GenerationResult(i, f"prompt {i}", f"truth {i}", f"p {i}", 1.0, 3, 1)
                          for i in range(4)])
    client.finish()
    return client, client.close(10.0)


async def test_trainer_streaming_client_over_tls(tls_stack, tmp_path):
    _, report = await asyncio.to_thread(upload, tls_stack, tmp_path / "ok",
                                        tls_ca_file=tls_stack.pki.ca)
    assert (report.finished, report.inserted, report.pending_batches, report.error) == (
        True, 4, 0, None)
    with pytest.raises(TLSFileError, match="holds no valid certificate"):
        await asyncio.to_thread(upload, tls_stack, tmp_path / "bad",
                                tls_ca_file=tls_stack.pki.client.key)


async def test_api_key_exchange_over_tls(tls_stack):
    """The clients' API key exchange at the writer goes over TLS when given; a plaintext
    exchange with the TLS writer is UNAVAILABLE."""
    async with open_aio_channel(tls_stack.writer.address, tls_stack.tls()) as channel:
        created = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="tls"), metadata=tls_stack.metadata(),
            timeout=10.0)
    settings = CredentialSettings(_env_file=None)
    over_tls = ApiKeyCredentials(created.secret, tls_stack.writer.address, settings,
                                 tls_stack.tls())
    await asyncio.to_thread(over_tls.token)
    assert over_tls.user_id == USER
    plaintext = ApiKeyCredentials(created.secret, tls_stack.writer.address, settings)
    with pytest.raises(CredentialsError) as caught:
        await asyncio.to_thread(plaintext.token)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_sync_stops_with_one_line_on_an_unusable_tls_file(monkeypatch, tmp_path, capsys):
    """epochlens-sync checks the TLS files before it touches a spool: exit 2, one line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPOCHLENS_TRAINER_TLS_CA_FILE", str(tmp_path / "absent.pem"))
    spool_dir = tmp_path / "spool"
    Spool.create(spool_dir, RunRecord("left", "left-behind", "tiny", "toy", {})).close()
    before = sorted(p.name for p in spool_dir.iterdir())
    assert sync_main(["--spool-dir", str(spool_dir), "--writer", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("epochlens-sync: TLS to the writer: cannot read the CA file ")
    assert sorted(p.name for p in spool_dir.iterdir()) == before


# ----- unusable files at start-up -----

async def test_unusable_tls_files_stop_a_server_at_start(tls_stack, tmp_path):
    pki = tls_stack.pki
    cases = [({"tls_cert_file": tmp_path / "absent.crt"}, "cannot read the certificate file"),
             ({"tls_key_file": pki.client.key}, "are not a valid pair"),
             ({"tls_client_ca_file": pki.client.key}, "CA file"),
             ({"tls_cert_file": pki.server.key}, "are not a valid pair")]
    for fields, expected in cases:
        settings = QuerySettings(page_token_secret=PAGE_SECRET,
                                 **{**common(tls_stack.sqlite_dir, pki), **fields})
        with pytest.raises(StartupError, match=expected):
            await start_query(settings, tls_stack.auth)


async def test_service_exits_with_one_line_on_a_missing_certificate(tls_stack, tmp_path):
    env = bare_env(EPOCHLENS_AUTH_JWT_SECRET="x" * 40,
                   EPOCHLENS_SQLITE_DIR=str(tls_stack.sqlite_dir), EPOCHLENS_JUDGE_PORT="0",
                   EPOCHLENS_JUDGE_TLS_CERT_FILE=str(tmp_path / "absent.crt"),
                   EPOCHLENS_JUDGE_TLS_KEY_FILE=str(tls_stack.pki.server.key))
    line = await asyncio.to_thread(one_line_failure, [str(BIN / "epochlens-judge")], env,
                                   tmp_path, 1)
    assert line.startswith("judge: cannot read the certificate file ")
    assert "absent.crt" in line


@pytest.mark.parametrize(("settings_class", "env", "expected"), [
    (WebSettings, {"EPOCHLENS_WEB_TLS_CERT_FILE": "web.crt"},
     "EPOCHLENS_WEB_TLS_KEY_FILE is required when EPOCHLENS_WEB_TLS_CERT_FILE is set"),
    (WriterSettings, {"EPOCHLENS_WRITER_JUDGE_TLS_KEY_FILE": "w.key"},
     "EPOCHLENS_WRITER_JUDGE_TLS_CERT_FILE is required when "
     "EPOCHLENS_WRITER_JUDGE_TLS_KEY_FILE is set"),
    (JudgeSettings, {"EPOCHLENS_JUDGE_TLS_CLIENT_CA_FILE": "ca.crt"},
     "EPOCHLENS_JUDGE_TLS_CLIENT_CA_FILE needs EPOCHLENS_JUDGE_TLS_CERT_FILE"),
])
def test_half_tls_settings_are_configuration_errors(monkeypatch, tmp_path, settings_class, env,
                                                    expected):
    monkeypatch.chdir(tmp_path)  # no .env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(settings_class)
    assert str(caught.value).startswith(f"configuration error: {expected}")
