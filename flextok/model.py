"""FlexTok: images <-> ordered 1D token sequences of any length up to `num_registers`.

    tokens = model.tokenize(images)                 # [B, n] int64, images in [-1, 1]
    images = model.detokenize(tokens[:, :k])        # any prefix decodes; [B, 3, H, W] in about [-1, 1]
    images = model.detokenize([t1, t2, t3])         # different lengths in one batch

`loss()` is the training objective (rectified flow with nested dropout and null-condition dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_state_dict_strict, read_checkpoint, save_pretrained
from .config import FlexTokConfig
from .decoder import Decoder
from .encoder import Encoder
from .fsq import FSQ
from .sampling import Guidance, euler_sample
from .vae import VAE

TokenInput = Tensor | Sequence[Tensor]


class FlexTok(nn.Module):
    def __init__(self, cfg: FlexTokConfig):
        super().__init__()
        self.cfg = cfg
        C, size, n = cfg.vae.latent_channels, cfg.latent_size, cfg.num_registers
        if cfg.image_size % cfg.vae.downsample:
            raise ValueError(
                f"image_size {cfg.image_size} is not a multiple of the VAE downsample {cfg.vae.downsample}"
            )
        self.vae = VAE(cfg.vae)
        self.fsq = FSQ(cfg.fsq_levels)
        self.encoder = Encoder(cfg.encoder, C, size, self.fsq.dim)
        self.decoder = Decoder(cfg.decoder, C, size, n, self.fsq.dim)
        self.init_weights()

    # ------------------------------------------------------------------ construction / checkpoints
    def init_weights(self) -> None:
        """The release's init: xavier-uniform linears with zero biases, N(0, 0.02) learned tokens,
        zero adaLN modulations and output heads (adaLN-zero)."""
        if self.decoder.mask_token.is_meta:
            return
        for module in (self.encoder, self.decoder):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for p in (
            self.encoder.registers,
            self.decoder.register_pos_embed,
            self.decoder.mask_token,
            self.decoder.null_cond,
        ):
            nn.init.trunc_normal_(p, std=0.02)
        zero = [self.encoder.to_latents, self.decoder.final_adaLN, self.decoder.final_proj]
        zero += [block.adaLN for block in self.decoder.blocks]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, map_location: str | torch.device = "cpu") -> FlexTok:
        """Load our format or the official one (config.json + model.safetensors): a folder, an fsspec URL of
        one (s3://...) or a hub id."""
        cfg, tensors = read_checkpoint(path_or_hub_id, map_location)
        with torch.device("meta"):
            model = cls(cfg)  # no memory and no random init: every tensor comes from the checkpoint
        model = model.to_empty(device=map_location)
        model.init_buffers()
        load_state_dict_strict(model, tensors)
        return model.eval()

    def init_buffers(self) -> None:
        """Recompute the buffers checkpoints do not hold (attention mask, FSQ tables), e.g. after `to_empty`."""
        self.encoder.init_buffers()
        self.fsq.init_buffers()

    def save_pretrained(self, directory: str | Path) -> None:
        """Our format: config.json + model.safetensors (flextok.checkpoint)."""
        save_pretrained(self, directory)

    @property
    def device(self) -> torch.device:
        return self.decoder.mask_token.device

    @property
    def num_registers(self) -> int:
        return self.cfg.num_registers

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    # ------------------------------------------------------------------ encoding
    def check_images(self, images: Tensor) -> None:
        s = self.cfg.image_size
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor [B, 3, {s}, {s}] in [-1, 1]")
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise ValueError(f"images must have shape [B, 3, {s}, {s}], got {list(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= -1.001 and hi <= 1.001):  # also catches NaN
            raise ValueError(f"images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] (pixels/127.5 - 1)")

    def encode_codes(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """images -> (VAE latents [B, C, h, w], FSQ codes [B, n, 6]); differentiable w.r.t. the encoder."""
        latents = self.vae.encode(images, generator=generator)
        return latents, self.fsq.quantize(self.encoder(latents))

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """images float [B, 3, H, W] in [-1, 1] -> token ids int64 [B, n], ordered coarse to fine."""
        self.check_images(images)
        _, codes = self.encode_codes(images.to(self.device))
        return self.fsq.codes_to_indices(codes)

    # ------------------------------------------------------------------ decoding
    def pad_tokens(self, tokens: TokenInput) -> tuple[Tensor, Tensor]:
        """[B, k] tensor or list of 1D tensors -> (ids [B, n] padded with 0, keep_k [B])."""
        n = self.num_registers
        rows = list(tokens) if not isinstance(tokens, Tensor) else None
        if rows is None:
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be [B, k] or a list of 1D tensors, got shape {list(tokens.shape)}")
            rows = list(tokens)
        if not rows:
            raise ValueError("tokens is an empty batch")
        ids = torch.zeros(len(rows), n, dtype=torch.long, device=self.device)
        keep_k = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            row = torch.as_tensor(row)
            if row.ndim != 1:
                raise ValueError(f"token sequence {b} must be 1D, got shape {list(row.shape)}")
            k = row.shape[0]
            if not 1 <= k <= n:
                raise ValueError(f"token sequence {b} has length k={k}; this model decodes 1 <= k <= {n}")
            self.fsq.check_indices(row)
            ids[b, :k] = row.to(self.device)
            keep_k[b] = k
        return ids, keep_k

    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial x at t = 1, one randn draw per image in order (the release's order)."""
        C, h = self.cfg.vae.latent_channels, self.cfg.latent_size
        draws = [torch.randn((1, C, h, h), generator=generator, device=self.device) for _ in range(batch)]
        return torch.cat(draws)

    @torch.no_grad()
    def decode_latents(
        self,
        tokens: TokenInput,
        timesteps: int = 25,
        guidance_scale: float = 1.0,
        apg: bool = False,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Token prefixes -> sampled VAE latents [B, C, h, w] (before the VAE decoder)."""
        ids, keep_k = self.pad_tokens(tokens)
        codes = self.fsq.indices_to_codes(ids)  # [B, n, 6]
        B = ids.shape[0]
        if noise is None:
            noise = self.draw_noise(B, generator)
        C, h = self.cfg.vae.latent_channels, self.cfg.latent_size
        if tuple(noise.shape) != (B, C, h, h):
            raise ValueError(f"noise must have shape {[B, C, h, h]}, got {list(noise.shape)}")
        guidance = Guidance(scale=float(guidance_scale), apg=apg)
        dtype = self.decoder.patch_embed.weight.dtype
        codes = codes.to(dtype)
        codes2, keep2 = torch.cat([codes, codes]), torch.cat([keep_k, keep_k])
        null2 = torch.arange(2 * B, device=self.device) >= B  # second half: unconditional

        def velocity(x: Tensor, t: Tensor, with_uncond: bool) -> Tensor:
            x = x.to(dtype)
            if not with_uncond:
                return self.decoder(x, t, codes, keep_k)
            return self.decoder(torch.cat([x, x]), torch.cat([t, t]), codes2, keep2, null2)

        return euler_sample(velocity, noise.to(self.device, torch.float32), timesteps, guidance)

    @torch.no_grad()
    def detokenize(
        self,
        tokens: TokenInput,
        timesteps: int = 25,
        guidance_scale: float = 1.0,
        apg: bool = False,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Token prefixes (LongTensor [B, k] or a list of 1D tensors of any lengths 1..n) -> images
        [B, 3, H, W], nominally in [-1, 1] (not clamped, as in the release). The release's recommended
        setting for its trained models is guidance_scale=7.5 with apg=True."""
        latents = self.decode_latents(tokens, timesteps, guidance_scale, apg, noise, generator)
        return self.vae.decode(latents.to(self.decoder.patch_embed.weight.dtype)).float()

    # ------------------------------------------------------------------ training
    def sample_keep_k(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Nested-dropout lengths: uniform over 1..n, or uniform over the powers of two up to n."""
        n = self.num_registers
        if self.cfg.decoder.nested_dropout_mode == "pow2":
            powers = torch.tensor([2**i for i in range(n.bit_length()) if 2**i <= n])
            choice = torch.randint(len(powers), (batch,), generator=generator)
            return powers[choice].to(self.device)
        return torch.randint(1, n + 1, (batch,), generator=generator).to(self.device)

    def loss(
        self, images: Tensor, generator: torch.Generator | None = None, return_repa: bool = False
    ) -> dict[str, Tensor]:
        """Rectified-flow loss: MSE between predicted velocity and (noise - x_0) at logit-normal t,
        with nested dropout over k and null-condition dropout. Returns {'loss', 'keep_k'[, 'repa']}."""
        latents, codes = self.encode_codes(images, generator)
        B = latents.shape[0]
        dev = latents.device
        keep_k = self.sample_keep_k(B, generator)
        null = (torch.rand(B, generator=generator) < self.cfg.decoder.null_cond_prob).to(dev)
        t = torch.sigmoid(torch.randn(B, generator=generator)).to(dev)  # logit-normal
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        tb = t.view(-1, 1, 1, 1)
        x_t = tb * noise + (1 - tb) * latents
        out = self.decoder(x_t, t, codes, keep_k, null, return_repa=return_repa)
        velocity, repa = out if return_repa else (out, None)
        result = {"loss": F.mse_loss(velocity.float(), noise - latents), "keep_k": keep_k}
        if repa is not None:
            result["repa"] = repa
        return result
