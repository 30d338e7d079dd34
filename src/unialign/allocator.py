"""Keep freed memory inside the process when training on CPU (glibc malloc).

By default glibc's malloc serves every large block (above a threshold between 128 KiB and 32 MiB)
with a fresh ``mmap`` and hands it back to the kernel on ``free``, and trims the heap's free top.
A training step allocates and frees the same large tensors every step (the LM head's logits chunk,
activations, the tied embedding's gradient), so the kernel page-faults and zeroes that memory again
each time. On the 2-core benchmark machine that was 9% of a unialign DPO step and 22–27% of TRL's
(docs/benchmarks.md). With ``mmap`` off and trimming off, freed blocks stay in the heap and the next
step reuses them: the process's resident memory then stays at its peak instead of falling between
steps, which is why this is applied only to CPU training and can be turned off
(``cpu_keep_freed_memory: false``).

The setting is process-wide, so a trainer applies it by default only in a process that is
unialign's own (:func:`own_process`: the ``unialign`` command). A program that imports unialign
keeps its allocator unless it sets ``cpu_keep_freed_memory: true``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # the largest value mallopt accepts: keep up to 2 GiB of free heap top

_applied = False
_owned = False


def own_process() -> None:
    """Mark this process as unialign's own (the command line): process-wide defaults then apply to it."""
    global _owned
    _owned = True


def process_is_owned() -> bool:
    """Whether :func:`own_process` was called in this process."""
    return _owned


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's C library, loaded once; None where it cannot be found."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Turn off glibc's per-block ``mmap`` and heap trimming for this process; True when in effect.

    Does nothing (and returns False) off Linux or on a C library without ``mallopt`` (musl).
    Idempotent: the first successful call logs once.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER) != 1:
        return False
    _applied = True
    logger.info("CPU training: glibc malloc keeps freed memory for reuse (cpu_keep_freed_memory)")
    return True


def is_applied() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return _applied


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use_bytes() -> int | None:
    """Bytes the C heap has handed out and not yet freed (glibc ``mallinfo2``: arenas + mmapped blocks).

    Unlike resident memory this does not depend on whether freed memory is kept or given back, so it
    compares processes with different allocator settings. None where glibc ≥ 2.33 is not the C library.
    """
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd
