"""FlexTok: resampling images into ordered 1D token sequences of flexible length (arXiv 2502.13967)."""

from .config import DecoderConfig, EncoderConfig, FlexTokConfig, VAEConfig, preset
from .model import FlexTok

__all__ = ["FlexTok", "FlexTokConfig", "VAEConfig", "EncoderConfig", "DecoderConfig", "preset"]
