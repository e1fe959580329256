"""The whole pipeline on object storage: every input and output an s3:// URL on the session's S3 server (moto,
127.0.0.1; see conftest.s3_env), each step the job's own `main(argv)` as a user would run it, from an empty
working directory that must stay empty.

shards -> train tokenizer (--export to the bucket) -> pretokenize (a crash, a resume, a rerun that adds
nothing) -> validate -> train AR (stopped, then resumed from its s3:// checkpoint) -> eval fid (statistics
saved to and read from the bucket) -> eval sweep and eval generate (outputs in the bucket).
Sizes are tiny (12 photos at 32 px, a few steps) so the file runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import upload_sample

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, SHARD_SIZE = 12, 4
AR_STEPS = 4

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def root(s3_bucket) -> str:
    """This module's own prefix in the bucket."""
    return f"{s3_bucket}/pipeline-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def s3() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3")


@pytest.fixture(scope="module", autouse=True)
def empty_cwd(tmp_path_factory, ray_session):
    """Every job runs from an empty folder (after the session's Ray has started); the last test checks it."""
    folder = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(folder)
    yield folder
    os.chdir(old)


def run_job(module: str, *argv: str) -> int:
    import importlib

    return importlib.import_module(f"jobs.{module}").main(list(argv))


def listing(s3, url: str) -> dict[str, tuple[int, str]]:
    """path -> (size, ETag) of every object under `url`."""
    s3.invalidate_cache()
    return {p: (info["size"], info.get("ETag", "")) for p, info in s3.find(url, detail=True).items()}


# ------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def raw(root, s3, imagenet_sample) -> str:
    """The first NUM_IMAGES photos and their labels.csv rows, uploaded to the bucket."""
    url = f"{root}/raw"
    upload_sample(s3, imagenet_sample, url, NUM_IMAGES)
    return url


@pytest.fixture(scope="module")
def shards(root, raw) -> str:
    assert run_job("make_shards", "--input", raw, "--output", f"{root}/shards", "--shard-size", str(SHARD_SIZE)) == 0
    return f"{root}/shards/shard-*.tar"


