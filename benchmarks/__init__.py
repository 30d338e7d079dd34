"""This repository's harnesses around the unialign library: they import it, it never imports them.

- :mod:`benchmarks.bench`: unialign against TRL on the same work (``python -m benchmarks.bench``), on the
  bundled data, a user's dataset (``--data``) or generated rows of any length (``--synthetic``).
- :mod:`benchmarks.scaling`: that bench at 256-4096 tokens and K = 2-16, resumable, with fitted growth
  exponents, a table and a figure (``python -m benchmarks.scaling``).
- :mod:`benchmarks.claims`: the papers' claims as a resumable sweep (``python -m benchmarks.claims``).
- :mod:`benchmarks.gpu`: the prepared GPU check, with a CPU dry run (``python -m benchmarks.gpu [--dry]``).
- ``padding.py``, ``online_vs_ppo.py``, ``data_prep.py``, ``judge_speed.py``: single measurements
  (``python -m benchmarks.<name>`` from the repository root).

Run them from a checkout; they are not installed with the package.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def source_commit() -> str | None:
    """The checkout's commit, with ``+changes`` when tracked Python files under ``src/`` or ``benchmarks/`` differ.

    Written into measurement records, so a table built from records made over several commits can say
    which code each row measured. None outside a git checkout.
    """
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        code = [":(glob)src/**/*.py", ":(glob)benchmarks/**/*.py"]  # records and docs changing do not count
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", *code],
                               capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a worker process: this one's, with the repository root first on ``PYTHONPATH``.

    Workers are started as ``python -m benchmarks...``, which finds the harness only when the
    repository root is importable, whatever the parent's working directory.
    """
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def run_sides(module: str, argv: list[str], sides: str) -> tuple[list[str], dict[str, dict]]:
    """Run each side of a comparison in its own ``python -m <module> ... --child <side>`` process, so that
    its peak RSS is its own; returns the forwarded arguments and each side's ``RESULT {json}`` line."""
    forwarded = [a for i, a in enumerate(argv) if not (a.startswith("--sides") or (i and argv[i - 1] == "--sides"))]
    results = {}
    for side in sides.split(","):
        proc = subprocess.run([sys.executable, "-m", module, *forwarded, "--child", side],
                              capture_output=True, text=True, env=worker_env(TOKENIZERS_PARALLELISM="false"))
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{side} failed (exit {proc.returncode})")
        results[side] = json.loads(line[len("RESULT "):])
    return forwarded, results


def run_cli(func, args) -> int:
    """Run a harness command as the ``unialign`` CLI runs its own (same messages and exit codes).

    A mistake in what the user gave (a spec, a model path) ends in one line and exit 1, a bug in a
    traceback and exit 70, Ctrl-C with exit 130; ``--debug`` or ``UNIALIGN_DEBUG=1`` shows every traceback.
    """
    import logging

    from unialign.cli import run_command

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = getattr(args, "debug", False) or os.environ.get("UNIALIGN_DEBUG", "") not in ("", "0")
    return run_command(func, args, debug=debug, roots=(str(REPO / "benchmarks"),))


def add_debug_argument(parser) -> None:
    """The ``--debug`` flag every harness command shares with the ``unialign`` CLI."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (or set UNIALIGN_DEBUG=1)")


def best_seconds(repeats: int, fn, *args) -> float:
    """The fastest of ``repeats`` timed calls of ``fn(*args)`` after one untimed call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first processor's model name as the kernel reports it, or None where the file or that line is missing."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """Where the numbers come from."""
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        # The vector instruction set torch's CPU kernels were dispatched to (AVX2, AVX512, ...). Two 2-core VMs
        # here differed threefold in matmul peak; this and cpu_model say which one a record came from.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "commit": source_commit(),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_at_start"] = os.getloadavg()
    except (ImportError, OSError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
