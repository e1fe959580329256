"""A checkpoint's identity from its files (config and a streamed hash, no model built) equals the loaded model's
`weights_digest`, for our format, the release's format, other stored dtypes, and AR checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flextok import FlexTok
from flextok.ar import ARModel, ar_preset
from flextok.checkpoint import CheckpointError, read_checkpoint_info, weights_digest


def model_digest(path) -> str:
    return weights_digest(FlexTok.from_pretrained(path).state_dict())


def test_our_format_digest_from_files_equals_the_loaded_models(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    info = read_checkpoint_info(tmp_path / "m")
    assert not info.official and info.cfg == tiny_model.cfg and info.codebook_size == tiny_model.codebook_size
    assert info.digest() == model_digest(tmp_path / "m") == weights_digest(tiny_model.state_dict())


def test_official_format_digest_from_files_equals_the_loaded_models(official_tiny):
    """Renamed tensors, and position tables whose layout changes on load, hash as the loaded model has them."""
    info = read_checkpoint_info(official_tiny)
    assert info.official
    assert info.digest() == model_digest(official_tiny)


def test_weights_stored_in_another_dtype_hash_as_loaded(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "m" / "model.safetensors"))
    loaded = model_digest(tmp_path / "m")  # loading casts to the model's float32
    assert read_checkpoint_info(tmp_path / "m").digest() == loaded != weights_digest(tiny_model.state_dict())


def test_changed_weights_change_the_digest(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    before = read_checkpoint_info(tmp_path / "m").digest()
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    changed = tensors["decoder.final_proj.weight"].clone()
    changed.view(-1)[0] += 1e-3
    save_file({**tensors, "decoder.final_proj.weight": changed}, str(tmp_path / "m" / "model.safetensors"))
    assert read_checkpoint_info(tmp_path / "m").digest() != before


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_ar_file_that_does_not_match_its_config_is_refused_like_loading(tmp_path, change):
    """With a model to compare (the AR model's meta build is cheap) the streamed digest checks as loading does.
    (FlexTok's driver-side digest does not build the model; its actors' strict load checks the tensors.)"""
    ARModel(ar_preset("tiny", num_classes=10, max_tokens=8, vocab_size=64)).save_pretrained(tmp_path / "ar")
    tensors = load_file(str(tmp_path / "ar" / "model.safetensors"))
    name = sorted(tensors)[0]
    if change == "extra":
        tensors["surprise"] = torch.zeros(3)
    elif change == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(7)
    save_file(tensors, str(tmp_path / "ar" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the model"):
        ARModel.from_pretrained(tmp_path / "ar")
    with pytest.raises(CheckpointError, match="does not match the model"):
        ARModel.file_digest(tmp_path / "ar")


def test_truncated_file_is_an_error(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint_info(tmp_path / "m").digest()


def test_folder_that_is_not_a_checkpoint_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="neither our format nor the official"):
        read_checkpoint_info(tmp_path)


def test_ar_digest_from_files_equals_the_loaded_models(tmp_path):
    torch.manual_seed(0)
    ar = ARModel(ar_preset("tiny", num_classes=10, max_tokens=8, vocab_size=64))
    ar.save_pretrained(tmp_path / "ar")
    assert ARModel.read_config(tmp_path / "ar") == ar.cfg
    assert ARModel.file_digest(tmp_path / "ar") == weights_digest(ARModel.from_pretrained(tmp_path / "ar").state_dict())
