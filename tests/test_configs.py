"""Presets: the official sizes, counted on the meta device (nothing is allocated)."""

from __future__ import annotations

import pytest
import torch

from flextok import FlexTok, FlexTokConfig, preset

# Official totals including the VAE, as published for EPFL-VILAB/flextok_{d12_d12,d18_d18,d18_d28}.
OFFICIAL_TOTALS = {"d12_d12": 342e6, "d18_d18": 950e6, "d18_d28": 2.54e9}


@pytest.mark.parametrize("name", sorted(OFFICIAL_TOTALS))
def test_parameter_count_matches_the_official_total(name):
    with torch.device("meta"):
        model = FlexTok(preset(name))
    assert all(p.is_meta for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(OFFICIAL_TOTALS[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(OFFICIAL_TOTALS))
def test_official_presets_use_the_release_architecture(name):
    cfg = preset(name)
    assert cfg.image_size == 256 and cfg.num_registers == 256 and cfg.latent_size == 32
    assert cfg.vae.latent_channels == 16 and cfg.vae.downsample == 8
    assert cfg.encoder.dim == 64 * cfg.encoder.depth and cfg.decoder.dim == 64 * cfg.decoder.depth
    assert cfg.fsq_levels == (8, 8, 8, 5, 5, 5)


def test_config_dict_round_trip():
    cfg = preset("d18_d28")
    assert FlexTokConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="d12_d12"):
        preset("d24")
