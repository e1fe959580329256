"""The FlexTok API on the `tiny` preset: shapes, the prefix property, batching, determinism, bad inputs."""

from __future__ import annotations

import pytest
import torch

from flextok import FlexTok, preset


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1


def test_tokenize_returns_one_id_per_register(tiny_model, images):
    tokens = tiny_model.tokenize(images)
    assert tokens.shape == (3, tiny_model.num_registers)
    assert tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 64000
    assert len(torch.unique(tokens)) > 10  # a perturbed random model spreads over many codes


def test_register_i_does_not_depend_on_later_registers(tiny_model, images):
    """Register-causal attention: token i is a function of the image and registers 0..i only."""
    before = tiny_model.tokenize(images)
    with torch.no_grad():
        saved = tiny_model.encoder.registers[10:].clone()
        tiny_model.encoder.registers[10:].add_(torch.randn_like(saved))
        after = tiny_model.tokenize(images)
        tiny_model.encoder.registers[10:] = saved
    assert torch.equal(after[:, :10], before[:, :10])
    assert not torch.equal(after[:, 10:], before[:, 10:])


def test_patches_do_not_attend_to_registers(tiny_model):
    mask = tiny_model.encoder.attn_mask
    P = tiny_model.encoder.num_patches
    assert mask[:P, :P].all() and not mask[:P, P:].any()
    assert mask[P:, :P].all()
    assert torch.equal(mask[P:, P:], torch.ones_like(mask[P:, P:]).tril())


def test_mixed_length_batch_equals_one_image_at_a_time(tiny_model, images):
    tokens = tiny_model.tokenize(images)
    prefixes = [tokens[0, :1], tokens[1, :7], tokens[2, :32]]
    noise = tiny_model.draw_noise(3, torch.Generator().manual_seed(0))
    batched = tiny_model.detokenize(prefixes, timesteps=3, guidance_scale=2.0, apg=True, noise=noise)
    for b, prefix in enumerate(prefixes):
        single = tiny_model.detokenize([prefix], timesteps=3, guidance_scale=2.0, apg=True, noise=noise[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-5)


def test_tensor_and_list_inputs_agree(tiny_model, images):
    tokens = tiny_model.tokenize(images)[:, :5]
    noise = tiny_model.draw_noise(3, torch.Generator().manual_seed(0))
    a = tiny_model.detokenize(tokens, timesteps=2, noise=noise)
    b = tiny_model.detokenize(list(tokens), timesteps=2, noise=noise)
    assert torch.equal(a, b)


def test_detokenize_is_deterministic_given_a_seeded_generator(tiny_model, images):
    tokens = tiny_model.tokenize(images)[:, :4]
    a = tiny_model.detokenize(tokens, timesteps=2, generator=torch.Generator().manual_seed(7))
    b = tiny_model.detokenize(tokens, timesteps=2, generator=torch.Generator().manual_seed(7))
    c = tiny_model.detokenize(tokens, timesteps=2, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_more_tokens_change_the_decoder_input(tiny_model, images):
    tokens = tiny_model.tokenize(images)
    noise = tiny_model.draw_noise(3, torch.Generator().manual_seed(0))
    short = tiny_model.detokenize(tokens[:, :1], timesteps=2, noise=noise)
    long = tiny_model.detokenize(tokens, timesteps=2, noise=noise)
    assert not torch.allclose(short, long)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 3, 32, 32) * 255, r"\[-1, 1\]"),
        (torch.rand(2, 3, 64, 64), r"shape \[B, 3, 32, 32\]"),
        (torch.rand(2, 1, 32, 32), r"shape \[B, 3, 32, 32\]"),
        (torch.rand(3, 32, 32), r"shape \[B, 3, 32, 32\]"),
        (torch.full((1, 3, 32, 32), float("nan")), r"\[-1, 1\]"),
    ],
)
def test_tokenize_rejects_bad_images(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.tokenize(bad)


def test_tokenize_rejects_integer_images(tiny_model):
    with pytest.raises(TypeError, match="float"):
        tiny_model.tokenize(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    "tokens, error, message",
    [
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "k=0"),
        (torch.zeros(2, 33, dtype=torch.long), ValueError, "k=33"),
        ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], ValueError, "k=0"),
        (torch.tensor([[1, 64000]]), ValueError, "0..63999"),
        (torch.tensor([[-3, 1]]), ValueError, "0..63999"),
        (torch.tensor([[0.5, 1.0]]), TypeError, "integer"),
        ([], ValueError, "empty"),
        (torch.zeros(4, dtype=torch.long), ValueError, r"\[B, k\]"),
    ],
)
def test_detokenize_rejects_bad_tokens(tiny_model, tokens, error, message):
    with pytest.raises(error, match=message):
        tiny_model.detokenize(tokens, timesteps=1)


def test_detokenize_rejects_noise_of_the_wrong_shape(tiny_model):
    with pytest.raises(ValueError, match="noise must have shape"):
        tiny_model.detokenize(torch.zeros(2, 4, dtype=torch.long), timesteps=1, noise=torch.zeros(2, 48, 4, 4))


def test_pixel_latents_are_exactly_invertible(tiny_model, images):
    assert torch.equal(tiny_model.vae.decode(tiny_model.vae.encode(images)), images)


def test_loss_trains_encoder_and_decoder_but_not_the_vae(official_tiny, images):
    model = FlexTok.from_pretrained(official_tiny).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = model.loss(x, generator=torch.Generator().manual_seed(0), return_repa=True)
    out["loss"].backward()
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["repa"].shape == (2, model.decoder.num_patches, model.cfg.decoder.dim)
    assert model.encoder.registers.grad is not None and model.encoder.registers.grad.abs().sum() > 0
    assert model.decoder.mask_token.grad is not None
    assert all(p.grad is None for p in model.vae.parameters())
    assert not model.vae.training  # frozen VAE stays in eval mode


def test_nested_dropout_pow2_samples_only_powers_of_two():
    cfg = preset("tiny")
    cfg.decoder.nested_dropout_mode = "pow2"
    model = FlexTok(cfg)
    ks = model.sample_keep_k(1000, torch.Generator().manual_seed(0))
    assert set(ks.tolist()) == {1, 2, 4, 8, 16, 32}


def test_nested_dropout_uniform_covers_1_to_n(tiny_model):
    ks = tiny_model.sample_keep_k(5000, torch.Generator().manual_seed(0))
    assert set(ks.tolist()) == set(range(1, 33))


def test_posterior_sampling_is_an_option_and_mode_is_the_default(official_tiny):
    model = FlexTok.from_pretrained(official_tiny)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    mode = model.vae.encode(x)
    assert torch.equal(model.vae.encode(x), mode)
    s1 = model.vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    s2 = model.vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2) and not torch.equal(s1, mode)
