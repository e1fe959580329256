"""Training building blocks without Ray: schedule, randomness, EMA, checkpoints, metrics logs, collation,
REPA, the objectives, and the jobs' argument checks."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from flextok import FlexTok, preset
from flextok.ar import ARModel, ar_preset
from pipeline.train.ar import ARObjective, ARTask, TokenCollate
from pipeline.train.common import (
    EMA,
    LoopConfig,
    MetricsLog,
    TrainState,
    lr_at,
    make_optimizer,
    read_checkpoint,
    read_metrics,
    save_extra,
    save_train_state,
    step_generator,
)
from pipeline.train.loop import accumulation_groups
from pipeline.train.repa import DINOv2Teacher, Projector, RandomConvTeacher, repa_loss, to_grid
from pipeline.train.tokenizer import ImageCollate, TokenizerObjective, TokenizerTask


# ------------------------------------------------------------------------------------------ schedule
def test_warmup_then_cosine_to_the_floor():
    cfg = LoopConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_linear_and_constant_schedules():
    linear = LoopConfig(steps=11, lr=2.0, min_lr_ratio=0.0, schedule="linear")
    assert [lr_at(s, linear) for s in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    constant = LoopConfig(steps=11, lr=2.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 1, 2, 10)] == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_batch_must_split_over_workers_and_accumulation():
    LoopConfig(batch_size=24, grad_accum=3).check(world_size=2)
    with pytest.raises(ValueError, match="multiple of num-workers x grad-accum"):
        LoopConfig(batch_size=20, grad_accum=3).check(world_size=2)
    assert LoopConfig(batch_size=24, grad_accum=3).micro_batch(2) == 4


def test_step_randomness_depends_only_on_seed_step_rank_micro():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 5, 1, 0), draw(0, 5, 1, 0))
    for other in [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)]:
        assert not torch.equal(draw(0, 5, 1, 0), draw(*other))


def test_accumulation_groups_drop_an_incomplete_tail():
    groups = list(accumulation_groups(iter(range(7)), 3))
    assert groups == [[0, 1, 2], [3, 4, 5]]


# ------------------------------------------------------------------------------------------ EMA / optimizer
def test_ema_tracks_trainable_parameters_and_swaps():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    ema = EMA(model, decay=0.75)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(4.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["0.weight"], start + 1.0)  # 0.75 * w + 0.25 * (w + 4)
    with ema.swapped():
        torch.testing.assert_close(model[0].weight, start + 1.0)
    torch.testing.assert_close(model[0].weight, start + 4.0)


def test_weight_decay_only_on_matrices_and_embeddings():
    model = ARModel(ar_preset("tiny"))
    opt = make_optimizer(model, LoopConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_folder_roundtrip_and_loaders(tmp_path):
    torch.manual_seed(0)
    task = TokenizerTask(model=preset("tiny").to_dict())
    objective = task.build()
    model_sd = objective.model.state_dict()
    ema_sd = {k: v + 1 if v.is_floating_point() else v for k, v in model_sd.items()}
    opt = make_optimizer(objective, LoopConfig())
    objective(torch.rand(2, 3, 32, 32) * 2 - 1)["loss"].backward()
    opt.step()
    state = TrainState(step=7, epoch=2, batches_in_epoch=3)
    extra = {"projector.net.0.weight": torch.ones(2, 2)}
    task.save_model(model_sd, tmp_path / "model")
    task.save_model(ema_sd, tmp_path / "ema")
    save_extra(tmp_path, extra)
    save_train_state(tmp_path, opt.state_dict(), state)

    loaded = FlexTok.from_pretrained(tmp_path / "model")  # our save_pretrained format
    assert loaded.cfg == objective.model.cfg
    torch.testing.assert_close(loaded.state_dict(), model_sd)
    torch.testing.assert_close(FlexTok.from_pretrained(tmp_path / "ema").state_dict(), ema_sd)
    m, e, x, o, s = read_checkpoint(tmp_path)
    assert s == state and set(x) == set(extra)
    assert o["state"][0]["exp_avg"].shape == opt.state_dict()["state"][0]["exp_avg"].shape


def test_ar_task_saves_in_the_ar_format(tmp_path):
    torch.manual_seed(0)
    task = ARTask(model=ar_preset("tiny").to_dict())
    objective = task.build()
    task.save_model(objective.model.state_dict(), tmp_path)
    loaded = ARModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.state_dict(), objective.model.state_dict())


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_log_writes_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(str(tmp_path / "tb"))
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step})
    log.close()
    resumed = MetricsLog(str(tmp_path / "tb"), start_step=2)  # a crash after step 3, resumed from 2
    resumed.log(3, {"loss": 0.25})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "tb"))] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")][-1] == 3


def test_metrics_log_mirrors_to_a_remote_url():
    import fsspec

    log = MetricsLog("memory://runs/r1/tensorboard")
    log.log(1, {"loss": 2.0})
    log.close()
    fs = fsspec.filesystem("memory")
    assert fs.exists("/runs/r1/tensorboard/metrics.jsonl")
    assert any("tfevents" in p for p in fs.ls("/runs/r1/tensorboard", detail=False))
    assert read_metrics("memory://runs/r1/tensorboard")[0]["loss"] == 2.0


# ------------------------------------------------------------------------------------------ collation
def corpus_rows(tokens: list[list[int]], labels: list[int | None]) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([f"k{i}" for i in range(len(tokens))]),
            "label": pa.array(labels, pa.int32()),
            "tokens": pa.array(tokens, pa.list_(pa.uint16())),
        }
    )


def test_token_collate_pads_and_maps_null_labels():
    out = TokenCollate(null_class=10, max_tokens=4)(corpus_rows([[1, 2, 3], [4], [5, 6]], [3, None, 0]))
    assert out["tokens"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert out["lengths"].tolist() == [3, 1, 2]
    assert out["labels"].tolist() == [3, 10, 0]
    assert out["tokens"].dtype == torch.int64


def test_token_collate_rejects_labels_beyond_the_model():
    with pytest.raises(ValueError, match="'k1' has label 12"):
        TokenCollate(null_class=10, max_tokens=4)(corpus_rows([[1], [2]], [3, 12]))
    with pytest.raises(ValueError, match="max_tokens"):
        TokenCollate(null_class=10, max_tokens=2)(corpus_rows([[1, 2, 3]], [3]))


def test_token_collate_rejects_a_label_equal_to_the_class_count():
    """Label num_classes is the null (unconditional) class: a corpus row must not train it."""
    with pytest.raises(ValueError, match="'k1' has label 10"):
        TokenCollate(null_class=10, max_tokens=4)(corpus_rows([[1], [2]], [9, 10]))


def test_image_collate_scales_to_model_input():
    from ray.data.extensions import ArrowTensorArray

    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[1] = 255
    out = ImageCollate()(pa.table({"image": ArrowTensorArray.from_numpy(images)}))["images"]
    assert out.shape == (2, 3, 4, 4)
    assert out[0].eq(-1).all() and out[1].eq(1).all()


# ------------------------------------------------------------------------------------------ REPA
def test_repa_loss_is_zero_when_aligned_and_pools_the_teacher_grid():
    feats = torch.randn(2, 16, 8)  # teacher on a 4x4 grid
    pooled = to_grid(feats, 2)
    assert pooled.shape == (2, 4, 8)
    torch.testing.assert_close(pooled[:, 0], feats.view(2, 4, 4, 8)[:, :2, :2].mean(dim=(1, 2)))
    assert repa_loss(pooled, feats).item() == pytest.approx(0.0, abs=1e-6)
    assert repa_loss(-pooled, feats).item() == pytest.approx(2.0, abs=1e-6)


def test_random_conv_teacher_is_fixed_and_frozen():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = RandomConvTeacher(dim=16, seed=3), RandomConvTeacher(dim=16, seed=3)
    assert a(images).shape == (2, 64, 16)
    torch.testing.assert_close(a(images), b(images))
    assert not any(p.requires_grad for p in a.parameters())


def test_dinov2_teacher_loads_a_local_hub_checkout(tmp_path):
    (tmp_path / "hubconf.py").write_text(
        textwrap.dedent(
            """
            import torch
            class Tiny(torch.nn.Module):
                embed_dim = 8
                def __init__(self):
                    super().__init__()
                    self.proj = torch.nn.Conv2d(3, 8, 14, 14)
                def forward_features(self, x):
                    return {"x_norm_patchtokens": self.proj(x).flatten(2).transpose(1, 2)}
            def dinov2_vits14(pretrained=True):
                assert not pretrained
                return Tiny()
            """
        )
    )
    torch.manual_seed(0)
    weights = {"proj.weight": torch.randn(8, 3, 14, 14), "proj.bias": torch.zeros(8)}
    torch.save(weights, tmp_path / "w.pth")
    teacher = DINOv2Teacher(str(tmp_path), str(tmp_path / "w.pth"), "dinov2_vits14", input_size=28)
    assert teacher.dim == 8
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 8)
    torch.testing.assert_close(teacher.net.proj.weight, weights["proj.weight"])
    with pytest.raises(FileNotFoundError, match="hubconf"):
        DINOv2Teacher(str(tmp_path / "nowhere"), str(tmp_path / "w.pth"))


def test_dinov2_teacher_refuses_a_hubconf_outside_the_given_folder(tmp_path):
    """torch.hub.load(source="local") runs hubconf.py: one that resolves outside the checkout is refused."""
    (tmp_path / "elsewhere.py").write_text("raise SystemExit('must not run')\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "hubconf.py").symlink_to(tmp_path / "elsewhere.py")
    torch.save({}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="outside"):
        DINOv2Teacher(str(tmp_path / "repo"), str(tmp_path / "w.pth"))


def test_repa_gradients_reach_projector_and_decoder():
    torch.manual_seed(0)
    objective = TokenizerObjective(preset("tiny"), teacher_dim=16, repa_weight=1.0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = objective(images, RandomConvTeacher(dim=16)(images), torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "flow", "keep_k", "repa"}
    out["loss"].backward()
    assert objective.projector.net[0].weight.grad.abs().sum() > 0
    assert objective.model.decoder.blocks[1].adaLN.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out["loss"].detach(), out["flow"] + out["repa"])


def test_ar_objective_ignores_padding():
    torch.manual_seed(0)
    objective = ARObjective(ar_preset("tiny")).eval()
    tokens = torch.randint(0, 64000, (2, 8))
    lengths = torch.tensor([8, 3])
    padded = tokens.clone()
    padded[1, 3:] = 0
    a = objective(torch.tensor([1, 2]), tokens, lengths)["loss"]
    torch.testing.assert_close(a, objective(torch.tensor([1, 2]), padded, lengths)["loss"])


def test_projector_shapes():
    assert Projector(96, 32, hidden=64)(torch.zeros(2, 16, 96)).shape == (2, 16, 32)


# ------------------------------------------------------------------------------------------ job arguments
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--output", "x"], "--input is required"),
        (["--input", "d"], "--output is required"),
        (["--input", "d", "--output", "s3://bucket"], "folder for the run under the bucket"),
        (["--input", "d", "--output", "x", "--preset", "d12_d12"], "--vae-weights"),
        (["--input", "d", "--output", "x", "--preset", "huge"], "unknown preset"),
        (
            ["--input", "d", "--output", "x", "--batch-size", "30", "--workers", "4"],
            "multiple",
        ),
        (
            ["--input", "d", "--output", "x", "--repa-weight", "1", "--repa-layer", "9"],
            "repa-layer",
        ),
    ],
)
def test_tokenizer_job_argument_errors(argv, message, capsys):
    from jobs.common import run_main
    from jobs.train_tokenizer import main

    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_ar_job_argument_errors(tmp_path, capsys):
    from jobs.common import run_main
    from jobs.train_ar import main

    assert run_main(main, ["--output", "x"]) == 2
    assert "--corpus is required" in capsys.readouterr().err
    assert run_main(main, ["--corpus", str(tmp_path), "--output", "x"]) == 2
    assert "not a flextok corpus" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the loop, in-process
def test_loop_in_local_mode_checkpoints_model_ema_and_optimizer(ray_session, tmp_path):
    """Ray Train's local mode (num_workers=0) runs the loop in this process: accumulation, EMA distinct from
    the weights, metrics, and a checkpoint that loads."""
    import ray

    from pipeline.train.loop import Run, Scaling, run_training

    rows = corpus_rows([[i % 7, (i * 3) % 11, 5, 1] for i in range(64)], [i % 10 for i in range(64)])
    cfg = LoopConfig(steps=4, batch_size=8, grad_accum=2, lr=1e-2, checkpoint_every=2, log_every=1, ema_decay=0.5)
    task = ARTask(model=ar_preset("tiny", num_classes=10, max_tokens=4, vocab_size=16).to_dict())
    result = run_training(task, cfg, ray.data.from_arrow(rows), Scaling(workers=0), Run(str(tmp_path / "local")))
    assert result.error is None
    folder = Path(result.checkpoint.path)
    model, ema = ARModel.from_pretrained(folder / "model"), ARModel.from_pretrained(folder / "ema")
    assert not torch.equal(model.head.weight, ema.head.weight)
    _, _, _, optimizer_sd, state = read_checkpoint(folder)
    assert state.step == 4 and optimizer_sd["state"]
    metrics = read_metrics(str(tmp_path / "local" / "tensorboard"))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 for m in metrics)
