"""The training loop both jobs run on Ray Train, and the driver call that starts it.

    result = run_training(task, LoopConfig(...), dataset, Scaling(workers=2), Run("s3://bucket/runs/tok1"))

A `TrainTask` says what is trained (the objective module, how batches come from the worker's Ray Data
shard, how the model is saved); the loop does the rest, the same way for every task:
  - DDP (or FSDP2) over the workers, bf16 autocast on CUDA, gradient accumulation, clipping, AdamW with
    warmup + cosine/linear decay, EMA;
  - every `checkpoint_every` steps a checkpoint (see pipeline.train.common) reported to Ray Train, which
    uploads into the run folder (`Run.output`); a worker lost mid-run restarts the group (up to
    `max_failures` times) and the loop resumes from the latest checkpoint, as does re-running the job with
    the same run folder;
  - randomness is a function of (seed, step, rank), and the data position is checkpointed (epoch, steps
    into it; each worker re-reads and skips that many batches), so a resumed run continues exactly where
    it stopped. Bitwise-equal to an uninterrupted run with one worker; with several, Ray Data assigns
    blocks to workers dynamically, so the global batches may be made of the same rows split otherwise;
  - metrics each `log_every` steps: reported to Ray Train, written to TensorBoard and metrics.jsonl.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flextok.checkpoint import load_state_dict_strict

from ..devices import stage_device
from .common import (
    EMA,
    EMA_DIR,
    MODEL_DIR,
    LoopConfig,
    MetricsLog,
    TrainState,
    autocast,
    checkpoint_name,
    default_tensorboard_dir,
    full_model_state,
    full_optimizer_state,
    grad_sync,
    load_full_model_state,
    load_full_optimizer_state,
    lr_at,
    make_optimizer,
    read_checkpoint,
    save_extra,
    save_train_state,
    split_state,
    step_generator,
    to_scalar,
    unwrap,
    wrap_model,
)

MODEL_PREFIX = "model."  # the objective module holds the exported model as `.model`


class TrainTask(ABC):
    """What a job plugs into the loop. Instances are pickled to the workers: keep them plain data and
    build heavy things (models, teachers) in the methods."""

    unit: str = "samples"  # what throughput counts

    @abstractmethod
    def build(self) -> nn.Module:
        """The objective: `.model` is what gets exported; forward(**inputs, generator) -> {"loss", ...}."""

    @abstractmethod
    def new_model(self) -> nn.Module:
        """A fresh instance of the exported model (FlexTok, ARModel): it has `save_pretrained`."""

    def save_model(self, state: dict[str, Tensor], directory: Path) -> None:
        """Write the `.model` state dict as a checkpoint folder in our `save_pretrained` format."""
        with torch.device("meta"):  # no memory for weights that are overwritten at once
            model = self.new_model()
        model = model.to_empty(device="cpu")
        load_state_dict_strict(model, state)
        model.save_pretrained(directory)

    @abstractmethod
    def batches(self, shard: Any, epoch: int, micro_batch: int, cfg: LoopConfig) -> Iterator[dict[str, Tensor]]:
        """Micro-batches of one epoch from this worker's Ray Data shard (same count on every worker)."""

    def setup(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Per-worker preparation (e.g. build a frozen teacher) before the first batch."""

    def inputs(self, batch: dict[str, Tensor], device: torch.device, generator: torch.Generator) -> dict[str, Any]:
        """Keyword arguments of the objective's forward for one micro-batch."""
        return {k: v.to(device) for k, v in batch.items()}

    @abstractmethod
    def units(self, batch: dict[str, Tensor]) -> int:
        """How many `unit`s (images, tokens) a micro-batch holds."""


# ---------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    task: TrainTask = config["task"]
    cfg: LoopConfig = config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 does not broadcast)
    model = wrap_model(task.build(), cfg.strategy, device)
    optimizer = make_optimizer(model, cfg)
    ema = EMA(unwrap(model), cfg.ema_decay, prefix=MODEL_PREFIX)
    state = restore(model, optimizer, ema)
    task.setup(device)
    stop_at = min(cfg.steps, cfg.stop_after or cfg.steps)
    if state.step >= stop_at:
        print(f"[rank {rank}] nothing to do: the run is at step {state.step} (stop at {stop_at})", flush=True)
        return

    log = None
    if rank == 0:
        tensorboard = cfg.tensorboard_dir or default_tensorboard_dir(config["output"])
        log = MetricsLog(tensorboard, start_step=state.step)
        log.event(state.step, "resumed" if state.step else "started", world_size=world, epoch=state.epoch)
        print(f"{'resumed from' if state.step else 'starting at'} step {state.step} on {world} worker(s)", flush=True)
    shard = ray.train.get_dataset_shard("train")
    micro = cfg.micro_batch(world)
    window = Window()
    while state.step < stop_at:
        groups = accumulation_groups(task.batches(shard, state.epoch, micro, cfg), cfg.grad_accum)
        taken = 0
        for group in groups:
            taken += 1
            if taken <= state.batches_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            out = train_step(model, optimizer, ema, task, group, state.step, rank, device, cfg)
            state.step += 1
            state.batches_in_epoch += 1
            window.add(out)
            last = state.step == stop_at
            if state.step % cfg.log_every == 0 or state.step % cfg.checkpoint_every == 0 or last:
                metrics = window.metrics(world, state.step, cfg)
                save = state.step % cfg.checkpoint_every == 0 or last
                report(model, optimizer, ema, task, state, metrics, log, save, rank)
            if last:
                break
        else:
            if taken == 0 or taken < state.batches_in_epoch:
                raise RuntimeError(
                    f"epoch {state.epoch} gave {taken} batches of {cfg.batch_size} rows: the dataset is smaller "
                    "than one global batch (or changed since the checkpoint)"
                )
            state.epoch += 1
            state.batches_in_epoch = 0
    if log is not None:
        log.close()


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> TrainState:
    """Load the latest reported checkpoint, if any (EMA weights first, through the model, then the live ones)."""
    import ray
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        model_sd, ema_sd, extra_sd, optimizer_sd, state = read_checkpoint(Path(folder))
    load_full_model_state(model, {**with_prefix(ema_sd), **extra_sd})
    ema.copy_from_model()
    load_full_model_state(model, {**with_prefix(model_sd), **extra_sd})
    load_full_optimizer_state(model, optimizer, optimizer_sd)
    return state


