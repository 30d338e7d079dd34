"""``python -m benchmarks.claims run|status|report SPEC``: the claims sweep from the repository root."""

from __future__ import annotations

import sys

from benchmarks.claims import main

if __name__ == "__main__":
    sys.exit(main())
