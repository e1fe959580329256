"""One GPU check: every speed figure the project reports, measured by one script in one call (bench/gpu.sh).

    bash bench/gpu.sh                # one H200: a few minutes; a time guard skips rows after 330 s
    bash bench/gpu.sh --dry-run      # any machine, seconds: arguments, every row's imports and plan
    bash bench/gpu.sh --cpu-smoke    # the CPU: every row end to end at tiny sizes (batch 2, 1 step)

Rows, each independent (a failing row prints its error on one line and the next row runs):
    matmul       bf16 n x n x n matrix product (n = 8192): the TFLOP/s peak the MFU rows divide by
    tokenize     FlexTok.tokenize images/s, d12_d12 and d18_d28 (random weights), bf16 autocast, batch 64
    detokenize   FlexTok.detokenize images/s, same models, k = 256 tokens, 25 Euler steps, guidance 7.5 + APG
    ar_train     AR training tokens/s and MFU, d12 and d30, 256 tokens per sequence (pipeline.train.loop's step)
    inception    Inception (pipeline.inception) images/s: the network alone, and the pipeline's stage
    sweep        the reconstruction sweep's decode stage (pipeline.eval.sweep.ReconstructStage) reconstructions/s
    pretokenize  the pretokenize job (Ray Data) per-batch rate / a bare loop of the same actor's calls
    ray_train    TorchTrainer (1 worker) steps/s / a plain loop of the same train_step, tokenizer training

Timing: one warm-up call first, then CUDA events around each call (a host clock after synchronize on the CPU),
the median of the repeats. Results print as each row ends and as a table at the end; with $OUT set, the table
is also written to $OUT/gpu_bench.json and $OUT/gpu_bench.md after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flextok import FlexTok, FlexTokConfig, VAEConfig, preset  # noqa: E402
from flextok.config import tiny  # noqa: E402

H200_DATASHEET_BF16_TFLOPS = 989.0  # dense bf16, H100/H200 SXM datasheet: only a fallback when the matmul row fails
INCEPTION_FILE = "inception-2015-12-05-torch-fidelity.pth"
INCEPTION_FP16_FILE = "inception-2015-12-05-torch-fidelity-fp16.pth"  # written by bench/gpu_wheels.sh


# --------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """What every row measures. GPU: the figures asked for; SMOKE: the same code paths at tiny sizes."""

    device: str = "cuda"
    tokenizers: tuple[str, ...] = ("d12_d12", "d18_d28")
    batch: int = 64  # images per tokenize / detokenize call
    timesteps: int = 25  # decoder Euler steps (the release's setting)
    guidance: float = 7.5  # with APG: two decoder passes (conditional + unconditional) per step
    repeats: int = 3  # timed calls after the warm-up
    bf16: bool = True  # autocast for tokenize/detokenize (the CPU smoke runs float32: CPU bf16 is very slow)
    matmul_n: int = 8192
    ar_models: tuple[str, ...] = ("d12", "d30")
    ar_batch: int = 64  # sequences per step
    ar_tokens: int = 256  # tokens per sequence
    ar_steps: int = 10  # timed steps after the warm-up steps
    warmup_steps: int = 3
    sweep_model: str = "d12_d12"
    sweep_images: int = 16
    sweep_ks: tuple[int, ...] = (1, 16, 256)
    decode_batch: int = 16  # the sweep job's default --decode-batch
    inception_batch: int = 64  # the eval jobs' default --inception-batch-size
    pretok_images: int = 512
    pretok_batch: int = 64  # the pretokenize job's default --batch-size
    train_model: str = "d12_d12"
    train_batch: int = 32
    train_steps: int = 20


GPU = Sizes()
SMOKE = Sizes(
    device="cpu",
    tokenizers=("tiny", "tiny_kl"),
    batch=2,
    bf16=False,
    timesteps=1,
    repeats=1,
    matmul_n=256,
    ar_models=("tiny",),
    ar_batch=2,
    ar_tokens=32,
    ar_steps=1,
    warmup_steps=1,
    sweep_model="tiny",
    sweep_images=2,
    sweep_ks=(1, 32),
    decode_batch=2,
    inception_batch=2,
    pretok_images=8,
    pretok_batch=2,
    train_model="tiny",
    train_batch=2,
    train_steps=4,
)


# --------------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One figure. `value` None: not measured, and `how` says why."""

    name: str
    value: float | None
    unit: str
    how: str
    seconds: float = 0.0  # the row's wall time, set-up included


