"""Checks on the repository itself: ASCII-only Python, generated code up to date."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "protos" / "epochlens" / "v1"


def tracked_python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.pyi"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return [ROOT / name for name in out]


def test_python_sources_are_ascii_only():
    files = tracked_python_files()
    assert len(files) > 20
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if any(byte > 127 for byte in line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []


def test_generated_code_matches_the_protos(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, env={"PYTHON": sys.executable,
                                                        "PATH": str(Path(sys.executable).parent)
                                                        + ":/usr/bin:/bin"})
    fresh = tmp_path / "epochlens" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert "writer_pb2.py" in names and "query_pb2_grpc.py" in names
    match, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, names, shallow=False)
    assert (mismatch, errors) == ([], []), "generated code is stale: run `make proto`"
