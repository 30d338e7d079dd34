"""``python -m benchmarks.gpu [--dry] [--out DIR]`` and ``python -m benchmarks.gpu prepare``."""

import sys

from benchmarks.gpu.checks import main

sys.exit(main())
