"""Train a FlexTok tokenizer on Ray Train (DDP or FSDP workers), images streamed through Ray Data.

    python jobs/train_tokenizer.py --config configs/train_tokenizer_tiny.yaml
    python jobs/train_tokenizer.py --config configs/train_tokenizer_d18_d28.yaml --workers 64 \\
        --output s3://bucket/runs/tok-a
    (run the same command again to resume a stopped or failed run from its latest checkpoint)

Inputs are read exactly as the pretokenize job reads them (pipeline.data.sources: .tar shards, .parquet,
image folders; ADM center crop). Checkpoints: OUTPUT/checkpoint_<step>/{model,ema} load with
`FlexTok.from_pretrained`. Details: docs/training.md.
"""

from __future__ import annotations

import argparse

from jobs.common import fail, parse_args, run_main
from jobs.training import add_training_args, check_required, finish, loop_config, resource_plan, scaling_and_run

__all__ = ["build_parser", "main", "resource_plan"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_tokenizer", description="Train a FlexTok tokenizer on Ray Train.")
    data = p.add_argument_group("data")
    data.add_argument("--input", nargs="+", help="image inputs: .tar shards, .parquet files, folders (required)")
    data.add_argument("--labels", help="labels CSV for folder inputs (not needed for training)")
    data.add_argument("--materialize", action="store_true", help="keep decoded images in memory (small data)")
    data.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")

    model = p.add_argument_group("model")
    model.add_argument("--preset", default="tiny", help="flextok preset: tiny | d12_d12 | d18_d18 | d18_d28")
    model.add_argument("--image-size", type=int, help="image size (default: the preset's)")
    model.add_argument("--num-registers", type=int, help="tokens per image (default: the preset's)")
    model.add_argument("--patch-size", type=int, help="encoder and decoder patch size on the latent grid")
    model.add_argument("--encoder-dim", type=int, help="encoder width (default: the preset's)")
    model.add_argument("--encoder-depth", type=int, help="encoder blocks (default: the preset's)")
    model.add_argument("--decoder-dim", type=int, help="decoder width (default: the preset's)")
    model.add_argument("--decoder-depth", type=int, help="decoder blocks (default: the preset's)")
    model.add_argument("--nested-dropout", choices=["uniform", "pow2"], help="how k is drawn (preset's: uniform)")
    model.add_argument("--null-cond-prob", type=float, help="null-condition probability for CFG (preset's: 0.1)")
    model.add_argument("--init", help="start from this FlexTok checkpoint (ours or official); sets the model")
    model.add_argument("--vae-weights", help="AutoencoderKL weights (folder or .safetensors) for kl presets")

    repa = p.add_argument_group("REPA")
    repa.add_argument("--repa-weight", type=float, default=0.0, help="weight of the REPA loss (0: off)")
    repa.add_argument("--repa-hidden", type=int, default=2048, help="projector MLP width (2048)")
    repa.add_argument("--repa-layer", type=int, help="decoder block whose output is aligned (preset's)")
    repa.add_argument("--repa-teacher", choices=["random-conv", "dinov2"], default="random-conv", help="teacher")
    repa.add_argument("--repa-teacher-dim", type=int, default=64, help="random-conv: feature width (64)")
    repa.add_argument("--repa-teacher-repo", help="dinov2: local torch.hub checkout; RUNS its hubconf.py: trust it")
    repa.add_argument("--repa-teacher-weights", help="dinov2: local weights file")
    repa.add_argument("--repa-teacher-model", default="dinov2_vitl14", help="dinov2: hub entry point")
    add_training_args(p)
    return p


def model_config(args: argparse.Namespace):
    import torch

    from flextok import FlexTok, preset

    if args.init:
        cfg = FlexTok.from_pretrained(args.init).cfg
    else:
        try:
            cfg = preset(args.preset)
        except ValueError as e:
            fail(str(e))
    if args.image_size:
        cfg.image_size = args.image_size
    if args.num_registers:
        cfg.encoder.num_registers = args.num_registers
    if args.patch_size:
        cfg.encoder.patch_size = cfg.decoder.patch_size = args.patch_size
    for part in ("encoder", "decoder"):
        for field in ("dim", "depth"):
            value = getattr(args, f"{part}_{field}")
            if value:
                setattr(getattr(cfg, part), field, value)
    if args.nested_dropout:
        cfg.decoder.nested_dropout_mode = args.nested_dropout
    if args.null_cond_prob is not None:
        cfg.decoder.null_cond_prob = args.null_cond_prob
    if args.repa_layer is not None:
        cfg.decoder.repa_layer = args.repa_layer
    if cfg.vae.kind == "kl" and not (args.vae_weights or args.init):
        fail(f"preset '{args.preset}' uses a KL VAE: give --vae-weights (or --init), or use pixel latents (tiny)")
    if args.repa_weight > 0 and (cfg.decoder.repa_layer is None or cfg.decoder.repa_layer >= cfg.decoder.depth):
        fail(f"--repa-weight needs --repa-layer in 0..{cfg.decoder.depth - 1}")
    shape_flags = ("image_size", "num_registers", "patch_size", "encoder_dim", "encoder_depth", "decoder_dim")
    if args.init and any(getattr(args, f) for f in (*shape_flags, "decoder_depth")):
        fail("--init fixes the model's shape; drop --image-size, --num-registers, --patch-size, --*-dim, --*-depth")
    try:
        with torch.device("meta"):
            FlexTok(cfg)  # shape errors now, not on the workers
    except (ValueError, AssertionError) as e:
        fail(f"model config: {e}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    check_required(args, "input", "output")
    cfg = model_config(args)
    loop = loop_config(args)

    from pipeline.data.sources import InputError, image_dataset
    from pipeline.train.loop import run_training
    from pipeline.train.repa import TeacherSpec
    from pipeline.train.tokenizer import TokenizerTask, training_images

    teacher = TeacherSpec(
        kind=args.repa_teacher,
        repo=args.repa_teacher_repo,
        weights=args.repa_teacher_weights,
        model=args.repa_teacher_model,
        dim=args.repa_teacher_dim,
    )
    if args.repa_weight > 0 and teacher.kind == "dinov2" and not (teacher.repo and teacher.weights):
        fail("--repa-teacher dinov2 needs --repa-teacher-repo and --repa-teacher-weights (local files)")
    task = TokenizerTask(
        model=cfg.to_dict(),
        hflip=not args.no_hflip,
        repa_weight=args.repa_weight,
        repa_hidden=args.repa_hidden,
        teacher=teacher,
        vae_weights=args.vae_weights,
        init=args.init,
    )
    scaling, run = scaling_and_run(args)  # starts or joins Ray: after every check of the arguments
    try:
        images = image_dataset(list(args.input), resolution=cfg.image_size, labels=args.labels)
    except InputError as e:
        fail(str(e))
    print(
        f"training tokenizer '{args.preset}' ({cfg.image_size}px, {cfg.num_registers} registers, "
        f"{cfg.vae.kind} latents) for {loop.steps} steps on {scaling.workers} worker(s) -> "
        f"{args.output}",
        flush=True,
    )
    result = run_training(task, loop, training_images(images, args.materialize), scaling, run)
    return finish(result, args.export, "FlexTok.from_pretrained")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
