"""What the tokenizer and the AR training loops share: schedule, EMA, parallel wrapping, randomness,
checkpoints (our `save_pretrained` format + optimizer state) and metrics logs.

Pure helpers; the loop itself (`pipeline.train.loop`) runs inside Ray Train workers.

A checkpoint is a folder:
    model/              the trained weights, `save_pretrained` format (FlexTok.from_pretrained / ARModel...)
    ema/                the EMA weights, same format (what to evaluate and ship)
    extra.safetensors   trained modules that are not part of the model (the REPA projector), may be absent
    train_state.pt      step, data position, optimizer state; tensors and plain values only
                        (read back with torch.load(weights_only=True))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class LoopConfig:
    """How to train, shared by both jobs. `batch_size` is the global batch of one optimizer step."""

    steps: int = 1000  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 64  # global: all workers x grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.05  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8  # tiny models: gradients behind zero-initialised layers start far below 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 10
    stop_after: int | None = None  # leave after this step (checkpointed); a rerun continues the run
    seed: int = 0
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where CUDA is present
    shuffle_buffer: int = 1000  # rows in each worker's local shuffle buffer; 0 = data order
    tensorboard_dir: str | None = None  # default: <run folder>/tensorboard (local copy synced if remote)

    def check(self, world_size: int) -> None:
        """Raise ValueError naming the option when the numbers do not fit together."""
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch-size and grad-accum must be >= 1")
        if self.batch_size % (world_size * self.grad_accum):
            raise ValueError(
                f"batch-size {self.batch_size} must be a multiple of num-workers x grad-accum "
                f"= {world_size} x {self.grad_accum}"
            )
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint-every and log-every must be >= 1")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError("stop-after must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema-decay must lie in [0, 1), got {self.ema_decay}")

    def micro_batch(self, world_size: int) -> int:
        return self.batch_size // (world_size * self.grad_accum)


# ---------------------------------------------------------------------------------------------------
# Schedule, randomness, precision
# ---------------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: LoopConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant
    decay from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, progress)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The random stream of one micro-batch: a function of (seed, step, rank, micro) only, so a resumed
    run draws exactly what an uninterrupted one would."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto|bf16); nothing on CPU."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------------
# Optimizer and EMA
# ---------------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on parameters with >= 2 dims (matrices, embeddings), none on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)


class EMA:
    """Exponential moving average of the trainable parameters under `prefix` (by name).

    Shadows have the parameters' own layout (sharded under FSDP); `swapped(model)` exchanges them with
    the live weights for saving or evaluation."""

    def __init__(self, model: nn.Module, decay: float, prefix: str = ""):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].copy_(p.detach())

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the model holds the EMA weights (and the shadows the live ones)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for n, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(live)


# ---------------------------------------------------------------------------------------------------
# Parallel wrapping and full state dicts (same calls for DDP, FSDP and a single process)
# ---------------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP (default) or FSDP2 (every element of every ModuleList sharded, then the root). Single process:
    the model itself."""
    model = model.to(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _options(full: bool = True, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, **kw)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Unsharded, unwrapped CPU state dict (collective under FSDP: call on every rank; rank 0 gets it all)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def split_state(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(entries under `prefix` with it removed, the rest)."""
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return inner, {k: v for k, v in state.items() if not k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------------
MODEL_DIR, EMA_DIR, EXTRA_FILE, STATE_FILE = "model", "ema", "extra.safetensors", "train_state.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data epoch in progress
    batches_in_epoch: int = 0  # optimizer steps already taken from this epoch's data


def save_extra(directory: Path, extra_sd: dict[str, Tensor]) -> None:
    if extra_sd:
        save_file({k: v.contiguous() for k, v in extra_sd.items()}, str(directory / EXTRA_FILE))


def save_train_state(directory: Path, optimizer_sd: dict, state: TrainState) -> None:
    torch.save({"train_state": asdict(state), "optimizer": optimizer_sd}, directory / STATE_FILE)


def read_checkpoint(directory: Path) -> tuple[dict, dict, dict, dict, TrainState]:
    """-> (model, ema, extra state dicts, optimizer state, TrainState); safetensors and weights_only only."""
    model_sd = load_file(str(directory / MODEL_DIR / "model.safetensors"))
    ema_sd = load_file(str(directory / EMA_DIR / "model.safetensors"))
    extra = directory / EXTRA_FILE
    extra_sd = load_file(str(extra)) if extra.is_file() else {}
    blob = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    return model_sd, ema_sd, extra_sd, blob["optimizer"], TrainState(**blob["train_state"])


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


# ---------------------------------------------------------------------------------------------------
# Metrics: TensorBoard events + a JSON-lines copy, written locally and mirrored to any fsspec URL
# ---------------------------------------------------------------------------------------------------
METRICS_FILE, EVENTS_FILE = "metrics.jsonl", "events.jsonl"


class MetricsLog:
    """Rank 0's per-step metrics. `url` may be remote: files are written to a local folder and copied
    there by `sync()` (called at every checkpoint and at the end). On resume, events after `start_step`
    are purged from the TensorBoard view."""

    def __init__(self, url: str, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.remote = not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.local = Path(tempfile.mkdtemp(prefix="tb-")) if self.remote else Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote:  # a resumed run appends to the logs already in the bucket (sync overwrites them)
            for name in (METRICS_FILE, EVENTS_FILE):
                if self.fs.exists(f"{self.root}/{name}"):
                    self.fs.get(f"{self.root}/{name}", str(self.local / name))
        self.writer = SummaryWriter(str(self.local), purge_step=start_step or None)
        self.jsonl = open(self.local / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()

    def event(self, step: int, name: str, **info: Any) -> None:
        """A run event (started, resumed) in events.jsonl: when restarts happened, and from which step."""
        with open(self.local / EVENTS_FILE, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "event": name, **info}) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            self.fs.put(str(self.local) + "/", self.root, recursive=True)

    def close(self) -> None:
        self.sync()
        self.writer.close()
        self.jsonl.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def read_events(url: str) -> list[dict]:
    """The run events of a metrics folder (see MetricsLog.event), in order."""
    fs, root = fsspec.core.url_to_fs(url)
    with fs.open(os.path.join(root, EVENTS_FILE), "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(url: str) -> list[dict]:
    """The JSON-lines metrics of a run folder, one record per step (a step logged twice, as after a crash
    and resume, keeps its last record), in step order."""
    fs, root = fsspec.core.url_to_fs(url)
    by_step: dict[int, dict] = {}
    with fs.open(os.path.join(root, METRICS_FILE), "r") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def default_tensorboard_dir(output: str) -> str:
    return output.rstrip("/") + "/tensorboard"


def to_scalar(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, Tensor) else float(x)
