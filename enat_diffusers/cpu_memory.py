"""
How freed CPU tensor memory is reused: glibc's malloc settings (Linux).

glibc serves every allocation above its mmap threshold (128 KiB at start, raised as large blocks are freed, to 32 MiB
at most) with a fresh memory mapping, and unmaps it when it is freed. torch's CPU tensors come from malloc, so each
large intermediate tensor is new memory whose pages the kernel faults in and zero-fills at first touch. ENAT-L at
batch 8 creates hundreds of them per step (16 guidance rows of up to 256 tokens: 16 to 64 MiB each), and the VQ
decoder's full-resolution feature maps are 32 MiB per image.

`enable_cpu_memory_reuse()` raises the mmap threshold and the trim threshold (the free memory glibc keeps at the top
of its heap) to `REUSE_THRESHOLD`, so that freed blocks stay in the process and serve the next tensors. The cost is
memory: the process keeps what its largest step used instead of returning it, and the peak grows with fragmentation
(ENAT-L, float32, batch 8, tokens to images: peak resident 5.3 GiB instead of 4.4 GiB, held between calls).
`ENAT_DIFFUSERS_CPU_MEMORY_REUSE=0` in the environment turns `enable_cpu_memory_reuse` into a no-op.
Threads other than the main one allocate from arenas of 64 MiB heaps, where larger tensors are still mapped afresh
(sharing the main arena instead made int8 sampling slower: its threads then wait on one lock). It is process-wide,
so only entry points call it: the scripts and the app.
glibc's `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` environment variables, set before a process starts, do
the same for that process. The CPU page of the docs measures it (docs/source/optimization/cpu.md).
"""

import ctypes
import os
import platform

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Thresholds while reuse is on: mallopt takes a C int, so 2 GiB - 1 is the largest; blocks below it are reused.
REUSE_THRESHOLD = 2**31 - 1
# glibc's own thresholds once it has freed a block of 32 MiB or more (its dynamic mmap threshold stops at 32 MiB, the
# trim threshold follows at twice that): what `disable_cpu_memory_reuse` returns to.
GLIBC_MMAP_THRESHOLD = 32 * 2**20
GLIBC_TRIM_THRESHOLD = 2 * GLIBC_MMAP_THRESHOLD

# Set to 0 to keep glibc's own behaviour in the scripts and the app (and wherever `enable_cpu_memory_reuse` is called).
OPT_OUT_VARIABLE = "ENAT_DIFFUSERS_CPU_MEMORY_REUSE"

_state = {"enabled": False}


def cpu_memory_reuse_supported() -> bool:
    """Whether this process runs on glibc (Linux), whose `mallopt` `enable_cpu_memory_reuse` sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _glibc():
    """The C library's handle when it is glibc, else None."""
    if not cpu_memory_reuse_supported():
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_thresholds(libc, mmap_threshold: int, trim_threshold: int) -> bool:
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


def enable_cpu_memory_reuse() -> bool:
    """
    Keeps freed CPU memory in the process for the next tensors instead of returning it to the OS (see the module's
    docstring): the VQ decode of a batch of 8 ran 1.7x faster on a 2-core AVX2 CPU, at the cost of holding the
    largest step's memory between calls. Process-wide; glibc (Linux) only; `disable_cpu_memory_reuse` undoes it.

    Returns:
        `bool`: whether reuse is on (False, nothing changed, where the C library is not glibc or the environment sets
        `ENAT_DIFFUSERS_CPU_MEMORY_REUSE=0`).
    """
    libc = _glibc()
    if libc is None or os.environ.get(OPT_OUT_VARIABLE) == "0":
        return False
    _state["enabled"] = _set_thresholds(libc, REUSE_THRESHOLD, REUSE_THRESHOLD)
    return _state["enabled"]


def disable_cpu_memory_reuse() -> None:
    """Puts glibc's thresholds back where its own rule leaves them after large blocks (`GLIBC_MMAP_THRESHOLD`, twice
    that for trimming) and returns the kept free memory to the OS (`malloc_trim`)."""
    libc = _glibc()
    if libc is None:
        return
    _set_thresholds(libc, GLIBC_MMAP_THRESHOLD, GLIBC_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _state["enabled"] = False


def cpu_memory_reuse_enabled() -> bool:
    """Whether `enable_cpu_memory_reuse` is in effect."""
    return _state["enabled"]
