"""Resource plans (jobs/resources.py): every job's stages fit the cluster together, and a worker given a GPU
that sees no CUDA stops with one line (pipeline/devices.py)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jobs.common import add_config_flag, run_main, worker_error_line
from jobs.resources import DECODER_GPU_SHARE, INCEPTION_GPU_SHARE, Cluster, Plan, Stage
from pipeline.devices import NoCudaError, stage_device

REPO = Path(__file__).resolve().parents[1]

# the jobs that run stages on Ray, with the arguments they need besides resources
JOBS = {
    "jobs.pretokenize": ["--model", "m", "--input", "x.tar", "--output", "o"],
    "jobs.eval_fid": ["--real", "a/", "--fake", "b/"],
    "jobs.eval_sweep": ["--model", "m", "--input", "x/", "--output", "o"],
    "jobs.eval_generate": ["--ar-model", "a", "--model", "m", "--reference-stats", "r.npz", "--output", "o"],
    "jobs.train_tokenizer": ["--input", "x/", "--output", "s/n"],
    "jobs.train_ar": ["--corpus", "c/", "--output", "s/n"],
}


def job_plan(module: str, flags: list[str], cluster: Cluster) -> Plan:
    job = importlib.import_module(module)
    parser = job.build_parser()
    add_config_flag(parser)
    return job.resource_plan(parser.parse_args(JOBS[module] + flags), cluster)


# ------------------------------------------------------------------------------------------ plans
@pytest.mark.parametrize("module", sorted(JOBS))
@pytest.mark.parametrize("cluster", [Cluster(cpus=2), Cluster(cpus=16, gpus=1), Cluster(cpus=96, gpus=8)])
def test_every_jobs_default_plan_fits_the_cluster(module, cluster):
    plan = job_plan(module, [], cluster)
    assert plan.shortfall(cluster) is None, plan
    uses_gpus = all(s.gpus > 0 for s in plan.stages)
    assert uses_gpus == (cluster.gpus > 0), plan  # GPUs are used when there are any, never asked for otherwise


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_sweep_splits_each_gpu_between_a_decoder_and_the_inception_stage(gpus):
    cluster = Cluster(cpus=8 * gpus, gpus=gpus)
    plan = job_plan("jobs.eval_sweep", [], cluster)
    assert plan.stage("decode") == Stage("decode", gpus, 1.0, DECODER_GPU_SHARE)
    assert plan.stage("inception") == Stage("inception", 1, 1.0, INCEPTION_GPU_SHARE)
    assert plan.gpus <= gpus


def test_single_stage_jobs_put_one_worker_on_each_gpu():
    plan = job_plan("jobs.pretokenize", [], Cluster(cpus=64, gpus=8))
    assert plan.stage("tokenize") == Stage("tokenize", 8, 1.0, 1.0)
    half = job_plan("jobs.pretokenize", ["--gpus-per-worker", "0.5"], Cluster(cpus=64, gpus=8))
    assert half.stage("tokenize").workers == 16


def test_small_cpu_cluster_shares_its_cpus_between_both_sweep_stages_and_a_reader():
    plan = job_plan("jobs.eval_generate", [], Cluster(cpus=2))
    assert [s.cpus for s in plan.stages] == [0.5, 0.5] and plan.cpus == 2


def test_explicit_flags_are_kept_and_a_plan_that_does_not_fit_says_what_is_missing():
    cluster = Cluster(cpus=16, gpus=1)
    plan = job_plan("jobs.eval_sweep", ["--workers", "1", "--gpus-per-worker", "1"], cluster)
    assert plan.stage("decode").gpus == 1 and plan.gpus == 1 + INCEPTION_GPU_SHARE
    assert "needs 1.25 GPUs at once; the cluster has 1" in plan.shortfall(cluster)
    plan = job_plan("jobs.train_ar", ["--workers", "4", "--cpus-per-worker", "8"], Cluster(cpus=16))
    assert "needs 32 CPUs at once; the cluster has 16" in plan.shortfall(Cluster(cpus=16))


def test_cpu_only_flags_on_a_gpu_cluster_ask_for_no_gpu():
    plan = job_plan("jobs.eval_sweep", ["--gpus-per-worker", "0"], Cluster(cpus=16, gpus=4))
    assert plan.gpus == 0 and plan.stage("decode").workers == 1


@pytest.mark.parametrize("flag", ["--workers=0", "--gpus-per-worker=-1", "--cpus-per-worker=-0.5"])
def test_bad_resource_flags_are_one_line_errors(flag, capsys):
    from jobs.train_ar import main

    assert run_main(main, ["--corpus", "c", "--output", "s/n", flag]) == 2
    err = capsys.readouterr().err
    assert flag.split("=")[0] in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ CUDA checks
def test_stage_without_gpu_runs_on_cpu():
    assert stage_device("the tokenizer", use_gpu=False) == "cpu"


def test_stage_given_a_gpu_without_cuda_fails_naming_the_stage_and_the_devices_it_saw(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(NoCudaError, match=r"the tokenizer was given a GPU but sees no CUDA \(CUDA_VISIBLE_DEVICES='3'"):
        stage_device("the tokenizer", use_gpu=True)


def test_ray_train_workers_given_gpus_check_cuda_before_nccl(monkeypatch):
    """The backend runs the check on every worker before it sets up the process group."""
    from pipeline.train.loop import cuda_checked_torch_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []

    class Workers:  # runs the workers' functions in this process
        def get_resources_per_worker(self):
            return {"CPU": 1, "GPU": 1}

        def execute(self, fn, *args, **kwargs):
            calls.append(fn.__name__)
            return [fn(*args, **kwargs)]

        def execute_single(self, *args, **kwargs):
            raise AssertionError("the process group was set up before the CUDA check")

    config = cuda_checked_torch_config()
    with pytest.raises(NoCudaError, match="a Ray Train worker was given a GPU"):
        config.backend_cls().on_start(Workers(), config)
    assert calls == ["stage_device"]


def test_worker_error_inside_a_ray_traceback_becomes_one_line(capsys):
    wrapped = "ActorDiedError: ...\n  File x\npipeline.devices.NoCudaError: the X was given a GPU but sees no CUDA\n"

    def main(argv):
        raise RuntimeError(wrapped)

    assert run_main(main, []) == 2
    assert capsys.readouterr().err == "error: the X was given a GPU but sees no CUDA\n"
    assert worker_error_line(RuntimeError("some other failure")) is None


# ---------------------------------------------------------------------------- on a Ray with a GPU it does not have
FAKE_GPU_RAY = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s start-up wait
        try:
            ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    from jobs import demo
    from jobs.common import add_config_flag, worker_error_line
    from jobs.resources import Stage, cluster_now

    def fits_at_once(stages, timeout=30):  # every worker of every stage placed at the same time
        bundles = [{"CPU": s.cpus, "GPU": s.gpus} for s in stages for _ in range(s.workers)]
        bundles = [{k: v for k, v in b.items() if v} for b in bundles]
        pg = placement_group(bundles)
        ok = pg.wait(timeout_seconds=timeout)
        remove_placement_group(pg)
        return ok

    out, cluster = {}, cluster_now()
    args = demo.build_parser().parse_args(["--model", "m", "--gpus", "1", "--output", sys.argv[1]])
    for step in demo.plan(args, Path("images"), demo.Layout(Path(sys.argv[1]))):
        job = __import__(step.module, fromlist=["build_parser"])
        if hasattr(job, "resource_plan"):
            parser = job.build_parser()
            add_config_flag(parser)
            plan = job.resource_plan(parser.parse_args(step.argv), cluster)
            out[step.name] = {"gpus": plan.gpus, "placed": fits_at_once(plan.stages)}
    old = [Stage("decode", 1, 1.0, 1.0), Stage("inception", 1, 1.0, 1.0)]  # the old sweep plan on 1 GPU
    out["old sweep plan"] = {"gpus": 2.0, "placed": fits_at_once(old, timeout=5)}

    from pipeline.eval.features import InceptionStage
    from pipeline.data.pretokenize import TokenizeActor
    from pipeline.eval.sweep import ReconstructStage
    actors = {
        "inception": ray.remote(InceptionStage).options(num_gpus=0.25, num_cpus=0.1).remote("w.pth", device="cuda"),
        "tokenize": ray.remote(TokenizeActor).options(num_gpus=0.25, num_cpus=0.1).remote("m", 32, 32, True, 1),
        "decode": ray.remote(ReconstructStage).options(num_gpus=0.25, num_cpus=0.1).remote(
            "m", (1,), {}, [], False, device="cuda"),
    }
    for name, actor in actors.items():
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=120)
            out[name] = "started"
        except Exception as e:
            out[name] = worker_error_line(e)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fake_gpu_ray(tmp_path_factory):
    """The demo's plans and the stage actors on a Ray of its own (a subprocess) that declares 1 GPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the actors would find it")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    done = subprocess.run(
        [sys.executable, "-c", FAKE_GPU_RAY, str(tmp_path_factory.mktemp("demo"))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_demo_with_one_gpu_places_every_steps_stages_at_once_on_one_gpu(fake_gpu_ray):
    steps = {k: v for k, v in fake_gpu_ray.items() if isinstance(v, dict) and k != "old sweep plan"}
    assert set(steps) == {"pretokenize", "train ar", "eval sweep", "eval generate"}  # --model: no tokenizer training
    for name, result in steps.items():
        assert result["gpus"] <= 1 and result["placed"], (name, result)
    assert fake_gpu_ray["old sweep plan"] == {"gpus": 2.0, "placed": False}  # the check can fail


@pytest.mark.parametrize("stage", ["inception", "tokenize", "decode"])
def test_actor_given_a_gpu_without_cuda_fails_with_one_line(fake_gpu_ray, stage):
    line = fake_gpu_ray[stage]
    assert line is not None and "was given a GPU but sees no CUDA (CUDA_VISIBLE_DEVICES='0'" in line, line
    assert "\n" not in line
