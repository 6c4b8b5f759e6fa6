"""The ``epochlens-sync`` command (also ``python -m trainer_client.cli``).

Uploads what training left in the spool folder; see trainer_client.offline.
Built on argparse so that the light client install (epochlens-client) needs no
command-line framework.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer_client.offline import FINISH_STATES, sync
from trainer_client.tls import TLSFileError

TOKEN_ENV = "EPOCHLENS_TRAINER_TOKEN"
# Exit status of a configuration error, as the services and the epochlens command use.
EXIT_CONFIGURATION = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epochlens-sync", description="Upload predictions left in the epochlens spool.")
    parser.add_argument("--spool-dir", type=Path, default=None,
                        help="Spool folder; default EPOCHLENS_TRAINER_SPOOL_DIR.")
    parser.add_argument("--writer", default=None,
                        help="Writer host:port; default EPOCHLENS_TRAINER_WRITER_ADDRESS.")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"Bearer token for the writer; default {TOKEN_ENV}.")
    parser.add_argument("--timeout", type=float, default=None,
                        help="Seconds to wait per spool; "
                        "default EPOCHLENS_TRAINER_FLUSH_TIMEOUT_S.")
    ending = parser.add_mutually_exclusive_group()
    ending.add_argument("--finish", choices=sorted(FINISH_STATES), default=None,
                        help="End state of runs whose training never recorded one (the "
                        "trainer died); default: failed.")
    ending.add_argument("--leave-running", action="store_true",
                        help="Leave such runs RUNNING and print how to finish them.")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Upload every spool file; 0 when everything was uploaded, 1 when anything is left,
    2 when a TLS file (EPOCHLENS_TRAINER_TLS_*) cannot be used."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        reports = sync(args.spool_dir, writer=args.writer, token=args.token,
                       timeout=args.timeout, finish=args.finish,
                       leave_running=args.leave_running)
    except TLSFileError as exc:
        print(f"epochlens-sync: TLS to the writer: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    for report in reports:
        print(report.describe())
    if not reports:
        print("nothing to sync")
    return 0 if all(r.complete for r in reports) else 1


def main() -> None:
    """Console entry point (epochlens-sync)."""
    raise SystemExit(run())


if __name__ == "__main__":
    main()