def test_make_shards_writes_tar_shards_to_the_bucket(shards, s3):
    tars = s3.glob(shards)
    assert len(tars) == NUM_IMAGES // SHARD_SIZE
    import tarfile

    with s3.open(tars[0], "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        names = [m.name for m in tar]
    assert len([n for n in names if n.endswith(".jpg")]) == SHARD_SIZE
    assert len([n for n in names if n.endswith(".cls")]) == SHARD_SIZE


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizer(root, shards) -> str:
    """A tiny tokenizer trained on the shards; checkpoints in the bucket, its EMA weights exported there."""
    rc = run_job(
        "train_tokenizer",
        *("--config", str(REPO / "configs/train_tokenizer_tiny.yaml"), "--input", shards),
        *("--output", f"{root}/runs/tok", "--export", f"{root}/models/tok"),
        *("--steps", "2", "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "1"),
    )
    assert rc == 0
    return f"{root}/models/tok"


def test_tokenizer_checkpoints_and_export_are_in_the_bucket(tokenizer, root, s3):
    from flextok import FlexTok

    assert s3.isfile(f"{root}/runs/tok/checkpoint_00000002/ema/model.safetensors")
    assert s3.isfile(f"{root}/runs/tok/checkpoint_00000002/train_state.pt")
    assert s3.glob(f"{root}/runs/tok/tensorboard/events.out.tfevents.*")
    exported = FlexTok.from_pretrained(tokenizer)
    ema = FlexTok.from_pretrained(f"{root}/runs/tok/checkpoint_00000002/ema")
    assert exported.cfg.image_size == 32 and exported.num_registers == 32
    assert all((a == b).all() for a, b in zip(exported.state_dict().values(), ema.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------ pretokenize
@pytest.fixture(scope="module")
def corpus(root, shards, tokenizer, s3) -> dict:
    """Pretokenize three times: a run that crashes after its first commit, the rerun that resumes it, and a
    rerun over the finished corpus. Returns the corpus URL and what each run committed."""
    import pipeline.data.pretokenize as P

    url = f"{root}/corpus"
    argv = ("--model", tokenizer, "--input", shards, "--output", url, "--batch-size", "4")
    real_commit = P._commit
    commits: list[str] = []

    def crash_after_first(*args, **kwargs):
        if commits:
            raise RuntimeError("simulated crash of the driver")
        commits.append(args[2])
        return real_commit(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_commit", crash_after_first)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_job("pretokenize", *argv)
    after_crash = {"markers": len(s3.glob(f"{url}/_units/*.json")), "manifest": s3.exists(f"{url}/_manifest.json")}

    def counting(*args, **kwargs):
        commits.append(args[2])
        return real_commit(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_commit", counting)
        commits.clear()
        assert run_job("pretokenize", *argv) == 0
        resumed = list(commits)
        before = listing(s3, url)
        commits.clear()
        assert run_job("pretokenize", *argv) == 0
        rerun = list(commits)
        after = listing(s3, url)
    return {"url": url, "after_crash": after_crash, "resumed": resumed, "rerun": rerun, "unchanged": before == after}


def test_a_crashed_pretokenize_run_left_one_committed_shard_and_no_manifest(corpus):
    assert corpus["after_crash"] == {"markers": 1, "manifest": False}


def test_the_resumed_run_commits_only_the_missing_shards(corpus):
    assert len(corpus["resumed"]) == NUM_IMAGES // SHARD_SIZE - 1


def test_a_rerun_over_the_finished_corpus_adds_nothing(corpus):
    assert corpus["rerun"] == [] and corpus["unchanged"]


def test_the_corpus_in_the_bucket_validates(corpus, capsys):
    from pipeline.data.corpus import validate_corpus

    assert run_job("validate_corpus", corpus["url"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    v = validate_corpus(corpus["url"])
    assert v.problems == [] and v.rows == NUM_IMAGES and v.shards == NUM_IMAGES // SHARD_SIZE


# ------------------------------------------------------------------------------------------ AR
@pytest.fixture(scope="module")
def ar(root, corpus) -> str:
    """A tiny AR run stopped half way and resumed from its checkpoint in the bucket; EMA exported there."""
    argv = (
        *("--config", str(REPO / "configs/train_ar_tiny.yaml"), "--corpus", corpus["url"]),
        *("--output", f"{root}/runs/ar", "--export", f"{root}/models/ar", "--steps", str(AR_STEPS)),
        *("--batch-size", "4", "--checkpoint-every", str(AR_STEPS // 2), "--log-every", "1"),
    )
    assert run_job("train_ar", *argv, "--stop-after", str(AR_STEPS // 2)) == 0
    assert run_job("train_ar", *argv) == 0
    return f"{root}/models/ar"


def test_ar_run_resumed_from_its_checkpoint_in_the_bucket(ar, root, s3):
    import torch

    from pipeline.train.common import read_events, read_metrics

    run = f"{root}/runs/ar"
    events = read_events(f"{run}/tensorboard")
    assert [(e["event"], e["step"]) for e in events] == [("started", 0), ("resumed", AR_STEPS // 2)]
    # the resumed run appended to the first run's metrics in the bucket, it did not replace them
    assert [m["step"] for m in read_metrics(f"{run}/tensorboard")] == list(range(1, AR_STEPS + 1))
    with s3.open(f"{run}/checkpoint_{AR_STEPS:08d}/train_state.pt", "rb") as f:
        state = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert state["train_state"]["step"] == AR_STEPS


def test_exported_ar_model_loads_from_the_bucket(ar):
    from flextok.ar import ARModel

    model = ARModel.from_pretrained(ar)
    assert model.cfg.max_tokens == 32 and model.cfg.vocab_size == 64000


# ------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def reference(root, shards, inception_weights) -> str:
    url = f"{root}/eval/reference.npz"
    argv = ("--real", shards, "--resolution", "32", "--save-stats", url, "--batch-size", "4")
    assert run_job("eval_fid", *argv, "--inception-weights", str(inception_weights)) == 0
    return url


def test_eval_fid_saves_statistics_to_the_bucket_and_reads_them_back(reference, shards, inception_weights, capsys):
    from pipeline.eval.fid import load_reference

    assert load_reference(reference).n == NUM_IMAGES
    capsys.readouterr()
    argv = ("--real", reference, "--fake", shards, "--resolution", "32", "--batch-size", "4")
    assert run_job("eval_fid", *argv, "--inception-weights", str(inception_weights)) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["fake"]["count"] == NUM_IMAGES
    assert abs(result["fid"]) < 1e-3  # the same images on both sides


def sweep_options(inception_weights: Path) -> tuple[str, ...]:
    return ("--ks", "1,32", "--timesteps", "2", "--batch-size", "4", "--inception-weights", str(inception_weights))


def read_json(s3, url: str) -> dict:
    with s3.open(url, "r") as f:
        return json.load(f)


def test_eval_sweep_reads_and_writes_the_bucket(root, shards, tokenizer, inception_weights, s3):
    out = f"{root}/eval/recon"
    argv = ("--model", tokenizer, "--input", shards, "--output", out, "--num-samples", "8")
    assert run_job("eval_sweep", *argv, *sweep_options(inception_weights)) == 0
    results = read_json(s3, f"{out}/results.json")
    assert [r["k"] for r in results["per_k"]] == [1, 32] and results["work"]["images"] == 8
    for name in ("results.md", "fid_vs_tokens.png", "recon_grid.png", "reference_stats.npz", "partial/settings.json"):
        assert s3.isfile(f"{out}/{name}"), name
    assert s3.glob(f"{out}/partial/chunk-*.npz")


def test_eval_generate_reads_and_writes_the_bucket(root, ar, tokenizer, reference, inception_weights, s3):
    out = f"{root}/eval/generate"
    argv = ("--ar-model", ar, "--model", tokenizer, "--reference-stats", reference, "--output", out)
    argv += ("--num-samples", "4", "--gen-batch", "4")
    assert run_job("eval_generate", *argv, *sweep_options(inception_weights)) == 0
    results = read_json(s3, f"{out}/results.json")
    assert [r["k"] for r in results["per_k"]] == [1, 32] and results["work"]["images"] == 4
    assert results["provenance"]["reference"]["source"] == reference  # the statistics file in the bucket
    for name in ("results.md", "fid_vs_tokens.png", "samples_grid.png"):
        assert s3.isfile(f"{out}/{name}"), name


def test_nothing_was_written_to_the_working_directory(empty_cwd):
    assert sorted(os.listdir(empty_cwd)) == []
