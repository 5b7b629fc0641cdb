"""How every process that computes (feature extraction, synthesis, training, embedding) is set up:
torch threads and the C allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Keep freed large buffers in the heap instead of returning them to the OS.

    glibc serves allocations above 128 KiB (a decoded 10 s clip, an STFT frame matrix, a
    convolution's activations) with fresh ``mmap`` pages and unmaps them on free, so every
    clip pays page faults on every temporary: measured here, the log-Mel of a 10 s clip costs
    3.0 ms on one thread by default and 1.1 ms with these thresholds (BENCHMARKS.md). Called in
    every process that computes features or trains. Idempotent; returns False (and does
    nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def prepare_compute_process(threads: int) -> None:
    """What every process that computes features, trains or embeds does first: its torch thread
    count (parallelism across processes comes from Ray) and :func:`tune_allocator`."""
    import torch  # deferred: the CLI imports this module (tune_allocator), `asd --help` stays torch-free

    torch.set_num_threads(max(1, int(threads)))
    tune_allocator()
