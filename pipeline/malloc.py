"""Keep glibc's malloc from mapping and unmapping large tensors on every call.

With glibc's defaults a block above the mmap threshold (128 KiB, raised dynamically up to 32 MiB) is mmapped
on allocation and unmapped on free, so every forward pass page-faults its activations back in (~1.5M faults
for a 4-image d12_d12 tokenize); freed heap tops are also trimmed back to the OS. Raising both thresholds
keeps freed memory in the heap for reuse: tokenizing runs ~1.4x faster, at the cost of a higher RSS
(docs/performance.md). Every CPU process of ours gets the setting:

    init = {"runtime_env": runtime_env()}     # ray.init(**init): every worker, actor and train worker of the job
    tune_this_process()                       # the job process itself (jobs.common.run_main), via mallopt(3)

glibc reads the MALLOC_*_ variables once, at process start, so they reach only processes started after they
are set (Ray's workers); the running process is tuned with mallopt(3), which takes effect at once. Other C
libraries ignore both (tune_this_process returns False).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 2**32  # bytes: blocks below this come from the heap (every activation we make)
TRIM_THRESHOLD = 2**36  # bytes of free heap top kept rather than returned to the OS
# One arena (the main heap) for every thread: Ray Train runs the training function in a thread of its own, and
# there the thresholds alone did not help (a train worker started with them: 10,975 page faults for 20 x 64 MiB,
# 1,038 with one arena; the AR train bench's Ray Train / plain loop ratio 0.42 -> 0.97, docs/performance.md).
ARENA_MAX = 1
ENV_VARS = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_ARENA_MAX": str(ARENA_MAX),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters, from glibc's malloc.h
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def env_vars() -> dict[str, str]:
    """Our MALLOC_* variables, except those this process already has (a user's own setting wins, and a job
    submitted with them passes them on itself: Ray refuses a runtime_env that sets a submitted key again)."""
    return {k: v for k, v in ENV_VARS.items() if k not in os.environ}


def runtime_env(base: dict | None = None) -> dict:
    """`base` (a Ray runtime_env, or None) with our variables added to its env_vars (its own values win)."""
    env = dict(base or {})
    env["env_vars"] = {**env_vars(), **env.get("env_vars", {})}
    return env


def tune_this_process() -> bool:
    """Apply the thresholds to the running process with mallopt(3); False where the C library is not glibc
    or the process was started with its own MALLOC_* values (those are kept)."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ENV_VARS):
        return False
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, min(MMAP_THRESHOLD, _INT_MAX))
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, _INT_MAX))
    arena_ok = libc.mallopt(_M_ARENA_MAX, ARENA_MAX)  # threads started from now on share the main heap
    return bool(mmap_ok and trim_ok and arena_ok)
