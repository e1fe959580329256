"""The training jobs on Ray Train, end to end on the 250-photo ImageNet sample (CPU).

One tiny tokenizer run (2 DDP workers, images through Ray Data) and one tiny AR run (over the corpus that
tokenizer makes) are shared by the learning tests; the resume tests start their own short runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flextok import FlexTok
from flextok.ar import ARModel
from pipeline.train.common import read_events, read_metrics

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_STEPS = 1000
AR_STEPS = 120
K_EVAL_IMAGES = 64

pytestmark = pytest.mark.usefixtures("ray_session")


def latest_checkpoint(run: Path) -> Path:
    return sorted(p for p in run.glob("checkpoint_[0-9]*") if p.is_dir())[-1]


def train_tokenizer(*args: str) -> int:
    from jobs.train_tokenizer import main

    return main(["--config", str(REPO / "configs/train_tokenizer_tiny.yaml"), *args])


def train_ar(*args: str) -> int:
    from jobs.train_ar import main

    return main(["--config", str(REPO / "configs/train_ar_tiny.yaml"), *args])


def loss_ends(run: Path, key: str = "loss", n: int = 3) -> tuple[float, float]:
    """Mean of the first and of the last n logged values."""
    values = [r[key] for r in read_metrics(str(run / "tensorboard"))]
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


def sample_images(folder: Path, size: int, n: int) -> tuple[torch.Tensor, list[int]]:
    """The first n photos (sorted), ADM center-cropped, as model input [n, 3, size, size]; their labels."""
    from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input
    from pipeline.data.sources import read_labels_csv

    labels = read_labels_csv(str(folder / "labels.csv"))
    files = sorted(labels)[:n]
    arrays = np.stack([center_crop_adm(decode_image((folder / f).read_bytes()), size) for f in files])
    return to_model_input(arrays), [labels[f] for f in files]


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def tokenizer_run(runs: Path, imagenet_sample: Path) -> Path:
    rc = train_tokenizer(
        *("--input", str(imagenet_sample), "--output", str(runs / "tok")),
        *("--workers", "2", "--cpus-per-worker", "0.5", "--steps", str(TOKENIZER_STEPS)),
    )
    assert rc == 0
    return runs / "tok"


def test_tokenizer_loss_falls(tokenizer_run):
    first, last = loss_ends(tokenizer_run, "flow")
    print(f"\ntokenizer flow loss: first logged {first:.4f} -> last {last:.4f}")
    assert last < 0.75 * first


def test_tokenizer_reconstructs_better_with_more_tokens(tokenizer_run, imagenet_sample):
    model = FlexTok.from_pretrained(latest_checkpoint(tokenizer_run) / "ema")
    images, _ = sample_images(imagenet_sample, model.cfg.image_size, K_EVAL_IMAGES)
    tokens = model.tokenize(images)
    noise = model.draw_noise(len(images), torch.Generator().manual_seed(0))
    errors = {}
    for k in (1, 4, model.num_registers):
        recon = model.detokenize(tokens[:, :k], timesteps=25, noise=noise)
        errors[k] = ((recon.clamp(-1, 1) - images) ** 2).mean(dim=(1, 2, 3))  # per image
    n = model.num_registers
    print("\nmean squared error by k: " + ", ".join(f"k={k}: {e.mean():.4f}" for k, e in errors.items()))
    assert errors[n].mean() < 0.85 * errors[1].mean()
    assert (errors[n] < errors[1]).float().mean() > 0.7  # for most images, not on average only


def test_tokenizer_checkpoints_load_with_from_pretrained(tokenizer_run):
    final = latest_checkpoint(tokenizer_run)
    assert final.name == f"checkpoint_{TOKENIZER_STEPS:08d}"
    raw, ema = FlexTok.from_pretrained(final / "model"), FlexTok.from_pretrained(final / "ema")
    assert raw.cfg == ema.cfg and raw.cfg.image_size == 32 and raw.num_registers == 32
    assert not torch.equal(raw.decoder.final_proj.weight, ema.decoder.final_proj.weight)
    state = torch.load(final / "train_state.pt", weights_only=True)
    assert state["train_state"]["step"] == TOKENIZER_STEPS
    assert state["optimizer"]["state"]  # Adam moments travel with the checkpoint
    assert list((tokenizer_run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = read_metrics(str(tokenizer_run / "tensorboard"))
    assert metrics[-1]["step"] == TOKENIZER_STEPS and metrics[-1]["images_per_s"] > 0


# ------------------------------------------------------------------------------------------ AR
@pytest.fixture(scope="module")
def corpus(tokenizer_run, imagenet_sample, tmp_path_factory) -> Path:
    """The sample tokenized by the trained tokenizer (and its horizontal flips), in the corpus format."""
    from flextok.checkpoint import weights_digest
    from pipeline.data.corpus import CorpusMeta, tokens_table, write_table_corpus
    from pipeline.data.preprocess import PREPROCESSING

    model = FlexTok.from_pretrained(latest_checkpoint(tokenizer_run) / "ema")
    images, labels = sample_images(imagenet_sample, model.cfg.image_size, 250)
    tokens = torch.cat([model.tokenize(images), model.tokenize(images.flip(-1))]).numpy()
    meta = CorpusMeta(
        tokenizer="tok",
        tokenizer_sha256=weights_digest(model.state_dict()),
        codebook_size=model.codebook_size,
        num_registers=model.num_registers,
        num_tokens=model.num_registers,
        resolution=model.cfg.image_size,
        augment="flip",
        preprocessing=PREPROCESSING,
    )
    keys = [f"img{i:03d}" for i in range(250)] * 2
    table = tokens_table(keys, labels * 2, tokens, ["sample"] * 500, [0] * 250 + [1] * 250)
    out = tmp_path_factory.mktemp("corpus")
    write_table_corpus(str(out), {"sample": table}, meta)
    return out


def unigram_entropy(corpus: Path) -> float:
    """Entropy (nats) of the corpus's token frequencies."""
    from pipeline.data.corpus import CorpusDataset

    counts = Counter(t for tokens, _ in CorpusDataset(str(corpus)) for t in tokens.tolist())
    p = np.array(list(counts.values()), np.float64) / sum(counts.values())
    return float(-(p * np.log(p)).sum())


