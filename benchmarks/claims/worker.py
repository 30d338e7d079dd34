"""Worker entry point: ``python -m benchmarks.claims.worker JOB.json`` runs one prepared job in this process."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the job file's :func:`~benchmarks.claims.runner.execute_job`; it writes ``outcome.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.claims.worker JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from benchmarks.claims.runner import execute_job

    execute_job(json.loads(Path(args[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
