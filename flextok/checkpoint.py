"""Checkpoints: our own format, strict loading, the weights digest; the official format through flextok.official.

Our format, a folder:
    config.json         {"format": "flextok-pipeline", "version": 1, "config": FlexTokConfig.to_dict()}
    model.safetensors   our parameter names, VAE included (vae.autoencoder.*)

`read_checkpoint` also reads the official hub format (flextok/official.py) and returns our config and tensor
names either way; `FlexTok.from_pretrained` builds the model from them. Tensors load with safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import FlexTokConfig
from .errors import CheckpointError
from .official import config_from_safetensors_header, is_hub_id, official_state_dict_to_ours, read_official_config

__all__ = [
    "CheckpointError",
    "load_state_dict_strict",
    "read_checkpoint",
    "read_config",
    "save_pretrained",
    "weights_digest",
]

FORMAT = "flextok-pipeline"
FORMAT_VERSION = 1


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: the model's identity."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict_strict(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy tensors into the model; any missing, extra, or wrongly shaped tensor is an error listing them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True, assign=False)


def checkpoint_folder(path_or_hub_id: str | Path) -> Path:
    """A local folder, or a hub id (`owner/name`) fetched into huggingface_hub's cache.

    A path whose parent folder exists is a local path even when it looks like `owner/name`, so a mistyped
    local path is reported as missing instead of being looked up on the hub."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and model.safetensors")
    text = str(path_or_hub_id)
    if not is_hub_id(text) or Path(text).parent.is_dir():
        raise CheckpointError(f"no such checkpoint folder: {text}" + ("" if is_hub_id(text) else " (not a hub id)"))
    from huggingface_hub import snapshot_download  # hub ids only; tests replace it

    try:
        return Path(snapshot_download(text, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # network, missing repo, auth: one message naming both attempts
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"no such checkpoint folder: {text}; as a hub id it could not be fetched ({type(e).__name__}: {detail})"
        ) from e


def is_url(path: str | Path) -> bool:
    """An fsspec URL (s3://, gs://, file://, ...), as opposed to a local path or a hub id."""
    return "://" in str(path)


@contextmanager
def local_copy(url: str, tensors: bool = True) -> Iterator[Path]:
    """A checkpoint folder at an fsspec URL, downloaded into a temporary folder for the duration of the block
    (config.json, model.safetensors unless `tensors` is False, and the official vae/config.json, those of them
    that exist)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="flextok-checkpoint-") as tmp:
        found = 0
        for name in ("config.json", "model.safetensors", "vae/config.json"):
            if name == "model.safetensors" and not tensors:
                continue
            if fs.isfile(f"{root}/{name}"):
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get(f"{root}/{name}", str(Path(tmp) / name))
                found += 1
        if not found:
            raise CheckpointError(f"no checkpoint at {url} (expected config.json and model.safetensors there)")
        yield Path(tmp)


def read_config(path_or_hub_id: str | Path) -> tuple[FlexTokConfig, bool]:
    """(our config, whether the checkpoint is in the official format), without reading any tensor."""
    if is_url(path_or_hub_id):
        with local_copy(str(path_or_hub_id), tensors=False) as folder:
            return read_config(folder)
    folder = checkpoint_folder(path_or_hub_id)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    config_path = folder / "config.json"
    try:
        raw = json.loads(config_path.read_text()) if config_path.is_file() else config_from_safetensors_header(weights)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} is neither our format nor the official hydra format")
    if raw.get("format") == FORMAT:
        if raw.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format version {raw.get('version')} is not supported (expected {FORMAT_VERSION})"
            )
        try:
            return FlexTokConfig.from_dict(raw["config"]), False
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: {e}") from e
    if "_target_" in raw:
        return read_official_config(folder, raw), True
    raise CheckpointError(f"{config_path} is neither our format nor the official hydra format")


def read_checkpoint(
    path_or_hub_id: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[FlexTokConfig, dict[str, Tensor]]:
    """Our format or the official one -> (our config, tensors under our names); a folder, an fsspec URL of one
    (s3://...) or a hub id."""
    if is_url(path_or_hub_id):
        with local_copy(str(path_or_hub_id)) as folder:
            return read_checkpoint(folder, map_location)
    folder = checkpoint_folder(path_or_hub_id)
    cfg, official = read_config(folder)
    tensors = load_file(str(folder / "model.safetensors"), device=str(map_location))
    return cfg, official_state_dict_to_ours(tensors) if official else tensors


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Write our format: config.json (`model.cfg`) + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": FORMAT})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
