"""enable_cpu_memory_reuse: freed CPU tensors' memory stays in the process for the next ones, and goes back on disable."""

import ctypes
import platform
import resource

import pytest
import torch

from enat_diffusers.cpu_memory import (
    cpu_memory_reuse_enabled,
    cpu_memory_reuse_supported,
    disable_cpu_memory_reuse,
    enable_cpu_memory_reuse,
)

MIB = 2**20
GLIBC = cpu_memory_reuse_supported()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


def _malloc_info() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / MIB


@pytest.fixture
def reuse_off_afterwards():
    yield
    disable_cpu_memory_reuse()


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_large_tensors_stay_in_the_process_and_serve_the_next_ones(reuse_off_afterwards):
    assert enable_cpu_memory_reuse() and cpu_memory_reuse_enabled()
    mapped_before = _malloc_info().hblks
    # 64 MiB each: above glibc's largest mmap threshold, so each a fresh mapping without reuse. The first ones may
    # grow the heap (where it cannot extend in place, glibc starts a new region); after that, the kept memory serves.
    for _ in range(2):
        tensor = torch.ones(16 * MIB)
        assert _malloc_info().hblks == mapped_before  # from the heap, not a mapping
        del tensor
    assert _malloc_info().fordblks >= 64 * MIB  # kept, free, in the process
    heap = _malloc_info().arena
    for _ in range(3):
        tensor = torch.ones(16 * MIB)
        del tensor
    assert _malloc_info().arena == heap and _malloc_info().hblks == mapped_before


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_disabling_returns_the_kept_memory_and_maps_large_tensors_again(reuse_off_afterwards):
    enable_cpu_memory_reuse()
    kept = torch.ones(64 * MIB)  # 256 MiB, touched
    del kept
    resident = _resident_mib()
    disable_cpu_memory_reuse()
    assert not cpu_memory_reuse_enabled()
    assert resident - _resident_mib() > 200  # given back to the OS
    mapped_before = _malloc_info().hblks
    larger = torch.empty(256 * MIB)  # 1 GiB, larger than any free block left: glibc maps it, as by default
    assert _malloc_info().hblks == mapped_before + 1
    del larger


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_the_environment_can_opt_out(monkeypatch, reuse_off_afterwards):
    disable_cpu_memory_reuse()
    monkeypatch.setenv("ENAT_DIFFUSERS_CPU_MEMORY_REUSE", "0")
    assert enable_cpu_memory_reuse() is False and not cpu_memory_reuse_enabled()
    mapped_before = _malloc_info().hblks
    tensor = torch.empty(256 * MIB)  # 1 GiB: mapped, as glibc does by default
    assert _malloc_info().hblks == mapped_before + 1
    del tensor


def test_elsewhere_than_glibc_nothing_changes_and_it_says_so(monkeypatch):
    calls = []
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("musl", ""))
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: calls.append(args))
    assert enable_cpu_memory_reuse() is False
    assert not cpu_memory_reuse_enabled()
    disable_cpu_memory_reuse()
    assert calls == []  # the C library was not even opened
    assert not cpu_memory_reuse_supported()
