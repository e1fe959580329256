"""Model configuration: small typed dataclasses and the named presets.

A FlexTok model is a frozen VAE (or the `pixel` space-to-depth stand-in), a ViT encoder that resamples
2x2 latent patches into an ordered set of registers, an FSQ quantizer, and a rectified-flow decoder.
Official widths follow the release's muP convention: width = 64 * depth, head_dim = 64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# The VAE architecture of the official releases (EPFL-VILAB/flextok_vae_c{4,8,16}): Stable Diffusion's
# AutoencoderKL layout with a configurable number of latent channels.
SD_VAE_ARCH: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 256,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


@dataclass
class VAEConfig:
    """Latent space. `kind="kl"`: a diffusers AutoencoderKL; `kind="pixel"`: space-to-depth of the pixels."""

    kind: Literal["kl", "pixel"] = "kl"
    latent_channels: int = 16
    downsample: int = 8  # pixels per latent cell along each side
    scaling_factor: float | None = None  # None: take it from the AutoencoderKL config (official rule)
    sample_posterior: bool = False  # False: posterior mode, deterministic tokens
    # AutoencoderKL constructor arguments (kind="kl" only); latent_channels is filled in from above.
    arch: dict[str, Any] = field(default_factory=lambda: dict(SD_VAE_ARCH))


@dataclass
class EncoderConfig:
    dim: int = 768
    depth: int = 12
    head_dim: int = 64
    mlp_ratio: float = 4.0
    num_registers: int = 256  # the maximum number of tokens per image
    patch_size: int = 2  # on the latent grid


@dataclass
class DecoderConfig:
    dim: int = 768
    depth: int = 12
    head_dim: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 2
    time_freq_dim: int = 256  # sinusoidal features of t before the time MLP
    time_max_period: float = 256.0
    repa_layer: int | None = None  # block index whose output the REPA loss reads (training only)
    nested_dropout_mode: Literal["uniform", "pow2"] = "uniform"  # train-time sampling of k
    null_cond_prob: float = 0.1  # train-time probability of replacing all registers by the null condition


@dataclass
class FlexTokConfig:
    image_size: int = 256
    vae: VAEConfig = field(default_factory=VAEConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample

    @property
    def num_registers(self) -> int:
        return self.encoder.num_registers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlexTokConfig:
        """Build from `to_dict` output; unknown keys are an error (names the key)."""
        _check_keys(cls, d, "")
        sub = {"vae": VAEConfig, "encoder": EncoderConfig, "decoder": DecoderConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sub:
                _check_keys(sub[key], value, key + ".")
                kwargs[key] = sub[key](**value)
            elif key == "fsq_levels":
                kwargs[key] = tuple(int(v) for v in value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _check_keys(cls: type, d: Any, prefix: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"config entry '{prefix.rstrip('.') or 'root'}' must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}")


def _official(enc_depth: int, dec_depth: int) -> FlexTokConfig:
    return FlexTokConfig(
        image_size=256,
        vae=VAEConfig(kind="kl", latent_channels=16, downsample=8),
        encoder=EncoderConfig(dim=64 * enc_depth, depth=enc_depth, head_dim=64, num_registers=256),
        decoder=DecoderConfig(dim=64 * dec_depth, depth=dec_depth, head_dim=64, repa_layer=1),
    )


def tiny(image_size: int = 32, num_registers: int = 32) -> FlexTokConfig:
    """A CPU-trainable model: pixel latents (space-to-depth by 4), small widths."""
    return FlexTokConfig(
        image_size=image_size,
        vae=VAEConfig(kind="pixel", latent_channels=3 * 4 * 4, downsample=4, scaling_factor=1.0, arch={}),
        encoder=EncoderConfig(dim=64, depth=2, head_dim=32, num_registers=num_registers),
        decoder=DecoderConfig(dim=96, depth=2, head_dim=32, repa_layer=1),
    )


PRESETS = {
    "tiny": tiny,
    "d12_d12": lambda: _official(12, 12),
    "d18_d18": lambda: _official(18, 18),
    "d18_d28": lambda: _official(18, 28),
}


def preset(name: str) -> FlexTokConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
