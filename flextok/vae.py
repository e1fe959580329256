"""The latent space FlexTok works in: a frozen diffusers AutoencoderKL, or `pixel` space-to-depth.

Latents are scaled by the scaling factor after encoding and unscaled before decoding (official rule:
the FlexTok config's value if set, else the AutoencoderKL config's). Decoded images are not clamped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder: nn.Module | None = None
        if cfg.kind == "kl":
            from diffusers import AutoencoderKL  # imported lazily: diffusers is slow to import

            self.autoencoder = AutoencoderKL(**{**cfg.arch, "latent_channels": cfg.latent_channels})
            if 2 ** (len(self.autoencoder.config.down_block_types) - 1) != cfg.downsample:
                raise ValueError(f"VAE arch downsamples by a different factor than vae.downsample={cfg.downsample}")
            scaling = cfg.scaling_factor or self.autoencoder.config.scaling_factor
        elif cfg.kind == "pixel":
            if cfg.latent_channels != 3 * cfg.downsample**2:
                raise ValueError(
                    f"pixel latents of a {cfg.downsample}x downsample have {3 * cfg.downsample**2} channels, "
                    f"config says {cfg.latent_channels}"
                )
            scaling = cfg.scaling_factor or 1.0
        else:
            raise ValueError(f"unknown vae.kind '{cfg.kind}' (expected 'kl' or 'pixel')")
        self.scaling_factor = float(scaling)
        self.requires_grad_(False)  # always frozen
        super().train(False)

    def train(self, mode: bool = True) -> VAE:
        return self  # frozen: stays in eval mode

    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f], scaled."""
        if self.autoencoder is None:
            return F.pixel_unshuffle(images, self.cfg.downsample) * self.scaling_factor
        posterior = self.autoencoder.encode(images).latent_dist
        sample = self.cfg.sample_posterior if sample is None else sample
        latents = posterior.sample(generator=generator) if sample else posterior.mode()
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, C, h, w] (scaled) -> images [B, 3, h*f, w*f], unclamped."""
        latents = latents / self.scaling_factor
        if self.autoencoder is None:
            return F.pixel_shuffle(latents, self.cfg.downsample)
        return self.autoencoder.decode(latents).sample
