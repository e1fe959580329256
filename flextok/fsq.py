"""Finite scalar quantization (Mentzer et al., 2023) as the FlexTok release does it.

Each register is projected to len(levels) numbers; each is squashed by a shifted tanh into
[-(L-1)/2, (L-1)/2] (even levels are offset by 1/2, hence asymmetric), rounded with a straight-through
gradient, and renormalised to a code in [-1, 1]. Codes map to token ids by a little-endian mixed radix:
id = sum_i digit_i * prod(levels[:i]), digit_i = code_i * (L_i // 2) + L_i // 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FSQ(nn.Module):
    def __init__(self, levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        self.eps = eps
        self.init_buffers()

    def init_buffers(self) -> None:
        """The level tables (not saved in checkpoints; recomputed after `to_empty`)."""
        device = None if getattr(self, "_levels", None) is None else self._levels.device
        basis = [math.prod(self.levels[:i]) for i in range(self.dim)]
        lv = torch.tensor(self.levels, dtype=torch.float32, device=device)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64, device=device), persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels.remainder(2) == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: Tensor) -> Tensor:
        """z [..., dim] (any float) -> codes [..., dim] in [-1, 1], straight-through gradient, float32."""
        bounded = self.bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / self._half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """codes [..., dim] -> token ids [...] (int64)."""
        digits = (codes.float() * self._half_width + self._half_width).round().long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """token ids [...] -> codes [..., dim] (float32)."""
        self.check_indices(indices)
        digits = (indices.long()[..., None] // self._basis) % self._levels.long()
        return (digits.float() - self._half_width) / self._half_width

    def check_indices(self, indices: Tensor) -> None:
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            bad = indices[(indices < 0) | (indices >= self.codebook_size)]
            raise ValueError(
                f"token ids must lie in 0..{self.codebook_size - 1}; got {bad.numel()} outside, e.g. {bad[:5].tolist()}"
            )