AR_ARGS = ("--workers", "1", "--steps", str(AR_STEPS), "--checkpoint-every", str(AR_STEPS // 2))


@pytest.fixture(scope="module")
def ar_run(corpus, runs) -> Path:
    rc = train_ar("--corpus", str(corpus), "--output", str(runs / "ar"), "--preserve-order", *AR_ARGS)
    assert rc == 0
    return runs / "ar"


def test_ar_loss_falls_below_the_unigram_entropy(ar_run, corpus):
    entropy = unigram_entropy(corpus)
    first, last = loss_ends(ar_run)
    model = ARModel.from_pretrained(latest_checkpoint(ar_run) / "model")
    from pipeline.data.corpus import CorpusDataset

    rows = list(CorpusDataset(str(corpus)))
    tokens = torch.stack([t for t, _ in rows])
    labels = torch.tensor([label for _, label in rows])
    with torch.no_grad():
        corpus_loss = float(model.loss(labels, tokens))
    print(
        f"\nAR: unigram entropy {entropy:.3f} nats; train loss {first:.3f} -> {last:.3f}; "
        f"final model on the corpus {corpus_loss:.3f} (log 64000 = {math.log(64000):.3f})"
    )
    assert last < first
    assert corpus_loss < entropy


def test_ar_checkpoint_loads_and_generates(ar_run, corpus):
    final = latest_checkpoint(ar_run)
    model = ARModel.from_pretrained(final / "ema")
    assert model.cfg.max_tokens == 32 and model.cfg.vocab_size == 64000
    out = model.generate(torch.tensor([0, 4, model.null_class]), 32, cfg_scale=2.0, top_k=100)
    assert out.shape == (3, 32) and int(out.max()) < 64000


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v for k, v in load_file(str(folder / "model/model.safetensors")).items()}
    tensors |= {f"ema/{k}": v for k, v in load_file(str(folder / "ema/model.safetensors")).items()}
    optimizer = torch.load(folder / "train_state.pt", weights_only=True)["optimizer"]["state"]
    for name, moments in optimizer.items():
        tensors |= {f"opt/{name}/{k}": v for k, v in moments.items()}
    return tensors


def test_stopped_run_resumes_to_the_same_parameters(ar_run, corpus, runs):
    """Stop half way, run the same command again: the result equals the uninterrupted run's, bit for bit."""
    args = ("--corpus", str(corpus), "--output", str(runs / "ar-resumed"), "--preserve-order")
    assert train_ar(*args, *AR_ARGS, "--stop-after", str(AR_STEPS // 2)) == 0
    assert latest_checkpoint(runs / "ar-resumed").name == f"checkpoint_{AR_STEPS // 2:08d}"
    assert train_ar(*args, *AR_ARGS) == 0
    events = read_events(str(runs / "ar-resumed" / "tensorboard"))
    assert [(e["event"], e["step"]) for e in events] == [("started", 0), ("resumed", AR_STEPS // 2)]
    resumed, uninterrupted = (
        checkpoint_tensors(latest_checkpoint(runs / "ar-resumed")),
        checkpoint_tensors(latest_checkpoint(ar_run)),
    )
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def registered_checkpoint(run: Path) -> str | None:
    """The latest checkpoint Ray Train has registered for the run (what get_checkpoint() returns after a
    restart), from its own record. A checkpoint folder can exist before that: the report is a barrier."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def train_worker_pids() -> list[int]:
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def test_killed_worker_resumes_from_the_last_checkpoint(corpus, runs):
    """Two FSDP workers; one is killed after the first checkpoint; the run restarts the group, resumes
    from that checkpoint and finishes."""
    steps, every = 30, 10
    run = runs / "ar-killed"
    argv = ("--corpus", str(corpus), "--output", str(run), "--strategy", "fsdp")
    argv += ("--workers", "2", "--cpus-per-worker", "0.5", "--steps", str(steps), "--batch-size", "16")
    argv += ("--checkpoint-every", str(every), "--log-every", "5", "--max-failures", "2")
    result: dict[str, int] = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", train_ar(*argv)))
    thread.start()
    deadline = time.monotonic() + 600
    while registered_checkpoint(run) is None:
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint registered"
        time.sleep(0.1)
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=600)
    assert result.get("rc") == 0
    assert latest_checkpoint(run).name == f"checkpoint_{steps:08d}"
    events = read_events(str(run / "tensorboard"))
    assert events[0]["event"] == "started"
    resumes = [e for e in events if e["event"] == "resumed"]
    assert len(resumes) == 1 and every <= resumes[0]["step"] < steps and resumes[0]["step"] % every == 0
    state = torch.load(latest_checkpoint(run) / "train_state.pt", weights_only=True)["train_state"]
    assert state["step"] == steps
    assert ARModel.from_pretrained(latest_checkpoint(run) / "model").cfg.max_tokens == 32
    metrics = json.loads((run / "tensorboard" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == steps