class TimeUpError(BaseException):
    """The hard limit was reached (SIGALRM or SIGTERM). A BaseException: the rows' own `except Exception` let it
    through to run_rows, which ends the run there."""


class TimeGuard:
    """A deadline for the whole run: rows check `left()` before starting, repeats before each call."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def not_measured(name: str, why: str, unit: str = "") -> Row:
    return Row(name, None, unit, f"not measured: {why}")


def one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text[:300]


# --------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(
    fn: Callable[[], object], device: str, repeats: int, guard: TimeGuard, warmup=None
) -> tuple[float, int]:
    """(median seconds, calls timed) of up to `repeats` calls of fn after one warm-up call (`warmup` if given,
    else fn); stops repeating early when the guard has less than two calls' time left (at least one is timed)."""
    (warmup or fn)()
    sync(device)
    times: list[float] = []
    for _ in range(repeats):
        if times and guard.left() < 2 * max(times):
            break
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


# --------------------------------------------------------------------------------------------- models
def tokenizer_config(name: str) -> FlexTokConfig:
    """A preset, or for the CPU smoke run `tiny` (pixel latents) and `tiny_kl` (a small AutoencoderKL of the
    release's block layout, 32 channels: the diffusers path at a CPU's cost)."""
    if name == "tiny":
        return tiny()
    if name == "tiny_kl":
        arch = {**preset("d12_d12").vae.arch, "block_out_channels": [32] * 4, "norm_num_groups": 8}
        arch |= {"layers_per_block": 1, "sample_size": 64}
        vae = VAEConfig(kind="kl", latent_channels=16, downsample=8, arch=arch)
        return dataclasses.replace(tiny(image_size=64, num_registers=32), vae=vae)
    return preset(name)


def has_diffusers() -> str | None:
    """None when diffusers' AutoencoderKL imports, else the one-line reason."""
    try:
        from diffusers import AutoencoderKL  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is the reason
        return one_line(e)
    return None


def pixel_stand_in(cfg: FlexTokConfig) -> FlexTokConfig:
    """The same encoder/decoder on the same latent grid with `pixel` latents (space-to-depth) instead of the
    AutoencoderKL: measures the transformers when diffusers is missing (the VAE's time is then not in it)."""
    d = cfg.vae.downsample
    return dataclasses.replace(
        cfg, vae=VAEConfig(kind="pixel", latent_channels=3 * d * d, downsample=d, scaling_factor=1.0, arch={})
    )


def usable_config(name: str) -> tuple[FlexTokConfig, str]:
    """(config, note): the preset, or its pixel stand-in with a note when the `kl` VAE cannot be built."""
    cfg = tokenizer_config(name)
    if cfg.vae.kind == "kl":
        why = has_diffusers()
        if why:
            return pixel_stand_in(cfg), f"; VAE REPLACED by pixel space-to-depth (no diffusers: {why})"
    return cfg, ""


def random_tokenizer(cfg: FlexTokConfig, device: str) -> FlexTok:
    """The release's init built on the device, plus N(0, 0.02) noise so that no layer is all zeros
    (adaLN-zero); speed does not depend on the values, but zeros can run faster than real data."""
    torch.manual_seed(0)
    with torch.device(device):
        model = FlexTok(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device).eval()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def photo_like_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: smooth random colour fields plus noise (photo-like enough for JPEG and metrics)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(size, size), mode="bicubic", align_corners=False
    )
    noisy = smooth.permute(0, 2, 3, 1).numpy() + rng.normal(0, 8, (n, size, size, 3))
    return noisy.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- rows
