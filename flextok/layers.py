"""Transformer building blocks shared by the encoder and the decoder.

Conventions of the official release that matter numerically (see the conformance fixture's README):
attention logits are scaled by 8/head_dim (muP), q and k are LayerNorm-ed per head, all LayerNorms are
affine-free with eps 1e-5, the MLP is SwiGLU with hidden size int(2/3 * mlp_ratio * dim), and nothing
has a bias except the embeddings and heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-5


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm over the last dim, no affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=LN_EPS)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        assert dim % head_dim == 0, f"dim {dim} is not a multiple of head_dim {head_dim}"
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, L, D]; mask: bool [L, L] (True = may attend) or None for full attention."""
        B, L, D = x.shape

        def heads(t: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, head_dim]
            return t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q = layer_norm(heads(self.wq(x)))
        k = layer_norm(heads(self.wk(x)))
        v = heads(self.wv(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8.0 / self.head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        self.fc1 = nn.Linear(dim, hidden, bias=False)  # gate branch (SiLU)
        self.fc3 = nn.Linear(dim, hidden, bias=False)  # linear branch
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, head_dim)
        self.mlp = SwiGLU(dim, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(layer_norm(x), mask)
        return x + self.mlp(layer_norm(x))


class AdaLNBlock(nn.Module):
    """adaLN-zero block with separate modulation for the first `num_patches` tokens and the rest.

    The conditioning vector maps to 12*dim numbers: the first 6*dim modulate patch tokens, the last
    6*dim register tokens, each cut as (gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp).
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, head_dim)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN = nn.Linear(dim, 12 * dim)

    def forward(self, x: Tensor, cond: Tensor, num_patches: int) -> Tensor:
        """x: [B, P+n, D]; cond: [B, D] (already passed through SiLU)."""
        B, _, D = x.shape
        mod = self.adaLN(cond).view(B, 2, 6, D)  # [B, group (patch | register), chunk, D]
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mod.unbind(dim=2)  # each [B, 2, D]
        h = split_modulate(layer_norm(x), num_patches, shift_msa, scale_msa)
        x = x + split_scale(self.attn(h), num_patches, gate_msa)
        h = split_modulate(layer_norm(x), num_patches, shift_mlp, scale_mlp)
        return x + split_scale(self.mlp(h), num_patches, gate_mlp)


def split_modulate(x: Tensor, num_patches: int, shift: Tensor, scale: Tensor) -> Tensor:
    """x: [B, L, D]; shift, scale: [B, 2, D], group 0 for tokens < num_patches, group 1 for the rest."""
    P = num_patches
    patches = modulate(x[:, :P], shift[:, :1], scale[:, :1])
    registers = modulate(x[:, P:], shift[:, 1:], scale[:, 1:])
    return torch.cat([patches, registers], dim=1)


def split_scale(x: Tensor, num_patches: int, gate: Tensor) -> Tensor:
    """x: [B, L, D] times gate [B, 2, D] by group, as in `split_modulate`."""
    P = num_patches
    return torch.cat([x[:, :P] * gate[:, :1], x[:, P:] * gate[:, 1:]], dim=1)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2D sin-cos table [grid*grid, dim], row-major; the first half of the channels encodes the row."""
    assert dim % 4 == 0, f"sin-cos position embedding needs dim divisible by 4, got {dim}"
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    r = rows.reshape(-1, 1) * omega  # [G*G, dim/4]
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [cos | sin] features of t*1000 (max period 256) -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 256.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def features(self, t: Tensor) -> Tensor:
        """t: [B] -> [B, freq_dim]; float32, operation order as in the release (it matters at t*1000)."""
        half = self.freq_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = 1000.0 * torch.exp(-math.log(self.max_period) * steps / half)
        args = t.float()[:, None] * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] -> [B, dim]."""
        f = self.features(t).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(f)))
