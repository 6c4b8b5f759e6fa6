"""The contracts as other languages get them: the committed FileDescriptorSet is current and
self-contained, and buf lint / buf breaking (buf.yaml) pass and catch what they should."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from scripts import check_contracts

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "protos" / "epochlens.binpb"
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
CHECK = ROOT / "scripts" / "check_contracts.py"



def read_set(path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    return {f.name: f for f in fds.file}


def buf() -> Path:
    assert BUF.exists(), f"{BUF} missing: run `make node-deps`"
    return BUF


def contract_names() -> set[str]:
    folder = ROOT / "protos" / "epochlens" / "v1"
    return {f"epochlens/v1/{p.name}" for p in folder.glob("*.proto")}


def test_committed_descriptor_set_matches_the_protos(tmp_path):
    fresh = read_set(check_contracts.build_descriptor_set(ROOT / "protos", tmp_path / "f.binpb"))
    committed = read_set(COMMITTED)
    assert sorted(committed) == sorted(fresh), "protos/epochlens.binpb is stale: run `make proto`"
    for name in sorted(contract_names()):
        assert committed[name] == fresh[name], f"{name} differs: run `make proto`"


def test_descriptor_set_is_self_contained_with_comments():
    files = read_set(COMMITTED)
    assert {"google/rpc/status.proto", "google/protobuf/any.proto",
            "google/protobuf/struct.proto", "google/protobuf/timestamp.proto"} <= set(files)
    assert contract_names() <= set(files)
    for f in files.values():
        assert set(f.dependency) <= set(files), f"{f.name} imports a file the set lacks"
    writer = files["epochlens/v1/writer.proto"]
    comments = {loc.leading_comments.strip() for loc in writer.source_code_info.location}
    assert ("Creates a run owned by the caller. Idempotent when request_id is set."
            in comments)


def test_buf_lint_and_breaking_pass_on_the_contracts():
    result = subprocess.run([sys.executable, str(CHECK), "--buf", str(buf())], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[0] == "buf lint: clean", result.stdout + result.stderr
    if result.returncode == check_contracts.NO_BASELINE:
        pytest.skip(lines[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[1].startswith("buf breaking against HEAD~1 (") and lines[1].endswith("): clean")


def tampered_protos(tmp_path: Path, old: str, new: str) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", root, ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    writer = root / "epochlens" / "v1" / "writer.proto"
    text = writer.read_text()
    assert text.count(old) == 1
    writer.write_text(text.replace(old, new))
    return root


def line_of(needle: str) -> int:
    """1-based line of needle in the real writer.proto (other RPCs may be added above it)."""
    lines = (ROOT / "protos" / "epochlens" / "v1" / "writer.proto").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line)


def run_buf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(buf()), *args, "--config", str(ROOT / "buf.yaml"),
                           "--error-format", "text"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_buf_breaking_catches_a_renamed_field(tmp_path):
    current = check_contracts.build_descriptor_set(ROOT / "protos", tmp_path / "current.binpb")
    root = tampered_protos(tmp_path, "string model_name = 2;", "string model = 2;")
    tampered = check_contracts.build_descriptor_set(root, tmp_path / "tampered.binpb")
    result = run_buf("breaking", str(tampered), "--against", str(current), "--path", "epochlens")
    assert result.returncode == 100
    line = line_of("string model_name = 2;")
    assert result.stdout.splitlines() == [
        f'epochlens/v1/writer.proto:{line}:3:Field "2" with name "model" on message'
        ' "CreateRunRequest" changed option "json_name" from "modelName" to "model".',
        f'epochlens/v1/writer.proto:{line}:10:Field "2" on message "CreateRunRequest" changed'
        ' name from "model_name" to "model".']


def test_buf_lint_catches_an_undocumented_rpc(tmp_path):
    root = tampered_protos(tmp_path, "  // Creates a run owned by the caller. Idempotent when "
                           "request_id is set.\n", "")
    tampered = check_contracts.build_descriptor_set(root, tmp_path / "tampered.binpb")
    result = run_buf("lint", str(tampered), "--path", "epochlens")
    assert result.returncode == 100
    line = line_of("rpc CreateRun(") - 1
    assert result.stdout.splitlines() == [
        f'epochlens/v1/writer.proto:{line}:3:RPC "CreateRun" should have a non-empty comment for'
        ' documentation.']


def test_breaking_check_without_a_baseline_says_why_and_exits_3():
    env = {**os.environ, "EPOCHLENS_BUF_AGAINST": "no-such-ref"}
    result = subprocess.run([sys.executable, str(CHECK), "--buf", str(buf())], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == check_contracts.NO_BASELINE, result.stderr
    assert result.stdout.splitlines() == [
        "buf lint: clean",
        "buf breaking: skipped: no-such-ref does not exist in this repository (a single-commit "
        "repository has no previous commit to compare against)"]
