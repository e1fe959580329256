"""The FlexTok encoder: latent patches + learned registers -> one FSQ input vector per register.

Attention is register-causal: patches see all patches (and no registers); register i sees all patches
and registers 0..i. This is what makes every prefix of the register sequence a self-contained summary.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import EncoderConfig
from .layers import Block, layer_norm, sincos_2d


def patchify(latents: Tensor, p: int) -> Tensor:
    """[B, C, h, w] -> [B, (h/p)*(w/p), p*p*C]; features ordered (row-in-patch, col-in-patch, channel)."""
    return rearrange(latents, "b c (gh ph) (gw pw) -> b (gh gw) (ph pw c)", ph=p, pw=p)


def unpatchify(patches: Tensor, p: int, grid: int) -> Tensor:
    """Inverse of `patchify` for a square grid: [B, G*G, p*p*C] -> [B, C, G*p, G*p]."""
    return rearrange(patches, "b (gh gw) (ph pw c) -> b c (gh ph) (gw pw)", gh=grid, ph=p, pw=p)


def register_causal_mask(num_patches: int, num_registers: int) -> Tensor:
    """bool [P+n, P+n], True = may attend."""
    P, n = num_patches, num_registers
    mask = torch.zeros(P + n, P + n, dtype=torch.bool)
    mask[:, :P] = True  # everyone sees all patches
    mask[P:, P:] = torch.ones(n, n, dtype=torch.bool).tril()  # register i sees registers 0..i
    return mask


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, latent_channels: int, latent_size: int, code_dim: int):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        if latent_size % p:
            raise ValueError(f"latent size {latent_size} is not a multiple of the patch size {p}")
        self.grid = latent_size // p
        self.num_patches = self.grid**2
        self.patch_embed = nn.Linear(p * p * latent_channels, cfg.dim)
        self.register_buffer("pos_embed", sincos_2d(cfg.dim, self.grid))  # [P, D], fixed
        self.registers = nn.Parameter(torch.zeros(cfg.num_registers, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.to_latents = nn.Linear(cfg.dim, code_dim)
        self.init_buffers()

    def init_buffers(self) -> None:
        """The attention mask (not saved in checkpoints; recomputed after `to_empty`)."""
        device = None if getattr(self, "attn_mask", None) is None else self.attn_mask.device
        mask = register_causal_mask(self.num_patches, self.cfg.num_registers)
        mask = mask if device is None else mask.to(device)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] -> FSQ inputs [B, n, code_dim]."""
        x = self.patch_embed(patchify(latents, self.cfg.patch_size)) + self.pos_embed  # [B, P, D]
        registers = self.registers.expand(x.shape[0], -1, -1)  # [B, n, D]
        x = torch.cat([x, registers], dim=1)  # [B, P+n, D]
        for block in self.blocks:
            x = block(x, self.attn_mask)
        return self.to_latents(layer_norm(x[:, self.num_patches :]))  # [B, n, code_dim]
