"""The class-conditional AR model: sizes, causality, label dropout, generate (k, CFG, KV cache), checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flextok.ar import ARConfig, ARModel, ar_preset, sample_logits
from flextok.checkpoint import CheckpointError


def tiny_ar(seed: int = 0, **overrides) -> ARModel:
    torch.manual_seed(seed)
    return ARModel(ar_preset("tiny", **overrides)).eval()


@pytest.mark.parametrize(("name", "millions"), [("d10", 49), ("d12", 85), ("d16", 201), ("d30", 1327)])
def test_preset_sizes_on_meta_device(name, millions):
    with torch.device("meta"):
        model = ARModel(ar_preset(name))
    assert model.num_params() / 1e6 == pytest.approx(millions, rel=0.02)
    assert model.num_params(embeddings=True) > model.num_params()  # + 64k-vocab embeddings and head
    assert model.cfg.vocab_size == 64000 and model.cfg.max_tokens == 256


def test_logits_are_causal():
    model = tiny_ar()
    labels = torch.tensor([3, 7])
    tokens = torch.randint(0, 64000, (2, 20))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64000
    a, b = model(labels, tokens), model(labels, changed)
    assert a.shape == (2, 21, 64000)
    torch.testing.assert_close(a[:, :11], b[:, :11])  # position i sees tokens < i only
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_label_dropout_only_in_training():
    model = tiny_ar(class_dropout_prob=1.0)
    labels = torch.tensor([1, 2, 3])
    assert model.drop_labels(labels).tolist() == [1, 2, 3]  # eval mode
    model.train()
    assert model.drop_labels(labels).tolist() == [model.null_class] * 3


def test_loss_falls_and_ignores_padding():
    model = tiny_ar().train()
    labels = torch.arange(4)
    tokens = torch.randint(0, 64000, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model.loss(labels, tokens)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 2.0
    model.eval()
    lengths = torch.tensor([16, 8, 8, 1])
    garbage = tokens.clone()
    garbage[1:3, 8:] = 5
    garbage[3, 1:] = 9
    torch.testing.assert_close(model.loss(labels, tokens, lengths), model.loss(labels, garbage, lengths))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_kv_cache_equals_no_cache(cfg_scale):
    model = tiny_ar()
    labels = torch.tensor([0, 5, 999, 1000])

    def run(use_cache: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return model.generate(labels, 32, cfg_scale, 1.0, 500, 0.95, g, use_cache=use_cache)

    cached = run(True)
    assert torch.equal(cached, run(False))
    # and the logits themselves agree position by position
    caches = model.new_caches(4, 32)
    x = model.embed(labels, cached[:, :-1])
    step_logits = torch.cat([model.transformer(x[:, i : i + 1], i, caches) for i in range(32)], dim=1)
    torch.testing.assert_close(step_logits, model(labels, cached[:, :-1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 7, 32])
def test_generate_honours_k(k):
    out = tiny_ar().generate(torch.tensor([1, 2]), num_tokens=k, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, k) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < 64000


def test_generate_rejects_bad_arguments():
    model = tiny_ar()
    with pytest.raises(ValueError, match="num_tokens"):
        model.generate(torch.tensor([1]), num_tokens=33)
    with pytest.raises(ValueError, match="labels"):
        model.generate(torch.tensor([1001]), num_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([1]), num_tokens=4, top_p=0.0)


def test_cfg_mixes_conditional_and_unconditional_logits():
    model = tiny_ar()
    labels = torch.tensor([10, 20])
    null = torch.full_like(labels, model.null_class)
    empty = torch.empty(2, 0, dtype=torch.long)
    cond, uncond = model(labels, empty)[:, -1], model(null, empty)[:, -1]
    expected = (uncond + 4.0 * (cond - uncond)).argmax(-1)
    assert torch.equal(model.generate(labels, 1, cfg_scale=4.0, temperature=0)[:, 0], expected)
    # scale 0 is the unconditional model, scale 1 the conditional one

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(3)

    assert torch.equal(model.generate(labels, 8, cfg_scale=0.0, generator=g()), model.generate(null, 8, generator=g()))
    assert not torch.equal(model.generate(labels, 8, generator=g()), model.generate(null, 8, generator=g()))


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=1, generator=g).tolist()) == {0}
    assert set(sample_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_k=3, generator=g).tolist()) == {0, 1, 2}
    share = (sample_logits(logits, generator=g) == 0).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.05)


def test_checkpoint_roundtrip(tmp_path):
    model = tiny_ar(seed=4)
    model.save_pretrained(tmp_path / "ar")
    loaded = ARModel.from_pretrained(tmp_path / "ar")
    assert loaded.cfg == model.cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["config"].update(evil="__import__('os')"), "unknown AR config key"),
        (lambda c: c["config"].update(depth="2"), "must be int"),
        (lambda c: c["config"].update(depth=3), "missing tensors"),
        (lambda c: c.update(format="something-else"), "not an AR checkpoint"),
    ],
)
def test_checkpoint_config_is_checked(tmp_path, edit, message):
    tiny_ar().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        ARModel.from_pretrained(tmp_path)


def test_config_from_dict_roundtrip():
    cfg = ar_preset("d12", num_classes=10)
    assert ARConfig.from_dict(cfg.to_dict()) == cfg


def test_tied_token_table_keeps_small_models_small():
    """vocab_dim > 0: one [V, vocab_dim] table serves input and output, so a 64000-code vocabulary costs
    V x vocab_dim weights instead of 2 x V x dim."""
    tied, untied = ARModel(ar_preset("small")), ARModel(ar_preset("small", vocab_dim=0))
    assert tied.num_params() == untied.num_params()  # same transformer
    vocab_weights = tied.num_params(embeddings=True) - tied.num_params()
    assert vocab_weights < 64000 * 16 + 1001 * 128 + 2 * 16 * 128 + 1  # table, classes, two projections
    assert untied.num_params(embeddings=True) - untied.num_params() > 2 * 64000 * 128
    labels = torch.tensor([3, 7])
    assert tied.eval()(labels, torch.randint(0, 64000, (2, 5))).shape == (2, 6, 64000)


def test_tied_table_kv_cache_equals_no_cache_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    model = ARModel(ar_preset("small")).eval()
    labels = torch.tensor([0, 5])

    def run(use_cache: bool) -> torch.Tensor:
        return model.generate(labels, 12, 2.0, 1.0, None, None, torch.Generator().manual_seed(1), use_cache=use_cache)

    assert torch.equal(run(True), run(False))
    model.save_pretrained(tmp_path / "ar")
    loaded = ARModel.from_pretrained(tmp_path / "ar")
    assert loaded.cfg.vocab_dim == 16
    torch.testing.assert_close(loaded(labels, run(True)[:, :-1]), model(labels, run(True)[:, :-1]))


# ---------------------------------------------------------------------------------------------------
# End of sequence (adaptive corpora)
# ---------------------------------------------------------------------------------------------------
def scripted_eos(model: ARModel, stops: list[int]) -> ARModel:
    """Make sample b draw EOS at step stops[b] and never elsewhere (rows beyond len(stops): CFG's copies)."""
    transformer = model.transformer

    def patched(x, start=0, caches=None):
        logits = transformer(x, start, caches)  # [B(x2), L, V + 1]
        step = start + x.shape[1] - 1  # the position the last logits predict
        hit = torch.tensor([stops[b % len(stops)] == step for b in range(x.shape[0])])
        logits[:, -1, model.eos_id] = torch.where(hit, 1e4, -1e4)  # finite: CFG mixes them
        return logits

    model.transformer = patched
    return model


@pytest.mark.parametrize(("use_cache", "cfg_scale"), [(True, 1.0), (False, 1.0), (True, 3.0)])
def test_generate_stops_each_sample_at_its_eos(use_cache, cfg_scale):
    labels = torch.tensor([1, 2, 3, 4])
    stops = [3, 1, 7, 99]  # the last sample never draws EOS: it runs to num_tokens

    def run(stops: list[int]):
        model = scripted_eos(tiny_ar(eos=True), stops)
        g = torch.Generator().manual_seed(0)
        return model.generate(labels, 12, cfg_scale, 1.0, None, None, g, use_cache, return_lengths=True)

    tokens, lengths = run(stops)
    free, _ = run([99] * 4)  # nobody stops: what each sample draws before its end
    assert lengths.tolist() == [3, 1, 7, 12] and tokens.shape == (4, 12)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(tokens[b, :n], free[b, :n])  # an ended sample does not change the others' draws
        assert (tokens[b, n:] == tiny_ar(eos=True).eos_id).all()
        assert int(tokens[b, :n].max()) < 64000


def test_generate_ends_when_every_sample_has_and_never_before_the_first_token():
    model = scripted_eos(tiny_ar(eos=True), [0, 2, 5])  # EOS at step 0 is not allowed: that sample goes on
    tokens, lengths = model.generate(torch.tensor([0, 1, 2]), 32, return_lengths=True)
    assert lengths.tolist() == [32, 2, 5] and tokens.shape == (3, 32)
    tokens, lengths = scripted_eos(tiny_ar(eos=True), [4, 2]).generate(torch.tensor([0, 1]), 32, return_lengths=True)
    assert tokens.shape == (2, 4) and lengths.tolist() == [4, 2]  # the loop stopped with the longest sample


def test_a_model_without_eos_has_fixed_lengths_and_no_extra_id():
    model = tiny_ar()
    assert model.eos_id is None and model.tok_embed.num_embeddings == 64000
    g = torch.Generator().manual_seed(0)
    tokens, lengths = model.generate(torch.tensor([1, 2]), 9, return_lengths=True, generator=g)
    assert torch.equal(tokens, model.generate(torch.tensor([1, 2]), 9, generator=torch.Generator().manual_seed(0)))
    assert lengths.tolist() == [9, 9]
    assert tiny_ar(eos=True).tok_embed.num_embeddings == 64001


def test_eos_loss_targets_eos_after_each_row_and_masks_padding():
    model = tiny_ar(eos=True)
    labels = torch.tensor([3, 5, 7])
    tokens = torch.randint(0, 64000, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    # by hand: row b predicts its tokens, then EOS (every row has room: max_tokens is 32)
    logits = model(labels, tokens)  # [3, 7, V + 1]
    terms = []
    for b, n in enumerate(lengths.tolist()):
        targets = torch.cat([tokens[b, :n], torch.tensor([model.eos_id])])
        terms.append(F.cross_entropy(logits[b, : n + 1], targets, reduction="none"))
    expected = torch.cat(terms).mean()
    torch.testing.assert_close(model.loss(labels, tokens, lengths), expected)
    garbage = tokens.clone()
    garbage[1, 2:], garbage[2, 4:] = 11, 12
    torch.testing.assert_close(model.loss(labels, garbage, lengths), expected)


def test_eos_loss_has_no_eos_target_after_a_full_length_row():
    model = tiny_ar(eos=True, max_tokens=8)
    labels, tokens = torch.tensor([1]), torch.randint(0, 64000, (1, 8))
    expected = F.cross_entropy(model(labels, tokens[:, :-1])[0], tokens[0])  # the 8 tokens, nothing after
    torch.testing.assert_close(model.loss(labels, tokens), expected)


def test_checkpoints_without_the_eos_key_load_as_before(tmp_path):
    """Checkpoints written before EOS existed (the shipped models/flextok-small-ar) have no `eos` key."""
    model = tiny_ar(seed=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["config"]["eos"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ARModel.from_pretrained(tmp_path)
    assert loaded.cfg.eos is False and loaded.cfg == model.cfg
    g = torch.Generator
    assert torch.equal(
        loaded.generate(torch.tensor([4]), 8, generator=g().manual_seed(1)),
        model.generate(torch.tensor([4]), 8, generator=g().manual_seed(1)),
    )
    shipped = ARModel.read_config("models/flextok-small-ar")
    assert shipped.eos is False


def test_eos_roundtrips_and_is_type_checked(tmp_path):
    tiny_ar(eos=True).save_pretrained(tmp_path)
    assert ARModel.from_pretrained(tmp_path).eos_id == 64000
    config = json.loads((tmp_path / "config.json").read_text())
    config["config"]["eos"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'eos' must be bool"):
        ARModel.from_pretrained(tmp_path)
