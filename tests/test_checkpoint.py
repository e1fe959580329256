"""Checkpoints: our format round-trips; the official hub format loads for any size, through an
allowlist that rejects unknown targets and settings; tensors must match exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from official_export import config_to_official, save_official
from safetensors.torch import load_file, save_file

from flextok import FlexTok, FlexTokConfig, preset
from flextok.checkpoint import CheckpointError, weights_digest
from flextok.config import DecoderConfig, EncoderConfig, VAEConfig


def copy_fixture(official_tiny: Path, dest: Path) -> Path:
    shutil.copytree(official_tiny, dest)
    for f in dest.rglob("*"):
        f.chmod(0o644 if f.is_file() else 0o755)
    dest.chmod(0o755)
    return dest


def perturbed(model: FlexTok, seed: int = 0) -> FlexTok:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.encoder.to_latents.weight.mul_(10.0)
    return model.eval()


def other_sized_kl_config() -> FlexTokConfig:
    """Sizes unlike the fixture: 4 latent channels, downsample 4, 4 FSQ dims, 8 registers, 3 decoder blocks."""
    arch = {
        "block_out_channels": [8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": 0.5,
    }
    return FlexTokConfig(
        image_size=32,
        vae=VAEConfig(kind="kl", latent_channels=4, downsample=4, arch=arch),
        encoder=EncoderConfig(dim=32, depth=1, head_dim=16, num_registers=8, mlp_ratio=3.0),
        decoder=DecoderConfig(dim=48, depth=3, head_dim=16, repa_layer=2),
        fsq_levels=(8, 5, 5, 5),
    )


def test_official_fixture_config_is_reproduced_by_our_exporter(official_tiny):
    model = FlexTok.from_pretrained(official_tiny)
    assert config_to_official(model.cfg) == json.loads((official_tiny / "config.json").read_text())


def test_our_format_round_trips_bit_exactly(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    loaded = FlexTok.from_pretrained(tmp_path / "ckpt")
    assert loaded.cfg == tiny_model.cfg
    assert weights_digest(loaded.state_dict()) == weights_digest(tiny_model.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.tokenize(x), tiny_model.tokenize(x))


def test_official_model_saved_in_our_format_reloads(official_tiny, tmp_path):
    model = FlexTok.from_pretrained(official_tiny)
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "flextok-pipeline"
    again = FlexTok.from_pretrained(tmp_path / "ours")
    assert weights_digest(again.state_dict()) == weights_digest(model.state_dict())


def test_another_official_format_model_of_different_sizes_loads(tmp_path):
    torch.manual_seed(0)
    model = perturbed(FlexTok(other_sized_kl_config()))
    save_official(model, tmp_path / "official")
    names = load_file(str(tmp_path / "official" / "model.safetensors"))
    assert "decoder.module_dict.dec_transformer.blocks.2.adaLN_modulation.1.weight" in names
    assert names["encoder.module_dict.enc_posemb_module.posembs"].shape == (1, 32, 4, 4)
    loaded = FlexTok.from_pretrained(tmp_path / "official")
    assert loaded.cfg.encoder == model.cfg.encoder and loaded.cfg.decoder == model.cfg.decoder
    assert loaded.cfg.fsq_levels == (8, 5, 5, 5) and loaded.codebook_size == 1000
    assert weights_digest(loaded.state_dict()) == weights_digest(model.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.tokenize(x)
    assert torch.equal(loaded.tokenize(x), tokens)
    noise = model.draw_noise(2, torch.Generator().manual_seed(0))
    a = model.detokenize(tokens[:, :3], timesteps=2, guidance_scale=3.0, apg=True, noise=noise)
    b = loaded.detokenize(tokens[:, :3], timesteps=2, guidance_scale=3.0, apg=True, noise=noise)
    assert torch.equal(a, b)


def test_config_is_read_from_the_safetensors_header_when_config_json_is_absent(official_tiny, tmp_path):
    folder = copy_fixture(official_tiny, tmp_path / "m")
    (folder / "config.json").unlink()
    model = FlexTok.from_pretrained(folder)
    assert model.cfg == FlexTok.from_pretrained(official_tiny).cfg


def _edit_config(official_tiny: Path, tmp_path: Path, edit) -> Path:
    folder = copy_fixture(official_tiny, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unknown_target_is_rejected_naming_the_key(official_tiny, tmp_path):
    def edit(cfg):
        cfg["encoder"]["module_dict"]["enc_transformer"]["_target_"] = "os.system"

    with pytest.raises(CheckpointError, match=r"encoder\.module_dict\.enc_transformer\._target_"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_unknown_nested_target_is_rejected_naming_the_key(official_tiny, tmp_path):
    def edit(cfg):
        cfg["decoder"]["module_dict"]["dec_channels_to_first"]["per_sample_op"]["_target_"] = "builtins.eval"

    with pytest.raises(CheckpointError, match=r"dec_channels_to_first\.per_sample_op\._target_.*builtins\.eval"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_unknown_setting_is_rejected_naming_the_key(official_tiny, tmp_path):
    def edit(cfg):
        cfg["decoder"]["module_dict"]["dec_transformer"]["use_rope"] = True

    with pytest.raises(CheckpointError, match=r"decoder\.module_dict\.dec_transformer\.use_rope"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_unknown_top_level_key_is_rejected(official_tiny, tmp_path):
    def edit(cfg):
        cfg["extra_module"] = {"_target_": "flextok.vae_wrapper.StableDiffusionVAE"}

    with pytest.raises(CheckpointError, match="extra_module"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_unsupported_value_is_rejected_naming_the_key(official_tiny, tmp_path):
    def edit(cfg):
        cfg["encoder"]["module_dict"]["enc_seq_packer"]["mask_mode"] = "full"

    with pytest.raises(CheckpointError, match=r"enc_seq_packer\.mask_mode"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_unknown_vae_config_key_is_rejected(official_tiny, tmp_path):
    folder = copy_fixture(official_tiny, tmp_path / "m")
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    vae_cfg["custom_code"] = "x"
    (folder / "vae" / "config.json").write_text(json.dumps(vae_cfg))
    with pytest.raises(CheckpointError, match=r"vae\.custom_code"):
        FlexTok.from_pretrained(folder)


def _edit_tensors(official_tiny: Path, tmp_path: Path, edit) -> Path:
    folder = copy_fixture(official_tiny, tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_missing_tensors_are_listed(official_tiny, tmp_path):
    def edit(t):
        del t["decoder.module_dict.dec_latent_dropout.nullcond"]
        del t["encoder.module_dict.enc_transformer.blocks.1.mlp.fc3.weight"]

    with pytest.raises(CheckpointError, match=r"missing tensors \['decoder\.null_cond', 'encoder\.blocks\.1\.mlp\.fc3"):
        FlexTok.from_pretrained(_edit_tensors(official_tiny, tmp_path, edit))


def test_extra_tensors_are_listed(official_tiny, tmp_path):
    def edit(t):
        t["decoder.module_dict.dec_transformer.blocks.7.attn.wq.weight"] = torch.zeros(96, 96)

    with pytest.raises(CheckpointError, match=r"unexpected tensors \['decoder\.blocks\.7\.attn\.wq\.weight'\]"):
        FlexTok.from_pretrained(_edit_tensors(official_tiny, tmp_path, edit))


def test_tensors_with_no_counterpart_are_listed(official_tiny, tmp_path):
    def edit(t):
        t["decoder.module_dict.dec_lora.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError, match=r"dec_lora\.weight"):
        FlexTok.from_pretrained(_edit_tensors(official_tiny, tmp_path, edit))


def test_wrongly_shaped_tensors_are_listed(official_tiny, tmp_path):
    def edit(t):
        t["decoder.module_dict.dec_latent_dropout.nullcond"] = torch.zeros(95)

    with pytest.raises(CheckpointError, match=r"decoder\.null_cond: checkpoint \[95\] vs model \[96\]"):
        FlexTok.from_pretrained(_edit_tensors(official_tiny, tmp_path, edit))


def test_unknown_key_in_our_format_is_rejected(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["config"]["encoder"]["rope"] = True
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder\.rope"):
        FlexTok.from_pretrained(tmp_path / "c")


def test_missing_folder_and_file_paths_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        FlexTok.from_pretrained(tmp_path / "nope")
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        FlexTok.from_pretrained(tmp_path / "f.safetensors")


def test_weights_digest_changes_with_any_weight(tiny_model):
    before = weights_digest(tiny_model.state_dict())
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["decoder.null_cond"][0] += 1e-3
    assert weights_digest(state) != before
    assert weights_digest(tiny_model.state_dict()) == before


def test_pixel_models_cannot_be_exported_to_the_official_format(tmp_path):
    with pytest.raises(CheckpointError, match="pixel"):
        save_official(FlexTok(preset("tiny")), tmp_path)


def test_hub_ids_resolve_through_the_huggingface_cache(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub (here served from local files: no network in tests),
    and so does the VAE config that the official config names by hub id."""
    import huggingface_hub

    torch.manual_seed(0)
    model = perturbed(FlexTok(other_sized_kl_config()))
    save_official(model, tmp_path / "snapshot", vae_hub_path="EPFL-VILAB/flextok_vae_c4")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **_):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")

    def hf_hub_download(repo_id, filename, **_):
        calls.append(("file", repo_id, filename))
        return str(tmp_path / "snapshot" / "vae" / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    loaded = FlexTok.from_pretrained("EPFL-VILAB/flextok_d12_d12_in1k")
    assert calls == [
        ("snapshot", "EPFL-VILAB/flextok_d12_d12_in1k", ("config.json", "model.safetensors")),
        ("file", "EPFL-VILAB/flextok_vae_c4", "config.json"),
    ]
    assert weights_digest(loaded.state_dict()) == weights_digest(model.state_dict())


@pytest.mark.parametrize("vae_path", ["../vae", "/etc", "vae/../../elsewhere"])
def test_vae_path_outside_the_checkpoint_folder_is_refused(official_tiny, tmp_path, vae_path):
    def edit(cfg):
        cfg["vae"]["hf_hub_path"] = vae_path

    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_vae_path_inside_the_folder_may_be_absolute(official_tiny, tmp_path):
    folder = copy_fixture(official_tiny, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vae"]["hf_hub_path"] = str((folder / "vae").resolve())
    (folder / "config.json").write_text(json.dumps(cfg))
    assert FlexTok.from_pretrained(folder).cfg == FlexTok.from_pretrained(official_tiny).cfg


def test_missing_vae_folder_that_is_no_hub_id_says_what_was_tried(official_tiny, tmp_path):
    def edit(cfg):
        cfg["vae"]["hf_hub_path"] = "vea"

    with pytest.raises(CheckpointError, match=r"no folder .*vea with a config\.json \(and it is not a hub id\)"):
        FlexTok.from_pretrained(_edit_config(official_tiny, tmp_path, edit))


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(CheckpointError, match=r"no such checkpoint folder: ckpts/modle$"):
        FlexTok.from_pretrained("ckpts/modle")


def test_a_failed_hub_fetch_names_both_attempts(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **_):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such checkpoint folder: owner/model; as a hub id .*unreachable"):
        FlexTok.from_pretrained("owner/model")


def test_exported_official_folder_holds_the_vae_in_the_diffusers_layout(tmp_path):
    """What the release's loader needs besides config.json: vae/ with diffusers weights, named absolutely."""
    torch.manual_seed(0)
    model = perturbed(FlexTok(other_sized_kl_config()))
    save_official(model, tmp_path / "official")
    cfg = json.loads((tmp_path / "official" / "config.json").read_text())
    assert cfg["vae"]["hf_hub_path"] == str((tmp_path / "official" / "vae").resolve())
    vae = load_file(str(tmp_path / "official" / "vae" / "diffusion_pytorch_model.safetensors"))
    state = model.vae.autoencoder.state_dict()
    assert vae.keys() == state.keys() and all(torch.equal(vae[k], state[k]) for k in state)
