"""unialign against TRL on the same work: a thin wrapper around ``unialign bench``.

Run ``python benchmarks/bench.py --help`` for the options; results are printed as a table and
appended as JSON to ``benchmarks/results/``. See docs/benchmarks.md for a reading of the numbers.
"""

from __future__ import annotations

import sys

from unialign.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
