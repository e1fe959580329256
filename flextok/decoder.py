"""The FlexTok decoder: a rectified-flow transformer over [noised latent patches | register tokens].

Register inputs: FSQ codes -> Linear -> + learned position embedding; then positions >= k are replaced
by a learned mask token (nested dropout), and for the unconditional pass of guidance every position is
replaced by a learned null condition. Patches and registers attend to everything; adaLN-zero from the
time embedding modulates patches and registers separately. Output: the velocity (noise - data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecoderConfig
from .encoder import patchify, unpatchify
from .layers import AdaLNBlock, TimestepEmbedder, layer_norm, modulate, sincos_2d


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, latent_channels: int, latent_size: int, num_registers: int, code_dim: int):
        super().__init__()
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.dim
        if latent_size % p:
            raise ValueError(f"latent size {latent_size} is not a multiple of the patch size {p}")
        self.grid = latent_size // p
        self.num_patches = self.grid**2
        self.num_registers = num_registers
        # register tokens
        self.token_embed = nn.Linear(code_dim, D)
        self.register_pos_embed = nn.Parameter(torch.zeros(num_registers, D))
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.null_cond = nn.Parameter(torch.zeros(D))
        # noised latent patches
        self.patch_embed = nn.Linear(p * p * latent_channels, D)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid))  # [P, D], fixed
        self.time_embed = TimestepEmbedder(D, cfg.time_freq_dim, cfg.time_max_period)
        self.blocks = nn.ModuleList(AdaLNBlock(D, cfg.head_dim, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_adaLN = nn.Linear(D, 2 * D)  # -> [shift | scale]
        self.final_proj = nn.Linear(D, p * p * latent_channels)

    def register_tokens(self, codes: Tensor, keep_k: Tensor, null: Tensor | None = None) -> Tensor:
        """codes [B, n, code_dim], keep_k [B] in 1..n, null bool [B] or None -> tokens [B, n, D]."""
        x = self.token_embed(codes) + self.register_pos_embed  # [B, n, D]
        position = torch.arange(self.num_registers, device=codes.device)
        dropped = position[None, :] >= keep_k[:, None]  # [B, n]
        x = torch.where(dropped[..., None], self.mask_token.to(x.dtype), x)
        if null is not None:
            x = torch.where(null[:, None, None], self.null_cond.to(x.dtype), x)
        return x

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        codes: Tensor,
        keep_k: Tensor,
        null: Tensor | None = None,
        return_repa: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x_t [B, C, h, w], t [B] -> velocity [B, C, h, w] (and the REPA layer's patch tokens [B, P, D])."""
        P = self.num_patches
        patches = self.patch_embed(patchify(x_t, self.cfg.patch_size)) + self.pos_embed  # [B, P, D]
        x = torch.cat([patches, self.register_tokens(codes, keep_k, null)], dim=1)  # [B, P+n, D]
        cond = F.silu(self.time_embed(t))  # [B, D]
        repa = None
        for i, block in enumerate(self.blocks):
            x = block(x, cond, P)
            if i == self.cfg.repa_layer:
                repa = x[:, :P]
        shift, scale = self.final_adaLN(cond)[:, None].chunk(2, dim=-1)  # each [B, 1, D]
        out = self.final_proj(modulate(layer_norm(x[:, :P]), shift, scale))  # [B, P, p*p*C]
        velocity = unpatchify(out, self.cfg.patch_size, self.grid)
        if return_repa:
            if repa is None:
                raise ValueError("decoder.repa_layer is not set (or beyond the depth); no REPA features")
            return velocity, repa
        return velocity
