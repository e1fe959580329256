"""One resources vocabulary for every job, and the plans (resource requests per stage) it turns into.

    --workers N            actors of the job's model stage (tokenizer, decoder, or eval fid's Inception),
                           or Ray Train workers
    --gpus-per-worker G    GPUs each worker gets (fractions share a device)
    --cpus-per-worker C    CPUs each worker reserves
    --inception-workers/--inception-gpus/--inception-cpus   the sweeps' second stage (Inception)

Unset flags are filled in from the cluster (`Cluster`, read once by `cluster_now()`), so that the stages that
run at the same time fit it: GPUs go one worker per GPU; in a sweep each GPU is split between its decoder
worker (0.75) and an Inception worker's 0.25, so N GPUs are never asked for N + 1 (the demo's `--gpus N`). Flags
given on the command line are kept as they are; a plan they make that does not fit the cluster as it is now
gets a warning (an autoscaling cluster may still grow to it) instead of a silent wait.
Everything here but `cluster_now` and `init_ray` is a pure function of flags and cluster size.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

# The sweeps' split of one GPU. By our estimate the decoder costs about 1000x Inception's FLOPs per image
# (`--timesteps` x 2 CFG passes of a ~0.5-1B transformer vs one ~6 GFLOP Inception forward), so a quarter of a
# device (Ray shares it by fraction; both processes see the same GPU) is plenty for Inception. Not yet timed
# on a GPU.
DECODER_GPU_SHARE = 0.75
INCEPTION_GPU_SHARE = 1.0 - DECODER_GPU_SHARE
MIN_AUTO_CPUS = 0.25  # the smallest CPU share an actor gets when the cluster is too small for whole CPUs


@dataclass(frozen=True)
class Cluster:
    """What a plan must fit: the cluster's total CPUs and GPUs."""

    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One stage's request: `workers` actors (or Ray Train workers), each with `cpus` CPUs and `gpus` GPUs."""

    name: str
    workers: int
    cpus: float
    gpus: float = 0.0

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


@dataclass(frozen=True)
class Plan:
    """The stages a job runs at the same time, plus CPUs of the tasks that feed them (reading, decoding)."""

    stages: tuple[Stage, ...]
    reader_cpus: float = 0.0  # at least one reading task must be able to run beside the actors

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def gpus(self) -> float:
        return sum(s.workers * s.gpus for s in self.stages)

    @property
    def cpus(self) -> float:
        return sum(s.workers * s.cpus for s in self.stages) + self.reader_cpus

    def shortfall(self, cluster: Cluster) -> str | None:
        """None when the plan fits the cluster; else one line that says what is missing."""
        what = ", ".join(f"{s.name} {s.workers} x ({fmt(s.cpus)} CPU, {fmt(s.gpus)} GPU)" for s in self.stages)
        eps = 1e-9
        if self.gpus > cluster.gpus + eps:
            return f"the plan ({what}) needs {fmt(self.gpus)} GPUs at once; the cluster has {fmt(cluster.gpus)}"
        if self.cpus > cluster.cpus + eps:
            readers = f" + {fmt(self.reader_cpus)} for reading" if self.reader_cpus else ""
            return (
                f"the plan ({what}{readers}) needs {fmt(self.cpus)} CPUs at once; the cluster has {fmt(cluster.cpus)}"
            )
        return None


def fmt(x: float) -> str:
    return f"{x:g}"


# ------------------------------------------------------------------------------------------ flags
def add_worker_args(parser: argparse.ArgumentParser, what: str) -> None:
    """--workers, --gpus-per-worker, --cpus-per-worker for the job's model stage (`what` names it in help)."""
    group = parser.add_argument_group("resources (unset: fitted to the cluster, see jobs/resources.py)")
    group.add_argument("--workers", type=int, help=f"{what} (default: one per GPU, else 1)")
    group.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)"
    )
    group.add_argument("--cpus-per-worker", type=float, help="CPUs each worker reserves (default: 1, or what fits)")


def add_inception_stage_args(parser: argparse.ArgumentParser) -> None:
    """The sweeps' Inception stage."""
    group = parser.add_argument_group("Inception stage (unset: fitted to the cluster)")
    group.add_argument("--inception-workers", type=int, help="Inception actors (default 1)")
    group.add_argument(
        "--inception-gpus", type=float, help=f"GPUs per Inception actor (default {INCEPTION_GPU_SHARE} with GPUs)"
    )
    group.add_argument("--inception-cpus", type=float, help="CPUs per Inception actor (default: as the decoders)")


