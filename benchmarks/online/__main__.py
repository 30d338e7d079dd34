"""``python -m benchmarks.online``: see the package docstring."""

from benchmarks.online.harness import main

raise SystemExit(main())
