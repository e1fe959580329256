"""Options and plumbing both training jobs share (jobs/train_tokenizer.py, jobs/train_ar.py)."""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from jobs.common import fail, worker_error_line
from jobs.resources import (
    Cluster,
    Plan,
    add_worker_args,
    check_args,
    cluster_now,
    init_ray,
    training_plan,
    warn_if_short,
)
from pipeline.train.common import LoopConfig

D = LoopConfig()
COPY_CHUNK = 16 * 2**20  # bytes per read when exporting weights (a d30 model is ~5 GB)


def add_training_args(p: argparse.ArgumentParser) -> None:
    """The run, scaling and loop options (defaults from pipeline.train.common.LoopConfig)."""
    run = p.add_argument_group("run (resume: run again with the same --output)")
    run.add_argument("--output", help="the run folder, a path or fsspec URL: checkpoints, metrics (required)")
    run.add_argument("--strategy", choices=["ddp", "fsdp"], default=D.strategy, help="data parallelism (ddp)")
    run.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=D.precision, help="auto: bf16 on CUDA")
    run.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before failing (3)")
    run.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept in storage (3)")
    run.add_argument("--preserve-order", action="store_true", help="deterministic data order (exact resumes)")
    run.add_argument("--tensorboard-dir", help="TensorBoard folder/URL (default: OUTPUT/tensorboard)")
    run.add_argument("--export", help="after training, copy the final EMA model to this folder/URL")

    loop = p.add_argument_group("optimization")
    loop.add_argument("--steps", type=int, default=D.steps, help=f"optimizer steps in the run ({D.steps})")
    loop.add_argument("--batch-size", type=int, default=D.batch_size, help=f"global batch per step ({D.batch_size})")
    loop.add_argument("--grad-accum", type=int, default=D.grad_accum, help="micro-batches per step per worker (1)")
    loop.add_argument("--lr", type=float, default=D.lr, help=f"peak learning rate ({D.lr})")
    loop.add_argument("--min-lr-ratio", type=float, default=D.min_lr_ratio, help="final lr / peak lr")
    loop.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=D.schedule, help="lr decay")
    loop.add_argument("--warmup-steps", type=int, default=D.warmup_steps, help="linear warmup steps")
    loop.add_argument("--weight-decay", type=float, default=D.weight_decay, help="AdamW weight decay")
    loop.add_argument("--beta1", type=float, default=D.beta1, help="AdamW beta1")
    loop.add_argument("--beta2", type=float, default=D.beta2, help="AdamW beta2")
    loop.add_argument("--adam-eps", type=float, default=D.adam_eps, help="AdamW epsilon")
    loop.add_argument("--grad-clip", type=float, default=D.grad_clip, help="max gradient norm (0: off)")
    loop.add_argument("--ema-decay", type=float, default=D.ema_decay, help="EMA decay per step")
    loop.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, help="steps between checkpoints")
    loop.add_argument("--log-every", type=int, default=D.log_every, help="steps between metric reports")
    loop.add_argument("--stop-after", type=int, help="leave after this step (checkpointed); rerun to continue")
    loop.add_argument("--seed", type=int, default=D.seed, help="seed of weights, data order and noise")
    loop.add_argument("--shuffle-buffer", type=int, default=D.shuffle_buffer, help="rows per worker shuffle buffer")
    add_worker_args(p, "Ray Train workers (default 1)")


def check_required(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if not getattr(args, name):
            fail(f"--{name.replace('_', '-')} is required")


def loop_config(args: argparse.Namespace) -> LoopConfig:
    keys = [f for f in LoopConfig.__dataclass_fields__ if hasattr(args, f)]
    cfg = LoopConfig(**{k: getattr(args, k) for k in keys})
    if problem := check_args(args):
        fail(problem)
    try:
        cfg.check(max(1, args.workers or 1))
    except ValueError as e:
        fail(str(e))
    return cfg


def resource_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """The Ray Train workers."""
    return training_plan(args, cluster)


def scaling_and_run(args: argparse.Namespace):
    """The Ray Train workers, fitted to the cluster (this joins or starts Ray), and the run's folder."""
    from pipeline.train.loop import Run, Scaling, split_output

    try:
        split_output(args.output)
    except ValueError as e:
        fail(f"--output {args.output}: {e}")
    init_ray()
    cluster = cluster_now()
    plan = resource_plan(args, cluster)
    warn_if_short(plan, cluster, "training")
    train = plan.stage("train")
    scaling = Scaling(workers=train.workers, gpus_per_worker=train.gpus, cpus_per_worker=train.cpus)
    run = Run(
        output=args.output,
        max_failures=args.max_failures,
        keep_checkpoints=args.keep_checkpoints,
        preserve_order=args.preserve_order,
    )
    return scaling, run


def finish(result: Any, export: str | None, what: str) -> int:
    """Print where the trained model is (and copy its EMA weights to `export`); 1 on a failed run."""
    if result.error is not None:
        print(f"error: training failed: {worker_error_line(result.error) or result.error}")
        return 1
    if result.checkpoint is None:
        print("error: the run ended without a checkpoint")
        return 1
    path = result.checkpoint.path
    print(f"final checkpoint: {path}")
    print(f"  {what}: {path}/ema (EMA weights), {path}/model (raw weights)")
    if result.metrics:
        shown = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
        print(f"  last metrics: {shown}")
    if export:
        import fsspec

        src_fs = result.checkpoint.filesystem  # pyarrow's, for the run's storage
        dst_fs, dst_root = fsspec.core.url_to_fs(export)
        dst_fs.makedirs(dst_root, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            with src_fs.open_input_stream(f"{path}/ema/{name}") as src, dst_fs.open(f"{dst_root}/{name}", "wb") as dst:
                shutil.copyfileobj(src, dst, COPY_CHUNK)
        print(f"  exported EMA weights to {export}")
    return 0