def check_args(args: argparse.Namespace) -> str | None:
    """A one-line complaint about negative or zero resource flags, or None."""
    for name in ("workers", "inception_workers"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    for name in ("gpus_per_worker", "cpus_per_worker", "inception_gpus", "inception_cpus"):
        if getattr(args, name, None) is not None and getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0"
    return None


def given(args: argparse.Namespace) -> bool:
    """Whether any resource flag was set (then a plan that does not fit is the user's choice)."""
    names = ("workers", "gpus_per_worker", "cpus_per_worker", "inception_workers", "inception_gpus", "inception_cpus")
    return any(getattr(args, n, None) is not None for n in names)


# ------------------------------------------------------------------------------------------ plans
def one_per_gpu(gpus_per_worker: float, cluster: Cluster) -> int:
    """As many workers as the cluster's GPUs hold at `gpus_per_worker` each (at least 1)."""
    return max(1, math.floor(cluster.gpus / gpus_per_worker + 1e-9)) if gpus_per_worker > 0 else 1


def actor_stage_plan(name: str, args: argparse.Namespace, cluster: Cluster, reader_cpus: float = 1.0) -> Plan:
    """One actor stage fed by reading tasks: pretokenize (tokenizer) and eval fid (Inception).
    GPUs: 1 per worker when the cluster has GPUs; workers: one per GPU, else 1; CPUs: 1 each, or an equal
    share of what one reading task leaves when the cluster is smaller."""
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if cluster.gpus > 0 else 0.0)
    workers = args.workers or one_per_gpu(gpus, cluster)
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else fitted_cpus(workers, cluster, reader_cpus)
    return Plan((Stage(name, workers, cpus, gpus),), reader_cpus)


def sweep_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """The sweeps' two stages ("decode": FlexTok or AR + FlexTok; "inception") and one reading task.
    With GPUs, every GPU holds one decoder worker (0.75) and the Inception workers share the 0.25s."""
    auto_gpu = cluster.gpus > 0
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (DECODER_GPU_SHARE if auto_gpu else 0.0)
    inception_gpus = args.inception_gpus
    if inception_gpus is None:
        inception_gpus = INCEPTION_GPU_SHARE if gpus > 0 else 0.0
    workers = args.workers or (max(1, math.floor(cluster.gpus + 1e-9)) if gpus > 0 else 1)
    inception_workers = args.inception_workers or 1
    cpus = args.cpus_per_worker
    if cpus is None:
        cpus = fitted_cpus(workers + inception_workers, cluster, 1.0)
    inception_cpus = args.inception_cpus if args.inception_cpus is not None else cpus
    stages = (
        Stage("decode", workers, cpus, gpus),
        Stage("inception", inception_workers, inception_cpus, inception_gpus),
    )
    return Plan(stages, reader_cpus=1.0)


def training_plan(args: argparse.Namespace, cluster: Cluster) -> Plan:
    """Ray Train workers: `--workers` (default 1), 1 GPU each when the cluster has GPUs, 1 CPU each."""
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if cluster.gpus > 0 else 0.0)
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else 1.0
    return Plan((Stage("train", args.workers or 1, cpus, gpus),))


def fitted_cpus(actors: int, cluster: Cluster, reader_cpus: float) -> float:
    """1 CPU per actor when the cluster has room for all of them plus the reading tasks, else an equal share of
    what the readers leave (at least MIN_AUTO_CPUS, so a tiny machine still makes progress)."""
    spare = cluster.cpus - reader_cpus
    return max(MIN_AUTO_CPUS, min(1.0, spare / actors))


def threads(stage: Stage, torch_threads: int | None) -> int:
    """torch threads per actor: --torch-threads, else the actor's whole CPUs (at least 1)."""
    return torch_threads or max(1, int(stage.cpus))


# ------------------------------------------------------------------------------------------ Ray
def init_ray(num_gpus: int | None = None, worker_logs: bool = True) -> None:
    """Join the running Ray (ray job submit, tests, the demo) or start a local one. `num_gpus` (the demo) starts
    a new local instance with exactly that many GPUs, unless RAY_ADDRESS names a cluster to join;
    `worker_logs=False` keeps actors' prints off the driver. Ray's processes get pipeline.malloc's runtime_env."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.malloc import runtime_env

    if ray.is_initialized():
        return
    local = {} if num_gpus is None or os.environ.get("RAY_ADDRESS") else {"address": "local", "num_gpus": num_gpus}
    ray.init(
        include_dashboard=False,
        log_to_driver=worker_logs,
        configure_logging=False,
        runtime_env=runtime_env(),
        **local,
    )


def cluster_now() -> Cluster:
    """The running cluster's total CPUs and GPUs (call after init_ray)."""
    import ray

    total = ray.cluster_resources()
    return Cluster(cpus=float(total.get("CPU", 1.0)), gpus=float(total.get("GPU", 0.0)))


def warn_if_short(plan: Plan, cluster: Cluster, prog: str) -> None:
    """Print one warning line when a plan made from explicit flags does not fit the cluster as it is now."""
    short = plan.shortfall(cluster)
    if short:
        import sys

        print(f"warning: {prog}: {short}; it waits until the cluster grows (autoscaler) or never", file=sys.stderr)
