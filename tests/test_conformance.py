"""Our implementation against outputs of the official FlexTok code (../shared/fixtures/flextok-official-tiny).

Tolerances (float32 on CPU): tokens and FSQ codes exact; everything else relative error below 1e-4,
where relative error = max |ours - official| / max |official|.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flextok import FlexTok

KS = [1, 2, 4, 16, 32]
REL_TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def official(official_tiny):
    model = FlexTok.from_pretrained(official_tiny)
    inputs = load_file(str(official_tiny / "inputs.safetensors"))
    expected = load_file(str(official_tiny / "expected.safetensors"))
    return model, inputs["images"], expected


def test_vae_latents_match(official):
    model, images, expected = official
    assert rel_err(model.vae.encode(images), expected["vae_latents"]) < REL_TOL


def test_tokens_match_exactly(official):
    model, images, expected = official
    tokens = model.tokenize(images)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected["tokens"])


def test_fsq_codes_match_exactly(official):
    model, _, expected = official
    assert torch.equal(model.fsq.indices_to_codes(expected["tokens"]), expected["fsq_codes"])


@pytest.mark.parametrize("k", KS)
def test_decoder_velocity_matches(official, k):
    model, _, expected = official
    ids, keep_k = model.pad_tokens(expected["tokens"][:, :k])
    t = torch.full((ids.shape[0],), 0.7)
    with torch.no_grad():
        velocity = model.decoder(expected["noise"], t, model.fsq.indices_to_codes(ids), keep_k)
    assert rel_err(velocity, expected[f"velocity_k{k}"]) < REL_TOL


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("guidance", ["g1", "apg"])
def test_reconstruction_matches(official, k, guidance):
    model, _, expected = official
    scale, apg = (1.0, False) if guidance == "g1" else (7.5, True)
    recon = model.detokenize(
        expected["tokens"][:, :k], timesteps=4, guidance_scale=scale, apg=apg, noise=expected["noise"]
    )
    assert rel_err(recon, expected[f"recon_k{k}_{guidance}"]) < REL_TOL


def test_plain_cfg_reconstruction_matches(official):
    model, _, expected = official
    recon = model.detokenize(expected["tokens"][:, :4], timesteps=4, guidance_scale=3.0, noise=expected["noise"])
    assert rel_err(recon, expected["recon_k4_cfg3"]) < REL_TOL


def test_generator_draws_the_official_noise(official):
    """The fixture's noise is what the official sampler draws from Generator().manual_seed(123)."""
    model, _, expected = official
    recon = model.detokenize(
        expected["tokens"][:, :4], timesteps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(123)
    )
    assert rel_err(recon, expected["recon_k4_cfg3"]) < REL_TOL