def row_matmul(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    n = s.matmul_n
    a, b = (torch.randn(n, n, device=s.device, dtype=torch.bfloat16) for _ in range(2))  # random: zeros run faster
    repeats = 20 if s.device == "cuda" else 2
    t, timed = seconds_per_call(lambda: a @ b, s.device, repeats, guard)
    tflops = 2 * n**3 / t / 1e12
    ctx["peak_tflops"] = tflops
    how = f"bf16 {n}x{n} @ {n}x{n}, random normal data, 2n^3 FLOP / median of {timed} calls after a warm-up"
    return [Row("matmul bf16 peak", tflops, "TFLOP/s", how)]


def precision(s: Sizes) -> str:
    return "bf16 autocast" if s.bf16 else "float32"


def row_tokenize(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    rows = []
    for name in s.tokenizers:
        t0 = time.perf_counter()
        try:
            cfg, note = usable_config(name)
            model = random_tokenizer(cfg, s.device)
            R = cfg.image_size
            images = torch.rand(s.batch, 3, R, R, device=s.device) * 2 - 1
            autocast = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.bf16)

            def call(model=model, images=images, autocast=autocast):
                with autocast:
                    return model.tokenize(images)

            t, timed = seconds_per_call(call, s.device, s.repeats, guard)
            how = f"FlexTok.tokenize, random weights, {precision(s)}, batch {s.batch} at {R}x{R}, median of "
            how += f"{timed} after a warm-up{note}"
            rows.append(Row(f"tokenize {name}", s.batch / t, "images/s", how, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - one preset failing leaves the other
            rows.append(Row(f"tokenize {name}", None, "images/s", f"error: {one_line(e)}", time.perf_counter() - t0))
        finally:
            model = images = call = None
            free_memory()
    return rows


def row_detokenize(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    rows = []
    for name in s.tokenizers:
        t0 = time.perf_counter()
        try:
            if guard.left() < 30 and s.device == "cuda":
                rows.append(not_measured(f"detokenize {name}", f"time guard ({guard.left():.0f} s left)", "images/s"))
                continue
            cfg, note = usable_config(name)
            model = random_tokenizer(cfg, s.device)
            n = cfg.num_registers
            tokens = torch.randint(0, model.codebook_size, (s.batch, n), device=s.device)
            noise = torch.randn(s.batch, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size, device=s.device)
            autocast = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.bf16)

            def call(steps, model=model, tokens=tokens, noise=noise, autocast=autocast):
                with autocast:
                    return model.detokenize(tokens, steps, s.guidance, apg=True, noise=noise)

            # warm-up with 2 steps: the same kernels and shapes, a fraction of the time
            t, timed = seconds_per_call(partial(call, s.timesteps), s.device, s.repeats, guard, partial(call, 2))
            how = f"FlexTok.detokenize, k = {n} tokens, {s.timesteps} Euler steps, guidance {s.guidance} with APG "
            how += f"(2 decoder passes per step: decoder batch {2 * s.batch}) + VAE decode, random weights, "
            how += f"{precision(s)}, batch {s.batch} at {cfg.image_size}x{cfg.image_size}, median of {timed}{note}"
            rows.append(Row(f"detokenize {name}", s.batch / t, "images/s", how, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            rows.append(Row(f"detokenize {name}", None, "images/s", f"error: {one_line(e)}", time.perf_counter() - t0))
        finally:
            model = tokens = noise = call = None
            free_memory()
    return rows


def ar_flops_per_token(cfg) -> tuple[float, int]:
    """(training FLOPs per token, N): 6 N + 12 L D T, with N the parameters that multiply each token (the
    blocks and the output head; embedding lookups are free) and T the sequence's positions (attention scores
    and values over the full T, forward + backward, the PaLM convention: not halved for the causal mask)."""
    from flextok.ar import ARModel

    with torch.device("meta"):
        model = ARModel(cfg)
    N = model.num_params() + model.head.weight.numel()
    return 6 * N + 12 * cfg.depth * cfg.dim * cfg.max_tokens, N


class _ARObjective(torch.nn.Module):
    """pipeline.train.ar.ARObjective without its Ray import: `.model` and forward -> {"loss"}."""

    def __init__(self, cfg):
        super().__init__()
        from flextok.ar import ARModel

        self.model = ARModel(cfg)

    def forward(self, labels, tokens, lengths, generator=None):
        return {"loss": self.model.loss(labels, tokens, lengths, generator=generator)}


def train_steps_per_s(task, batches: list[dict], cfg, device: str, warmup: int, steps: int, guard) -> float:
    """Steps/s of pipeline.train.loop.train_step (autocast, AdamW, clip, EMA) in one process, after `warmup`."""
    from pipeline.train.common import EMA, make_optimizer
    from pipeline.train.loop import MODEL_PREFIX, train_step

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device == "cuda"  # as train_loop_per_worker sets it
    try:
        torch.manual_seed(cfg.seed)
        with torch.device(device):  # initialised on the device: a d30 takes long on the CPU
            model = task.build()
        optimizer = make_optimizer(model, cfg)
        ema = EMA(model, cfg.ema_decay, prefix=MODEL_PREFIX)
        dev = torch.device(device)
        timed = 0
        for step in range(warmup + steps):
            if step == warmup:
                sync(device)
                start = time.perf_counter()
            elif step > warmup and guard.left() < 5:
                break
            train_step(model, optimizer, ema, task, [batches[step % len(batches)]], step, 0, dev, cfg)
            timed += step >= warmup
        sync(device)
        return timed / (time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # later rows run as their stages do


def ar_steps_per_s(task, batch: int, length: int, s: Sizes, guard: TimeGuard) -> float:
    """train_step rate on two alternating random batches of `batch` sequences of `length` tokens."""
    from pipeline.train.common import LoopConfig

    cfg = task.cfg
    g = torch.Generator().manual_seed(0)
    B, T = batch, length
    batches = [
        {
            "labels": torch.randint(0, cfg.num_classes, (B,), generator=g),
            "tokens": torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            "lengths": torch.full((B,), T),
        }
        for _ in range(2)
    ]
    loop = LoopConfig(steps=10**6, batch_size=B, lr=1e-4, precision="bf16")
    return train_steps_per_s(task, batches, loop, s.device, s.warmup_steps, s.ar_steps, guard)


def row_ar_train(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    from flextok.ar import ar_preset
    from pipeline.train.loop import TrainTask

    class ARBenchTask(TrainTask):
        unit = "tokens"

        def __init__(self, cfg):
            self.cfg = cfg

        def build(self):
            return _ARObjective(self.cfg)

        def new_model(self):
            return self.build().model

        def batches(self, shard, epoch, micro_batch, cfg):
            raise NotImplementedError

        def units(self, batch):
            return int(batch["lengths"].sum())

    rows = []
    peak = ctx.get("peak_tflops")
    peak_note = f"measured matmul peak {peak:.0f} TFLOP/s" if peak else f"datasheet {H200_DATASHEET_BF16_TFLOPS:.0f}"
    peak = peak or H200_DATASHEET_BF16_TFLOPS
    for name in s.ar_models:
        t0 = time.perf_counter()
        try:
            cfg = ar_preset(name, max_tokens=s.ar_tokens)
            flops_per_token, N = ar_flops_per_token(cfg)
            T, B, note = s.ar_tokens, s.ar_batch, ""
            while True:  # out of memory: half the batch, said in the row
                try:
                    rate = ar_steps_per_s(ARBenchTask(cfg), B, T, s, guard)
                    break
                except torch.OutOfMemoryError:
                    if B == 1:
                        raise
                B, note = B // 2, f" (batch {s.ar_batch} ran out of memory)"
                free_memory()  # here, not in the except block: its traceback still holds the model
            tokens_per_s = rate * B * T
            mfu = tokens_per_s * flops_per_token / (peak * 1e12)
            amp = "bf16 autocast" if s.device == "cuda" else "float32"
            how = f"train_step ({amp}, AdamW, clip, EMA), batch {B} x {T} tokens, {s.ar_steps} steps after "
            how += f"{s.warmup_steps}; N = {N / 1e6:.0f}M (blocks + head){note}"
            seconds = time.perf_counter() - t0
            rows.append(Row(f"AR train {name} tokens/s", tokens_per_s, "tokens/s", how, seconds))
            how = f"tokens/s x (6N + 12 L D T) = {flops_per_token / 1e9:.2f} GFLOP/token (L={cfg.depth}, "
            how += f"D={cfg.dim}, T={T}) / {peak_note}"
            rows.append(Row(f"AR train {name} MFU", 100 * mfu, "%", how, seconds))
        except Exception as e:  # noqa: BLE001
            rows.append(Row(f"AR train {name}", None, "tokens/s", f"error: {one_line(e)}", time.perf_counter() - t0))
        finally:
            free_memory()
    return rows


def inception_weights(path: str | None) -> tuple[str | None, str]:
    """(weights file, note): --inception-weights, else the converted file in the cache, else its float16 copy
    (bench/gpu_wheels.sh writes one that fits the device call's 64 MiB), else None (random weights)."""
    from pipeline.inception import default_cache_dir

    if path:
        return path, f"weights {path}"
    for candidate, note in (
        (default_cache_dir() / INCEPTION_FILE, "the converted weights"),
        (REPO / ".cache" / "inception" / INCEPTION_FILE, "the converted weights"),
        (REPO / ".cache" / "inception-fp16" / INCEPTION_FP16_FILE, "the converted weights stored as float16"),
    ):
        if candidate.is_file():
            return str(candidate), note
    return None, "RANDOM weights (no converted file here; speed does not depend on the values)"


def random_inception_file(folder: str) -> str:
    """A torch-fidelity state dict of the network's own random init (classifier marked absent, as converted)."""
    from pipeline.inception import _Network

    state = _Network(["2048"]).state_dict()
    state["fc.weight"].fill_(float("nan"))
    state["fc.bias"].fill_(float("nan"))
    path = os.path.join(folder, "random-inception.pth")
    torch.save(state, path)
    return path


def row_inception(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    from pipeline.eval.features import InceptionStage

    path, note = inception_weights(ctx.get("inception_weights"))
    with tempfile.TemporaryDirectory() as tmp:
        stage = InceptionStage(path or random_inception_file(tmp), device=s.device)
    B, R = s.inception_batch, 256
    images = photo_like_images(B, R)
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(s.device)
    network = torch.no_grad()(stage.net.net)  # as Inception.forward calls it
    t_net, timed = seconds_per_call(lambda: network(on_device), s.device, 3 * s.repeats, guard)
    keys = np.array([f"{i}" for i in range(B)], dtype=object)
    t_stage, _ = seconds_per_call(lambda: stage({"key": keys, "image": images}), s.device, 3 * s.repeats, guard)
    how = f"inception-v3-compat, {note}, float32 (cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}), "
    how += f"batch {B} uint8 {R}x{R} (resized to 299 inside), median of {timed}"
    return [
        Row("Inception network", B / t_net, "images/s", f"{how}: the network on device tensors"),
        Row("Inception stage", B / t_stage, "images/s", f"{how}: InceptionStage, numpy in -> features out"),
    ]


def saved_tokenizer(name: str, folder: str, device: str) -> tuple[FlexTokConfig, str]:
    """A random tokenizer (as the rows build it) saved to `folder`: for the stages that load a checkpoint."""
    cfg, note = usable_config(name)
    model = random_tokenizer(cfg, device)
    model.save_pretrained(folder)
    del model
    free_memory()
    return cfg, note


def row_sweep(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    from pipeline.eval.sweep import ReconstructStage

    with tempfile.TemporaryDirectory() as tmp:
        _, note = saved_tokenizer(s.sweep_model, f"{tmp}/model", s.device)
        settings = {"timesteps": s.timesteps, "guidance_scale": s.guidance, "apg": True, "decode_batch": s.decode_batch}
        stage = ReconstructStage(f"{tmp}/model", s.sweep_ks, settings, [], False, device=s.device)
        warm = ReconstructStage.__new__(ReconstructStage)  # the same model with 1 step: a cheap warm-up
        warm.__dict__.update(stage.__dict__, s=dataclasses.replace(stage.s, timesteps=1))
    R = stage.model.cfg.image_size
    images = photo_like_images(s.sweep_images, R)
    batch = {"key": np.array([f"img{i}" for i in range(len(images))], dtype=object), "image": images}
    t, timed = seconds_per_call(
        lambda: stage(dict(batch)), s.device, max(1, s.repeats - 1), guard, lambda: warm(dict(batch))
    )
    n = len(images) * len(s.sweep_ks)
    how = f"ReconstructStage as the sweep job runs it (float32, no autocast): {s.sweep_model} random weights, "
    how += f"{len(images)} images x k in {list(s.sweep_ks)}, {s.timesteps} steps, guidance {s.guidance} + APG, "
    how += f"decode batch {s.decode_batch}, one encode per image, pixel metrics; median of {timed} after a 1-step "
    how += f"warm-up{note}"
    return [
        Row("sweep decode", n / t, "recon/s", how),
        Row("sweep decode, input images", len(images) / t, "images/s", "the same calls per input image"),
    ]


def ray_missing() -> str | None:
    try:
        importlib.import_module("ray")
    except ImportError:
        return "ray is not installed here"
    return None


def row_pretokenize(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    why = ray_missing()
    if why:
        return [not_measured("pretokenize job / bare loop", why, "ratio")]
    import ray
    from PIL import Image

    from pipeline.data.pretokenize import PretokenizeConfig, TokenizeActor

    sys.path.insert(0, str(REPO / "bench"))
    from pretokenize import job_rates, write_shards  # bench/pretokenize.py: the job with a timed actor

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = str(work / "model")
        cfg, note = saved_tokenizer(s.tokenizers[0], model_dir, s.device)
        R = cfg.image_size
        files = []
        (work / "jpeg").mkdir()
        for i, image in enumerate(photo_like_images(s.pretok_images, R + R // 4)):
            files.append(work / "jpeg" / f"img{i:05d}.JPEG")
            Image.fromarray(image).save(files[-1], quality=90)
        # bare loop: the job's own actor class called in this process on pre-decoded, pre-cropped batches
        from pipeline.data.preprocess import center_crop_adm, decode_image

        crops = np.stack([center_crop_adm(decode_image(f.read_bytes()), R) for f in files])  # [N, R, R, 3]
        actor = TokenizeActor(model_dir, R, cfg.num_registers, s.device == "cuda", None)
        batches = [crops[i : i + s.pretok_batch] for i in range(0, len(crops), s.pretok_batch)]
        actor.tokenize(batches[0])
        bare = []
        for x in batches[1:] or batches:
            t0 = time.perf_counter()
            actor.tokenize(x)  # returns numpy: the device work is finished
            bare.append(len(x) / (time.perf_counter() - t0))
        del actor
        free_memory()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            cfg = PretokenizeConfig(
                model=model_dir,
                inputs=[str(p) for p in write_shards(files, work / "shards", len(files))],
                output=str(work / "out"),
                batch_size=s.pretok_batch,
                concurrency=1,
            )
            job, steady, end_to_end = job_rates(cfg, work / "calls.txt")
        finally:
            ray.shutdown()
    ratio = statistics.median(job) / statistics.median(bare)
    how = f"{s.tokenizers[0]} float32 (as the actor runs it), {s.pretok_images} JPEGs {R + R // 4}px, batch "
    how += f"{s.pretok_batch}, 1 actor; job per batch (actor end to end) median {statistics.median(job):.1f} img/s "
    how += f"vs bare TokenizeActor.tokenize median {statistics.median(bare):.1f} img/s; first batch left out{note}"
    return [
        Row("pretokenize job / bare loop", ratio, "ratio", how),
        Row("pretokenize job, steady", steady, "images/s", "first batch's end -> last tokens at the driver"),
        Row("pretokenize job, end to end", end_to_end, "images/s", "with Ray Data start-up and model loading"),
    ]


def row_ray_train(s: Sizes, guard: TimeGuard, ctx: dict) -> list[Row]:
    why = ray_missing()
    if why:
        return [not_measured("Ray Train / plain loop", why, "ratio")]
    import ray

    from pipeline.data.preprocess import to_model_input
    from pipeline.train.common import LoopConfig, read_metrics
    from pipeline.train.loop import Run, Scaling, run_training
    from pipeline.train.tokenizer import TokenizerTask

    cfg, note = usable_config(s.train_model)
    R, B = cfg.image_size, s.train_batch
    images = photo_like_images(4 * B, R)
    task = TokenizerTask(model=cfg.to_dict(), hflip=False)
    log_every = max(1, s.train_steps // 4)
    loop = LoopConfig(
        steps=s.train_steps, batch_size=B, lr=1e-4, log_every=log_every, checkpoint_every=10**9, shuffle_buffer=0
    )
    batches = [{"images": to_model_input(images[i : i + B])} for i in range(0, len(images), B)]
    plain = train_steps_per_s(task, batches, loop, s.device, s.warmup_steps, s.train_steps, guard)
    free_memory()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.from_numpy(images).rename_columns({"data": "image"}).materialize()
        with tempfile.TemporaryDirectory() as tmp:
            use_gpu = s.device == "cuda"
            result = run_training(
                task, loop, dataset, Scaling(1, float(use_gpu), 1.0), Run(os.path.join(tmp, "bench"), max_failures=0)
            )
            if result.error:
                raise result.error
            windows = read_metrics(os.path.join(tmp, "bench", "tensorboard"))[1:]
    finally:
        ray.shutdown()
    trainer = float(np.mean([w["steps_per_s"] for w in windows]))
    how = f"tokenizer {s.train_model} training, batch {B} at {R}x{R}, {s.train_steps} steps; TorchTrainer 1 worker "
    how += f"{trainer:.2f} steps/s (metrics windows of {log_every} steps, first left out) vs the same train_step in "
    how += f"one process {plain:.2f} steps/s (after {s.warmup_steps} warm-up steps){note}"
    return [Row("Ray Train / plain loop", trainer / plain, "ratio", how)]


ROWS: dict[str, Callable[[Sizes, TimeGuard, dict], list[Row]]] = {
    "matmul": row_matmul,
    "tokenize": row_tokenize,
    "detokenize": row_detokenize,
    "ar_train": row_ar_train,
    "inception": row_inception,
    "sweep": row_sweep,
    "pretokenize": row_pretokenize,
    "ray_train": row_ray_train,
}
# modules each row imports (the dry run checks them); "ray" rows report "not measured" without it
ROW_IMPORTS = {
    "matmul": [],
    "tokenize": ["flextok"],
    "detokenize": ["flextok", "flextok.sampling"],
    "ar_train": ["flextok.ar", "pipeline.train.common", "pipeline.train.loop"],
    "inception": ["pipeline.inception", "pipeline.eval.features"],
    "sweep": ["pipeline.eval.sweep"],
    "pretokenize": ["pipeline.data.pretokenize", "pipeline.data.preprocess", "ray"],
    "ray_train": ["pipeline.train.tokenizer", "pipeline.train.loop", "ray"],
}


# --------------------------------------------------------------------------------------------- running
def run_rows(
    names: list[str], s: Sizes, guard: TimeGuard, ctx: dict, emit: Callable[[list[Row]], None], done=None
) -> list[Row]:
    """Run each row in order, appending to `done`; an error or the time guard ends that row only (one line)."""
    done = [] if done is None else done
    for name in names:
        t0 = time.perf_counter()
        if guard.left() <= 0:
            rows = [not_measured(name, "skipped by the time guard (budget spent)")]
        else:
            try:
                rows = ROWS[name](s, guard, ctx)
            except TimeUpError:
                rows = [not_measured(name, "stopped by the time guard's hard limit")]
                guard.deadline = time.monotonic()  # nothing after this one
            except Exception as e:  # noqa: BLE001 - one row's failure must not end the run
                traceback.print_exc(limit=3)
                rows = [Row(name, None, "", f"error: {one_line(e)}")]
            free_memory()
        for row in rows:
            row.seconds = row.seconds or time.perf_counter() - t0
        done.extend(rows)
        emit(done)
    return done


def format_value(row: Row) -> str:
    if row.value is None:
        return "-"
    return f"{row.value:.3g}" if abs(row.value) < 100 else f"{row.value:,.0f}"


def table_markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| row | value | unit | s | how |", "|---|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {format_value(r)} | {r.unit} | {r.seconds:.0f} | {r.how} |")
    return "\n".join(lines) + "\n"


def environment(s: Sizes) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    env["python"] = sys.version.split()[0]
    if s.device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    for package in ("diffusers", "torch_fidelity", "ray"):
        try:
            env[package] = importlib.import_module(package).__version__
        except Exception:  # noqa: BLE001
            env[package] = "missing"
    return env


def writer(out: str | None, header: str, env: dict) -> Callable[[list[Row]], None]:
    """Print each new row as it lands; with `out`, rewrite gpu_bench.json/.md there (partial results survive)."""
    printed = [0]

    def emit(rows: list[Row]) -> None:
        for r in rows[printed[0] :]:
            print(f"[row] {r.name}: {format_value(r)} {r.unit} ({r.seconds:.0f} s) - {r.how}", flush=True)
        printed[0] = len(rows)
        if out:
            os.makedirs(out, exist_ok=True)
            Path(out, "gpu_bench.json").write_text(
                json.dumps({"env": env, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n"
            )
            Path(out, "gpu_bench.md").write_text(table_markdown(rows, header))

    return emit


def dry_run(names: list[str], s: Sizes) -> int:
    """Check, without running anything heavy: every row's imports exist (ray may be absent: those rows then
    say so), every model config the rows build is valid, and sizes fit together. Returns the exit status."""
    from flextok.ar import ar_preset
    from pipeline.eval.sweep import check_ks

    problems = []
    for name in names:
        missing = []
        for module in ROW_IMPORTS[name]:
            try:
                importlib.import_module(module)
            except ImportError as e:
                missing.append(f"{module} ({one_line(e)})")
        ray_only = missing and all(m.startswith("ray ") for m in missing)
        status = "ok" if not missing else ("will print 'not measured'" if ray_only else "MISSING " + ", ".join(missing))
        if missing and not ray_only:
            problems.append(name)
        print(f"[dry-run] row {name:12s} imports {ROW_IMPORTS[name]}: {status}")
    try:
        for name in {*s.tokenizers, s.sweep_model, s.train_model}:
            cfg = tokenizer_config(name)
            FlexTokConfig.from_dict(cfg.to_dict())
            print(f"[dry-run] tokenizer {name}: {cfg.image_size}px, {cfg.num_registers} registers, vae {cfg.vae.kind}")
        check_ks(list(s.sweep_ks), tokenizer_config(s.sweep_model).num_registers)
        for name in s.ar_models:
            flops, N = ar_flops_per_token(ar_preset(name, max_tokens=s.ar_tokens))
            print(f"[dry-run] AR {name}: N = {N / 1e6:.1f}M, {flops / 1e9:.3f} GFLOP per training token")
        if s.sweep_images < 1 or s.batch < 1 or s.pretok_images < 2 * s.pretok_batch:
            raise ValueError("sizes: need >= 1 image and at least two pretokenize batches")
    except Exception as e:  # noqa: BLE001
        problems.append(f"plan: {one_line(e)}")
    why = has_diffusers()
    print(f"[dry-run] diffusers: {'ok' if why is None else 'missing, kl presets use a pixel stand-in: ' + why}")
    print(f"[dry-run] inception weights: {inception_weights(None)[1]}")
    print(f"[dry-run] {'OK' if not problems else 'PROBLEMS: ' + '; '.join(problems)}")
    return 1 if problems else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="check imports and plans only (seconds, any machine)")
    mode.add_argument("--cpu-smoke", action="store_true", help="every row on the CPU at tiny sizes")
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows, of: {','.join(ROWS)}")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all rows; later rows are skipped")
    p.add_argument("--inception-weights", help="converted Inception weights (default: the cache, else random)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_bench.json/.md (default: $OUT)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows are {','.join(ROWS)}")
    args.rows = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = SMOKE if args.cpu_smoke else GPU
    if args.dry_run:
        return dry_run(args.rows, s)
    if s.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke on a CPU machine, or --dry-run", file=sys.stderr)
        return 2
    guard = TimeGuard(args.budget)

    def hard_stop(signum, frame):  # SIGALRM after the budget + 45 s, or timeout's SIGTERM
        raise TimeUpError

    handlers = {sig: signal.signal(sig, hard_stop) for sig in (signal.SIGALRM, signal.SIGTERM)}
    signal.alarm(int(args.budget) + 45)
    rows: list[Row] = []
    header = ""
    try:
        env = environment(s)
        header = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"[env] {header}", flush=True)
        ctx = {"inception_weights": args.inception_weights}
        run_rows(args.rows, s, guard, ctx, writer(args.out, header, env), rows)
    except TimeUpError:
        print("[gpu.py] the hard limit stopped the run between rows", flush=True)
    finally:  # leave the process as found (tests call main in-process)
        signal.alarm(0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("\n" + table_markdown(rows, f"## bench/gpu.py ({'cpu smoke' if args.cpu_smoke else 'gpu'})  {header}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
