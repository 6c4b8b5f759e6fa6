"""Per-user API keys against the real writer and query services (PostgreSQL and SQLite):
create, list and revoke through the `epochlens` CLI, `epochlens login`, the exchange for a
token the query service accepts, refusals (revoked, expired, unknown, another user's key),
the failed-exchange limit, an RS256 writer that cannot sign, and a trainer upload whose
tokens live 2 s streaming across several refreshes with every prediction stored once.

The servers run on the session event loop of this thread, so each CLI call and each
blocking client runs in a worker thread (asyncio.to_thread) while the loop keeps serving.
"""

import asyncio
import hashlib
import hmac
import os
import stat
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import jwt
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from epochlens.v1 import auth_pb2, auth_pb2_grpc, common_pb2, query_pb2, query_pb2_grpc
from services.cli.config import CliSettings
from services.cli.keys import KeysClient
from services.cli.main import app
from services.common.auth import mint_token
from services.common.config import AuthSettings
from services.common.db import RLS_USER_SETTING, create_engine
from services.writer.api_keys import KEY_HASH_SETTING
from services.writer.config import MigrateSettings, WriterSettings
from services.writer.migrate import migrate
from services.writer.models import WriterBase, api_keys_table, predictions_table, runs_table
from services.writer.server import start as start_writer
from tests.conftest import JWT_SECRET, PG_ADMIN, PG_HOST, PG_PORT, WRITER_ROLE, pg_url
from tests.helpers import create_run, error_reason, rich_status
from trainer_client.config import PredictionsConfig
from trainer_client.credentials import ApiKeyCredentials, CredentialSettings
from trainer_client.results import GenerationResult
from trainer_client.spool import RunRecord, Spool
from trainer_client.streaming import StreamingClient


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def cli(stack, user: str | None, *args: str, **env: str | None):
    """`epochlens ARGS` in a worker thread, against the stack's writer and query services,
    with a token minted for `user` (None: no token: the API key decides)."""
    base = {"EPOCHLENS_CLI_WRITER_ADDRESS": stack.writer.address,
            "EPOCHLENS_CLI_QUERY_ADDRESS": stack.query.address, "COLUMNS": "200",
            "EPOCHLENS_CLI_TOKEN": mint_token(stack.auth, user) if user else None,
            "EPOCHLENS_API_KEY": None}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={**base, **env})


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


async def cli_create_key(stack, user: str, *args: str) -> tuple[str, str]:
    """(id, key) of a key `epochlens keys create` made for user."""
    lines = ok(await cli(stack, user, "keys", "create", *args)).splitlines()
    key_id = lines[0].split()[3]
    return key_id, lines[-1]


async def exchange(stack, api_key: str) -> auth_pb2.ExchangeApiKeyResponse:
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        return await auth_pb2_grpc.AuthServiceStub(channel).ExchangeApiKey(
            auth_pb2.ExchangeApiKeyRequest(api_key=api_key))


def admin_engine(stack):
    """The writer schema as the admin (PostgreSQL) or from the SQLite file."""
    return create_engine(MigrateSettings(
        database_url=pg_url(PG_ADMIN, stack.database) if stack.database else None,
        sqlite_dir=stack.sqlite_dir or ".epochlens", _env_file=None), ("writer",))


async def key_rows(stack, user: str) -> list:
    """writer.api_keys rows of user, read as the admin (PostgreSQL) or from the file."""
    engine = admin_engine(stack)
    try:
        async with engine.begin() as conn:
            return list(await conn.execute(select(api_keys_table).where(
                api_keys_table.c.user_id == user).order_by(api_keys_table.c.create_time)))
    finally:
        await engine.dispose()


async def set_expire_time(stack, key_id: str, when: datetime) -> None:
    engine = admin_engine(stack)
    try:
        async with engine.begin() as conn:
            await conn.execute(update(api_keys_table).where(
                api_keys_table.c.id == uuid.UUID(key_id)).values(expire_time=when))
    finally:
        await engine.dispose()


