"""Client install benchmark: the light client (epochlens-client) vs the full install.

Builds two fresh virtual environments from this checkout with the project's pip
(`pip --python`): one with only clients/python (the epochlens-client
distribution), one with the server-side project and its trainer extra
(`.[trainer]`, what the training environment had to carry before). For each it
prints the installed size (the bytes under the venv's site-packages, and the
distribution count) and the import time of the upload API
(`import trainer_client; from trainer_client.streaming import StreamingClient`,
the median of --repeats fresh interpreters), and for the full install also the
callback's import time (PredictionsCallback: torch and transformers).

Run from the repository root:
    . .venv/bin/activate && python bench/client_install.py
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_IMPORT = "import trainer_client; from trainer_client.streaming import StreamingClient"
CALLBACK_IMPORT = "from trainer_client.callback import PredictionsCallback"
TIMER = ("import sys, time; t = time.perf_counter(); exec(sys.argv[1]); "
         "print(time.perf_counter() - t)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5,
                   help="fresh interpreters per import timing (default %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the two venvs are made (default: a temporary folder)")
    p.add_argument("--full-spec", default=f"{ROOT}[trainer]",
                   help="what the full install installs (default %(default)s)")
    p.add_argument("--pip-timeout-s", type=float, default=1800.0, help="default %(default)s")
    return p.parse_args()


def make_venv(path: Path, spec: str, timeout: float) -> tuple[Path, float]:
    """A fresh venv at path with spec installed; returns its python and the install seconds."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                           "--quiet", spec], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"installing {spec} failed:\n{done.stdout}\n{done.stderr}")
    return python, time.perf_counter() - started


def site_size(venv: Path) -> tuple[int, int]:
    """Bytes of every file under the venv's site-packages, and its distribution count."""
    [site] = list((venv / "lib").glob("python*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())
    return size, len(list(site.glob("*.dist-info")))


def import_seconds(python: Path, statement: str, repeats: int, cwd: Path) -> float:
    """Median wall time of statement in `repeats` fresh interpreters (after one warm-up)."""
    times = []
    for _ in range(repeats + 1):
        out = subprocess.run([str(python), "-c", TIMER, statement], cwd=cwd, check=True,
                             capture_output=True, text=True, timeout=300).stdout
        times.append(float(out))
    return statistics.median(times[1:])


def measure(name: str, spec: str, work: Path, args: argparse.Namespace,
            extra: dict[str, str]) -> dict:
    venv = work / name
    python, install_s = make_venv(venv, spec, args.pip_timeout_s)
    size, dists = site_size(venv)
    row = {"install": name, "install_s": install_s, "size_mb": size / 2**20,
           "distributions": dists,
           "upload_import_s": import_seconds(python, UPLOAD_IMPORT, args.repeats, work)}
    for label, statement in extra.items():
        row[label] = import_seconds(python, statement, args.repeats, work)
    return row


def report(rows: list[dict]) -> None:
    print(f"{'install':<8} {'pip s':>7} {'size MiB':>9} {'dists':>6} {'upload import s':>16} "
          f"{'callback import s':>18}")
    for r in rows:
        callback = r.get("callback_import_s")
        print(f"{r['install']:<8} {r['install_s']:>7.1f} {r['size_mb']:>9.1f} "
              f"{r['distributions']:>6} {r['upload_import_s']:>16.3f} "
              f"{'-' if callback is None else f'{callback:.3f}':>18}")
    client, full = rows
    print(f"client install: {client['size_mb']:.1f} MiB, {client['size_mb'] / full['size_mb']:.1%} "
          f"of the full install's {full['size_mb']:.1f} MiB; upload import "
          f"{client['upload_import_s']:.3f} s vs {full['upload_import_s']:.3f} s; the callback's "
          f"import (torch, transformers) {full['callback_import_s']:.3f} s")
    print(json.dumps(rows))


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="epochlens-install-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure("client", str(ROOT / "clients" / "python"), work, args, {}),
                measure("full", args.full_spec, work, args,
                        {"callback_import_s": CALLBACK_IMPORT})]
    report(rows)


if __name__ == "__main__":
    main()
