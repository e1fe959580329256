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
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import FlexTokConfig
from .errors import CheckpointError
from .official import (
    _rename,
    _to_ours,
    config_from_safetensors_header,
    is_hub_id,
    official_state_dict_to_ours,
    read_official_config,
)

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "load_state_dict_strict",
    "read_checkpoint",
    "read_checkpoint_info",
    "read_config",
    "save_pretrained",
    "streamed_weights_digest",
    "weights_digest",
]

FORMAT = "flextok-pipeline"
FORMAT_VERSION = 1


def weights_digest(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: the model's identity."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        _hash_tensor(h, name, state_dict[name])
    return h.hexdigest()


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without another copy


# safetensors dtype names -> torch (https://github.com/huggingface/safetensors, format header)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, offset of the data) from a .safetensors file's header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header")
    header.pop("__metadata__", None)
    return header, 8 + size


def streamed_weights_digest(weights: Path, model: Any | None = None, official: bool = False) -> str:
    """`weights_digest(model.state_dict())` of the model loaded from `weights`, read one tensor at a time.
    `model` (on the meta device: no memory for weights) gives the names, dtypes and shapes loading checks and
    casts to; without it the file's names are taken as they are and floating tensors are cast to torch's
    default dtype, as loading into a freshly built FlexTok does (its builder never needs diffusers then).
    `official`: the file has the release's tensor names and layouts."""
    header, data_start = read_safetensors_header(weights)
    file_name = {(_rename(k, to_ours=True) if official else k): k for k in header}
    if None in file_name:
        unknown = sorted(k for k in header if _rename(k, to_ours=True) is None)
        raise CheckpointError(f"checkpoint has {len(unknown)} tensor(s) with no counterpart in this model: {unknown}")
    expected = model.state_dict() if model is not None else None
    if expected is not None:
        missing, extra = sorted(set(expected) - set(file_name)), sorted(set(file_name) - set(expected))
        if missing or extra:
            raise CheckpointError(f"checkpoint does not match the model: missing tensors {missing}, unexpected {extra}")
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for name in sorted(file_name):
            entry = header[file_name[name]]
            if entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{weights}: tensor {file_name[name]} has unsupported dtype {entry.get('dtype')}")
            begin, end = entry["data_offsets"]
            raw = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(raw) != len(raw):
                raise CheckpointError(f"{weights} is truncated (tensor {file_name[name]})")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            t = t.reshape(entry["shape"])
            t = _to_ours(name, t) if official else t
            if expected is None:
                _hash_tensor(h, name, t.to(torch.get_default_dtype()) if t.is_floating_point() else t)
                continue
            if t.shape != expected[name].shape:
                raise CheckpointError(
                    f"checkpoint does not match the model: shape mismatches "
                    f"['{name}: checkpoint {list(t.shape)} vs model {list(expected[name].shape)}']"
                )
            _hash_tensor(h, name, t.to(expected[name].dtype))  # loading casts to the model's dtype
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
def local_copy(url: str) -> Iterator[Path]:
    """A checkpoint folder at an fsspec URL, downloaded into a temporary folder for the duration of the block
    (config.json, model.safetensors and the official vae/config.json, those of them that exist)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="flextok-checkpoint-") as tmp:
        found = 0
        for name in ("config.json", "model.safetensors", "vae/config.json"):
            if fs.isfile(f"{root}/{name}"):
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get(f"{root}/{name}", str(Path(tmp) / name))
                found += 1
        if not found:
            raise CheckpointError(f"no checkpoint at {url} (expected config.json and model.safetensors there)")
        yield Path(tmp)


def read_config(path_or_hub_id: str | Path) -> tuple[FlexTokConfig, bool]:
    """(our config, whether the checkpoint is in the official format), without reading any tensor."""
    if is_url(path_or_hub_id):  # the folder's files are fetched (an official config may live in the weights)
        with local_copy(str(path_or_hub_id)) as folder:
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


@dataclass(frozen=True)
class CheckpointInfo:
    """What a FlexTok checkpoint says without loading its weights."""

    path: str | Path  # as given: a folder, an fsspec URL or a hub id
    cfg: FlexTokConfig
    official: bool  # the release's format (tensor names and layouts translated on load)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.cfg.fsq_levels)

    def digest(self) -> str:
        """The loaded model's `weights_digest`, streamed from the file: a driver learns a checkpoint's identity
        without holding its weights or importing the VAE's library (diffusers, ~280 MB). Whether the tensors
        fit the config is checked where the model is built (the actors), not here."""
        if is_url(self.path):
            with local_copy(str(self.path)) as folder:
                return streamed_weights_digest(folder / "model.safetensors", official=self.official)
        return streamed_weights_digest(checkpoint_folder(self.path) / "model.safetensors", official=self.official)


def read_checkpoint_info(path_or_hub_id: str | Path) -> CheckpointInfo:
    """The configuration of a checkpoint (config.json, or the release's safetensors header), tensors unread."""
    cfg, official = read_config(path_or_hub_id)
    return CheckpointInfo(path_or_hub_id, cfg, official)