async def test_cli_creates_lists_and_revokes_keys_stored_hashed(stack):
    user = unique("keys")
    key_id, key = await cli_create_key(stack, user, "--name", "laptop", "--expires-days", "30")
    assert key.startswith("elk_") and len(key) == 47
    [row] = await key_rows(stack, user)
    assert (str(row.id), row.name, row.prefix) == (key_id, "laptop", key[:12])
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {str(value) for value in row}
    assert row.revoke_time is None and row.last_used_time is None
    expected_expiry = row.create_time + timedelta(days=30)
    assert abs((row.expire_time - expected_expiry).total_seconds()) < 1

    listed = ok(await cli(stack, user, "keys", "list"))
    [line] = [line for line in listed.splitlines() if line.startswith(key_id)]
    assert f"{key[:12]}..." in line and line.endswith("laptop")
    assert ok(await cli(stack, unique("other"), "keys", "list")) == "no API keys\n"

    revoked = ok(await cli(stack, user, "keys", "revoke", key_id))
    assert revoked.startswith(f"revoked API key {key_id} ({key[:12]}...) at ")
    assert ok(await cli(stack, user, "keys", "revoke", key_id)) == revoked
    assert ok(await cli(stack, user, "keys", "list")) == "no API keys\n"
    [row] = await key_rows(stack, user)
    assert row.revoke_time is not None


async def test_exchanged_token_is_accepted_by_the_query_service(stack, writer_stub):
    user = unique("exchange")
    run = await create_run(writer_stub, stack.metadata(user), name="via-key")
    _, key = await cli_create_key(stack, user)
    reply = await exchange(stack, key)
    claims = jwt.decode(reply.access_token, JWT_SECRET, algorithms=["HS256"])
    assert (reply.user_id, claims["sub"]) == (user, user)
    assert claims["exp"] == reply.expire_time.seconds
    assert reply.expire_time.seconds - time.time() == pytest.approx(900, abs=5)
    async with grpc.aio.insecure_channel(stack.query.address) as channel:
        runs = await query_pb2_grpc.QueryServiceStub(channel).ListRuns(
            query_pb2.ListRunsRequest(), metadata=(
                ("authorization", f"Bearer {reply.access_token}"),))
    assert [r.id for r in runs.runs] == [run.id]
    [row] = await key_rows(stack, user)
    assert row.last_used_time is not None


async def test_revoked_expired_and_unknown_keys_are_unauthenticated(stack):
    user = unique("refused")
    revoked_id, revoked = await cli_create_key(stack, user)
    expired_id, expired = await cli_create_key(stack, user)
    ok(await cli(stack, user, "keys", "revoke", revoked_id))
    await set_expire_time(stack, expired_id, datetime.now(UTC) - timedelta(seconds=1))
    cases = ((revoked, "was revoked at", "revoked"), (expired, "expired at", "expired"),
             ("elk_" + "A" * 43, "unknown API key", "unknown"),
             ("not-a-key", "malformed API key", "malformed"))
    for api_key, message, cause in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await exchange(stack, api_key)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, cause
        assert message in caught.value.details()
        status = rich_status(caught.value)
        assert error_reason(status) == "UNAUTHENTICATED"


async def test_another_users_key_cannot_be_revoked(stack):
    owner, intruder = unique("owner"), unique("intruder")
    key_id, key = await cli_create_key(stack, owner)
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=key_id),
                                    metadata=stack.metadata(intruder))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == f"API key {key_id} not found"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id="nope"),
                                    metadata=stack.metadata(intruder))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    result = await cli(stack, intruder, "keys", "revoke", key_id)
    assert result.exit_code == 1 and f"API key {key_id} not found" in result.stderr
    [row] = await key_rows(stack, owner)
    assert row.revoke_time is None
    assert (await exchange(stack, key)).user_id == owner


