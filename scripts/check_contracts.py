"""buf lint and buf breaking on the contracts (protos/epochlens/v1), with buf.yaml's rules.

    python scripts/check_contracts.py [--buf PATH] [--against REF]

Both run on FileDescriptorSets built by scripts/gen_descriptors.sh (imports included),
because buf alone cannot resolve google/rpc/status.proto without the Buf Schema
Registry. Breaking changes are checked against the contracts of REF (default
EPOCHLENS_BUF_AGAINST, else HEAD~1), read from git. In a shallow clone the missing
commit is fetched once (`git fetch --deepen=1`); when REF still does not exist
(a single-commit repository, no remote) or has no contracts, the comparison is
skipped with a line saying why and exit status 3.

Exit status: 0 clean, 1 lint or breaking violations (buf's lines on stdout),
2 usage or tool failure, 3 breaking skipped (no baseline).
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
NO_BASELINE = 3


class NoBaseline(Exception):
    """The commit to compare against is not available or has no contracts."""


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=check)


def build_descriptor_set(proto_root: Path, out: Path) -> Path:
    """The FileDescriptorSet of proto_root/epochlens/v1/*.proto, imports included."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    result = subprocess.run([str(ROOT / "scripts" / "gen_descriptors.sh"), str(out),
                             str(proto_root)], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"descriptor build of {proto_root} failed: {result.stderr.strip()}")
    return out


def resolve_commit(ref: str) -> str:
    """The commit ref names, fetching one more commit of history in a shallow clone."""
    found = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if found.returncode == 0:
        return found.stdout.decode().strip()
    shallow = git("rev-parse", "--is-shallow-repository").stdout.decode().strip() == "true"
    if shallow and git("fetch", "--quiet", "--deepen=1", check=False).returncode == 0:
        found = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        if found.returncode == 0:
            return found.stdout.decode().strip()
    if shallow:
        raise NoBaseline(f"{ref} is not in this shallow clone and `git fetch --deepen=1` "
                         "could not fetch it")
    raise NoBaseline(f"{ref} does not exist in this repository (a single-commit repository "
                     "has no previous commit to compare against)")


def export_protos(commit: str, dest: Path) -> Path:
    """The protos/ folder of commit, written under dest; returns dest/protos."""
    archive = git("archive", "--format=tar", commit, "protos", check=False)
    if archive.returncode != 0:
        raise NoBaseline(f"{commit[:12]} has no protos/ folder")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    root = dest / "protos"
    if not list((root / "epochlens" / "v1").glob("*.proto")):
        raise NoBaseline(f"{commit[:12]} has no protos/epochlens/v1/*.proto")
    return root


def run_buf(buf: Path, *args: str) -> int:
    result = subprocess.run([str(buf), *args, "--config", str(ROOT / "buf.yaml")], cwd=ROOT,
                            capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def check(buf: Path, against: str, work: Path) -> int:
    current = build_descriptor_set(ROOT / "protos", work / "current.binpb")
    lint = run_buf(buf, "lint", str(current), "--path", "epochlens")
    print(f"buf lint: {'clean' if lint == 0 else 'violations above'}")
    try:
        commit = resolve_commit(against)
        previous = build_descriptor_set(export_protos(commit, work / "previous"),
                                        work / "previous.binpb")
    except NoBaseline as exc:
        print(f"buf breaking: skipped: {exc}")
        return 1 if lint else NO_BASELINE
    breaking = run_buf(buf, "breaking", str(current), "--against", str(previous),
                       "--path", "epochlens")
    print(f"buf breaking against {against} ({commit[:12]}): "
          f"{'clean' if breaking == 0 else 'breaking changes above'}")
    return 1 if lint or breaking else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buf", type=Path, default=Path(os.environ.get("BUF", DEFAULT_BUF)))
    parser.add_argument("--against", default=os.environ.get("EPOCHLENS_BUF_AGAINST", "HEAD~1"))
    args = parser.parse_args()
    if not args.buf.exists():
        print(f"buf not found at {args.buf}: run `make node-deps`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="epochlens-buf-") as work:
        return check(args.buf, args.against, Path(work))


if __name__ == "__main__":
    sys.exit(main())
