"""Which device an actor or Ray Train worker runs on: the one it was given, or a clear error.

A worker that Ray gave a GPU but that cannot see CUDA (a CPU-only torch, a node without the driver, an
empty CUDA_VISIBLE_DEVICES) would otherwise run on the CPU, 50x slower and silently. It stops instead.
"""

from __future__ import annotations

import os

import torch


class NoCudaError(RuntimeError):
    """A stage was given a GPU but sees no CUDA."""


def stage_device(stage: str, use_gpu: bool) -> str:
    """'cuda' for a stage given GPUs (NoCudaError when CUDA is not there), else 'cpu'."""
    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise NoCudaError(
            f"{stage} was given a GPU but sees no CUDA (CUDA_VISIBLE_DEVICES={visible!r}, torch "
            f"{torch.__version__} built for CUDA {torch.version.cuda}); run it with 0 GPUs or fix the node's CUDA"
        )
    return "cuda"