async def test_key_management_needs_a_token(stack):
    async with grpc.aio.insecure_channel(stack.writer.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListApiKeys(auth_pb2.ListApiKeysRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_login_stores_the_key_and_the_cli_uses_it(stack, writer_stub, tmp_path):
    user = unique("login")
    run = await create_run(writer_stub, stack.metadata(user), name="logged-in")
    _, key = await cli_create_key(stack, user)
    path = tmp_path / "config" / "credentials"
    env = {"EPOCHLENS_CREDENTIALS_FILE": str(path), "EPOCHLENS_AUTH_JWT_SECRET": None}
    out = ok(await cli(stack, None, "login", "--key", key, **env))
    assert out == f"logged in as {user}: API key {key[:12]}... stored in {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"[default]\napi_key = {key}\n\n"
    runs = ok(await cli(stack, None, "runs", "--json", **env))
    assert run.id in runs and runs.count('"id"') == 1
    # A second key created with the token the first one gives.
    created = ok(await cli(stack, None, "keys", "create", "--name", "from-key", **env))
    assert f"for {user}," in created.splitlines()[0]
    assert [row.name for row in await key_rows(stack, user)] == ["", "from-key"]


async def test_login_refuses_a_revoked_key_and_keeps_the_file(stack, tmp_path):
    user = unique("relogin")
    key_id, key = await cli_create_key(stack, user)
    ok(await cli(stack, user, "keys", "revoke", key_id))
    path = tmp_path / "credentials"
    result = await cli(stack, None, "login", "--key", key,
                       EPOCHLENS_CREDENTIALS_FILE=str(path))
    assert result.exit_code == 2 and not path.exists()
    assert "API key not stored" in result.stderr and "UNAUTHENTICATED" in result.stderr
    assert "was revoked" in result.stderr


async def test_row_level_security_shows_the_owner_or_the_hash_only(stack):
    """As the writer role, unfiltered: a user sees their own keys; the exchange's hash
    setting shows the one row with that hash; nothing set shows nothing."""
    if stack.backend != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    alice, bob = unique("rls-keys-a"), unique("rls-keys-b")
    await cli_create_key(stack, alice)
    await cli_create_key(stack, alice)
    _, bob_key = await cli_create_key(stack, bob)
    bob_hash = hashlib.sha256(bob_key.encode()).hexdigest()
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=WRITER_ROLE,
                                 database=stack.database)
    try:
        seen = {}
        for label, name, value in (("alice", RLS_USER_SETTING, alice),
                                   ("bob-hash", KEY_HASH_SETTING, bob_hash),
                                   ("nothing", RLS_USER_SETTING, "")):
            async with conn.transaction():
                await conn.execute("SELECT set_config($1, $2, true)", name, value)
                # Deliberately no user filter: only the policies separate the users.
                seen[label] = sorted(r["user_id"] for r in await conn.fetch(
                    "SELECT user_id FROM writer.api_keys"))
        assert seen == {"alice": [alice, alice], "bob-hash": [bob], "nothing": []}
        assert await updated(conn, KEY_HASH_SETTING, bob_hash,
                             "UPDATE writer.api_keys SET last_used_time = now()") == "UPDATE 1"
        assert await updated(conn, RLS_USER_SETTING, alice,
                             "UPDATE writer.api_keys SET revoke_time = now() WHERE user_id "
                             "LIKE 'rls-keys-b-%'") == "UPDATE 0"
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await updated(conn, KEY_HASH_SETTING, bob_hash,
                          f"UPDATE writer.api_keys SET user_id = '{alice}'")
    finally:
        await conn.close()
    [row] = await key_rows(stack, bob)
    assert (row.user_id, row.revoke_time) == (bob, None) and row.last_used_time is not None


async def updated(conn, name: str, value: str, statement: str) -> str:
    async with conn.transaction():
        await conn.execute("SELECT set_config($1, $2, true)", name, value)
        return await conn.execute(statement)


async def test_model_matches_the_migration(stack):
    if stack.backend != "postgres":
        pytest.skip("compared on PostgreSQL")
    engine = create_engine(MigrateSettings(database_url=pg_url(PG_ADMIN, stack.database),
                                           _env_file=None), ("writer",))

    def differences(sync_conn) -> list:
        context = MigrationContext.configure(sync_conn, opts={"include_schemas": True})
        return [diff for diff in compare_metadata(context, WriterBase.metadata)
                if "api_keys" in repr(diff)]
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
            policies = set(await conn.scalars(text(
                "SELECT policyname FROM pg_policies WHERE schemaname = 'writer' "
                "AND tablename = 'api_keys'")))
    finally:
        await engine.dispose()
    assert policies == {"api_keys_owner", "api_keys_exchange_select",
                        "api_keys_exchange_update"}


# ----- writers of their own (settings of the exchange) -----

async def own_writer(tmp_path, auth: AuthSettings, **overrides):
    sqlite_dir = tmp_path / "sqlite"
    await migrate(MigrateSettings(sqlite_dir=sqlite_dir, _env_file=None))
    return await start_writer(WriterSettings(port=0, shutdown_grace_s=0.2, sqlite_dir=sqlite_dir,
                                             _env_file=None, **overrides), auth)


async def create_key_grpc(address: str, auth: AuthSettings, user: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
            auth_pb2.CreateApiKeyRequest(name="t"),
            metadata=(("authorization", f"Bearer {mint_token(auth, user)}"),))
    return reply.secret


async def test_failed_exchanges_are_limited_per_address(tmp_path, auth_settings):
    writer = await own_writer(tmp_path, auth_settings, api_key_max_failures=3,
                              api_key_failure_window_s=60.0, api_key_pepper="pepper")
    try:
        key = await create_key_grpc(writer.address, auth_settings, "limited")
        async with grpc.aio.insecure_channel(writer.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            codes = []
            for api_key in ["elk_" + "C" * 43] * 3 + [key]:
                try:
                    await stub.ExchangeApiKey(auth_pb2.ExchangeApiKeyRequest(api_key=api_key))
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
                    last = exc
        assert codes == ["UNAUTHENTICATED"] * 3 + ["RESOURCE_EXHAUSTED"]
        assert "too many failed API key exchanges from this address (3 in 60s)" in last.details()
    finally:
        await writer.stop(0.2)


async def test_pepper_keys_the_stored_hash(tmp_path, auth_settings):
    writer = await own_writer(tmp_path, auth_settings, api_key_pepper="pepper")
    try:
        key = await create_key_grpc(writer.address, auth_settings, "peppered")
        engine = create_engine(MigrateSettings(sqlite_dir=tmp_path / "sqlite", _env_file=None),
                               ("writer",))
        async with engine.begin() as conn:
            [stored] = (await conn.execute(select(api_keys_table.c.key_hash))).scalars()
        await engine.dispose()
        assert stored == hmac.new(b"pepper", key.encode(), hashlib.sha256).hexdigest()
    finally:
        await writer.stop(0.2)


async def test_rs256_writer_without_a_private_key_refuses_to_exchange(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_file = tmp_path / "jwt.pub"
    public_file.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    private_file = tmp_path / "jwt.key"
    private_file.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    signer = AuthSettings(jwt_algorithm="RS256", jwt_public_key_file=public_file,
                          jwt_private_key_file=private_file, _env_file=None)
    verify_only = AuthSettings(jwt_algorithm="RS256", jwt_public_key_file=public_file,
                               _env_file=None)
    writer = await own_writer(tmp_path, verify_only)
    try:
        key = await create_key_grpc(writer.address, signer, "rs256")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with grpc.aio.insecure_channel(writer.address) as channel:
                await auth_pb2_grpc.AuthServiceStub(channel).ExchangeApiKey(
                    auth_pb2.ExchangeApiKeyRequest(api_key=key))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details() == ("this writer cannot sign tokens: EPOCHLENS_AUTH_JWT_"
                                          "PRIVATE_KEY_FILE is required to mint RS256 tokens")
    finally:
        await writer.stop(0.2)


async def test_cli_client_refreshes_its_token(tmp_path, monkeypatch):
    auth = AuthSettings(jwt_secret=JWT_SECRET, jwt_leeway_s=0, _env_file=None)
    writer = await own_writer(tmp_path, auth, api_token_ttl_s=2)
    try:
        key = await create_key_grpc(writer.address, auth, "cli-refresh")
        monkeypatch.setenv("EPOCHLENS_API_KEY", key)
        settings = CliSettings(_env_file=None, writer_address=writer.address)

        def list_three_times() -> tuple[list[int], int]:
            with KeysClient(settings) as client:
                counts = []
                for _ in range(3):
                    counts.append(len(client.list()))
                    time.sleep(1.2)
                return counts, client._credentials.exchanges

        counts, exchanges = await asyncio.to_thread(list_three_times)
        assert counts == [1, 1, 1] and exchanges == 3
    finally:
        await writer.stop(0.2)


# ----- the trainer's upload with tokens that live 2 s -----

PASSES, SAMPLES = 8, 6


def results(step: int) -> list[GenerationResult]:
    return [GenerationResult(i, f"prompt {i}", f"truth {i}", f"p{step}/{i}", 1.0, 3, 1)
            for i in range(SAMPLES)]


def upload(address: str, credentials, spool_dir, pause_s: float):
    """A streaming upload of PASSES passes, pause_s apart, then finished and closed."""
    config = PredictionsConfig(_env_file=None, spool_dir=spool_dir, backoff_base_s=0.05,
                               backoff_max_s=0.2, stream_batch_predictions=4)
    spool = Spool.create(spool_dir, RunRecord(os.urandom(8).hex(), "refreshing", "tiny",
                                              "toy", {}))
    client = StreamingClient(config, spool, address, credentials)
    client.start()
    for index in range(PASSES):
        client.submit(index + 1, (index + 1) * 10, results((index + 1) * 10))
        time.sleep(pause_s)
    client.finish()
    return client, client.close(30.0)


class RefusedOnce(ApiKeyCredentials):
    """Hands out an expired token once, at the at_call-th call, as a client whose clock runs
    behind the writer's would: the writer refuses it and the client exchanges the key again."""

    def __init__(self, stale: str, at_call: int, *args) -> None:
        super().__init__(*args)
        self._stale = stale
        self._at_call = at_call
        self.calls = 0

    def token(self) -> str:
        self.calls += 1
        return self._stale if self.calls == self._at_call else super().token()


@pytest.mark.parametrize("refused_call", [1, 3], ids=["create-run", "stream"])
async def test_stream_keeps_going_across_token_refreshes(tmp_path, refused_call):
    """Tokens of 2 s over a 5 s upload, one of them refused (at CreateRun, or when a later
    stream opens): every prediction is stored once and the run finishes."""
    auth = AuthSettings(jwt_secret=JWT_SECRET, jwt_leeway_s=0, _env_file=None)
    writer = await own_writer(tmp_path, auth, api_token_ttl_s=2)
    try:
        key = await create_key_grpc(writer.address, auth, "refresher")
        expired = mint_token(auth, "refresher", 1)
        await asyncio.sleep(1.1)
        settings = CredentialSettings(_env_file=None, refresh_margin_s=60.0)
        credentials = RefusedOnce(expired, refused_call, key, writer.address, settings)
        client, report = await asyncio.to_thread(upload, writer.address, credentials,
                                                 tmp_path / "spool", 0.6)
        assert report.complete and report.finished, report.describe()
        assert (report.inserted, report.duplicates) == (PASSES * SAMPLES, 0)
        # The refused token ends a unary CreateRun as UNAUTHENTICATED (refreshed at once); a
        # stream the writer refuses while the client is already writing may surface as
        # INTERNAL instead, retried like a dropped connection with the next (fresh) token.
        refreshed = client.counts["token_refused_refreshed"]
        assert refreshed == 1 or (refused_call > 1 and client.counts["connection_errors"] >= 1)
        assert credentials.calls > refused_call
        assert credentials.exchanges >= 4
        engine = create_engine(MigrateSettings(sqlite_dir=tmp_path / "sqlite", _env_file=None),
                               ("writer",))
        async with engine.begin() as conn:
            runs = list(await conn.execute(select(runs_table.c.id, runs_table.c.user_id,
                                                  runs_table.c.state)))
            keys = list(await conn.execute(select(
                predictions_table.c.step, predictions_table.c.sample_index)))
        await engine.dispose()
        assert [(str(r.id), r.user_id, r.state) for r in runs] == [
            (report.run_id, "refresher", common_pb2.RUN_STATE_SUCCEEDED)]
        assert sorted(keys) == [((p + 1) * 10, i) for p in range(PASSES) for i in range(SAMPLES)]
    finally:
        await writer.stop(0.2)


async def test_upload_with_a_revoked_key_stops_and_keeps_the_spool(tmp_path):
    auth = AuthSettings(jwt_secret=JWT_SECRET, _env_file=None)
    writer = await own_writer(tmp_path, auth)
    try:
        key = await create_key_grpc(writer.address, auth, "revoked-upload")
        async with grpc.aio.insecure_channel(writer.address) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            md = (("authorization", f"Bearer {mint_token(auth, 'revoked-upload')}"),)
            [listed] = (await stub.ListApiKeys(auth_pb2.ListApiKeysRequest(),
                                               metadata=md)).api_keys
            await stub.RevokeApiKey(auth_pb2.RevokeApiKeyRequest(id=listed.id), metadata=md)
        settings = CredentialSettings(_env_file=None)
        credentials = ApiKeyCredentials(key, writer.address, settings)
        _, report = await asyncio.to_thread(upload, writer.address, credentials,
                                            tmp_path / "spool", 0.0)
        assert report.run_id is None and not report.complete
        assert report.error.startswith(f"API key exchange at {writer.address} failed with "
                                       "UNAUTHENTICATED: API key elk_")
        assert "was revoked at" in report.error
        assert report.pending_predictions == PASSES * SAMPLES and report.spool_path
    finally:
        await writer.stop(0.2)
