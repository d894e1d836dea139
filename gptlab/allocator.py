"""glibc's allocator set up for tensors: large blocks served from the heap and kept there once freed.

By default glibc gives every allocation above its mmap threshold (at most 32 MB) fresh pages from the kernel and
hands them back on free, so a CPU training step pays one page fault per 4 KB of each of its large tensors (logits,
activations, gradients, the optimizer's temporaries) at every step again: ~30% of a GPT-2 124M bf16 step on 2 cores
(BENCHMARKS.md). PyTorch's CPU performance guides swap in jemalloc or tcmalloc for this; glibc does the same job when
told to serve large blocks from its heap (M_MMAP_MAX 0) and to keep freed memory for reuse (M_TRIM_THRESHOLD high).
The price: the resident size stays at its peak after large tensors are freed, memory the process will reuse.

Left alone where the user chose otherwise: GPTLAB_MALLOC=system, any MALLOC_* or GLIBC_TUNABLES setting, or another
allocator preloaded; and off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
KEEP_FREED = 2**31 - 1  # bytes of free memory at the heap's top before glibc returns it (mallopt takes a C int)

_tuned: bool | None = None


def user_chose() -> bool:
    """Whether the environment already says how memory is allocated."""
    env = os.environ
    preload = env.get("LD_PRELOAD", "")
    return (env.get("GPTLAB_MALLOC") == "system" or "GLIBC_TUNABLES" in env
            or any(k.startswith("MALLOC_") for k in env) or "jemalloc" in preload or "tcmalloc" in preload)


def tune_for_tensors() -> bool:
    """Apply the settings above once per process; True when they are in effect."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux") and not user_chose():
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _tuned = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_FREED) == 1
    return _tuned