def with_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {MODEL_PREFIX + k: v for k, v in state.items()}


def accumulation_groups(batches: Iterator[dict], n: int) -> Iterator[list[dict]]:
    """Micro-batches in groups of n; an incomplete last group is dropped (all workers drop alike)."""
    batches = iter(batches)
    while len(group := list(islice(batches, n))) == n:
        yield group


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    task: TrainTask,
    group: list[dict[str, Tensor]],
    step: int,
    rank: int,
    device: torch.device,
    cfg: LoopConfig,
) -> dict[str, float]:
    """One optimizer step over `group` micro-batches -> this worker's metrics."""
    start = time.perf_counter()
    lr = lr_at(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    units = 0
    for i, batch in enumerate(group):
        generator = step_generator(cfg.seed, step, rank, i)
        inputs = task.inputs(batch, device, generator)
        with grad_sync(model, i == len(group) - 1), autocast(device, cfg.precision):
            out = model(**inputs, generator=generator)
        (out["loss"] / len(group)).backward()
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + to_scalar(value) / len(group)
        units += task.units(batch)
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        sums["grad_norm"] = to_scalar(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    ema.update()
    return {**sums, "lr": lr, "units": units, "seconds": time.perf_counter() - start}


class Window:
    """Metrics accumulated since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.since = time.perf_counter()

    def add(self, out: dict[str, float]) -> None:
        for key, value in out.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def metrics(self, world: int, step: int, cfg: LoopConfig) -> dict[str, float]:
        """Means over the window's steps and all workers (a collective); throughput over the window's
        wall time, the waiting for data included."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(values)  # sums over workers
        total = dict(zip(keys, values.tolist(), strict=True))
        elapsed = time.perf_counter() - self.since
        metrics = {k: v / (self.steps * world) for k, v in total.items() if k not in ("units", "seconds", "lr")}
        metrics["lr"] = self.sums["lr"] / self.steps
        metrics["units_per_s"] = total["units"] / elapsed
        metrics["steps_per_s"] = self.steps / elapsed
        metrics["compute_fraction"] = total["seconds"] / (elapsed * world)  # time in train_step, not data
        metrics["step"] = step
        self.reset()
        return metrics


def report(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA,
    task: TrainTask,
    state: TrainState,
    metrics: dict[str, float],
    log: MetricsLog | None,
    save: bool,
    rank: int,
) -> None:
    """Log (rank 0); when `save`, report a checkpoint to Ray Train on every rank (a barrier).

    Steps that only log do not call ray.train.report: its result queue holds one report, and the controller
    takes it every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reporting more often blocked every worker for the
    rest of those 2 s (measured: 1.5 s per report, the tiny tokenizer at 0.40 of the plain loop). Result.metrics
    holds only metrics reported with a checkpoint anyway; the metrics log (TensorBoard) gets every window."""
    import ray
    import ray.train

    metrics = {**metrics, "epoch": state.epoch}
    units = task.unit + "_per_s"
    metrics[units] = metrics.pop("units_per_s")
    if log is not None:
        log.log(state.step, {k: v for k, v in metrics.items() if k != "step"})
        print(
            f"step {state.step} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"{metrics[units]:.1f} {units.replace('_per_s', '/s')}",
            flush=True,
        )
    if not save:
        return
    folder = Path(tempfile.mkdtemp(prefix="ckpt-")) if rank == 0 else None
    try:
        # Collectives: every rank takes part. The state dicts may alias the live weights, so each is
        # written before the next swap changes them.
        model_sd, extra_sd = split_state(full_model_state(model), MODEL_PREFIX)
        if folder:
            task.save_model(model_sd, folder / MODEL_DIR)
            save_extra(folder, extra_sd)
        with ema.swapped():
            ema_sd, _ = split_state(full_model_state(model), MODEL_PREFIX)
            if folder:
                task.save_model(ema_sd, folder / EMA_DIR)
        optimizer_sd = full_optimizer_state(model, optimizer)
        if folder:
            save_train_state(folder, optimizer_sd, state)
            log.sync()
    except BaseException:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    # Ray uploads the folder to storage and then deletes it (local mode, num_workers=0, keeps it in place)
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_dir_name=checkpoint_name(state.step),
        delete_local_checkpoint_after_upload=True,
    )


# ---------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------
@dataclass
class Scaling:
    """Ray Train workers and what each gets (0 workers: Ray Train's local mode, in this process)."""

    workers: int = 1
    gpus_per_worker: float = 0.0  # > 0: the worker trains on CUDA (NoCudaError when it sees none)
    cpus_per_worker: float = 1.0


@dataclass
class Run:
    output: str  # the run folder: a local path or a URL pyarrow and fsspec both read (s3://, gs://, ...)
    max_failures: int = 3  # worker-group restarts (from the latest checkpoint) before the run fails
    keep_checkpoints: int | None = 3
    preserve_order: bool = False  # deterministic data order (needed for bitwise-reproducible resumes)


def cuda_checked_torch_config():
    """Ray Train's TorchConfig whose workers, when given GPUs, check that they see CUDA before NCCL is set up
    (which would fail with a long traceback that does not say which worker or what it saw)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class CudaCheckedBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            if worker_group.get_resources_per_worker().get("GPU", 0) > 0:
                worker_group.execute(stage_device, "a Ray Train worker", True)
            super().on_start(worker_group, backend_config)

    class CudaCheckedTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return CudaCheckedBackend

    return CudaCheckedTorchConfig()


def run_training(task: TrainTask, loop: LoopConfig, dataset: Any, scaling: Scaling, run: Run):
    """Start (or resume: same `run.output`) a TorchTrainer run; returns Ray Train's Result."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    loop.check(max(1, scaling.workers))
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = ingest.preserve_order or run.preserve_order
    storage, name = split_output(run.output)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "loop": loop, "output": f"{storage}/{name}"},
        torch_config=cuda_checked_torch_config(),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker={"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )
    return trainer.fit()


def split_output(output: str) -> tuple[str, str]:
    """A run folder -> Ray Train's (storage_path, name): its parent and its last part. Local paths are made
    absolute (the workers do not share the driver's working directory)."""
    url = output.rstrip("/")
    if "://" not in url:
        url = str(Path(url).resolve())
    parent, name = posixpath.split(url)
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError("give a folder for the run under the bucket or file system root, e.g. s3://bucket/runs/a")
    return parent, name
