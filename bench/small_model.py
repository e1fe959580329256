"""How well a small FlexTok reconstructs photos it never saw, against block-mean thumbnails of the same photos.

    python bench/small_model.py                                  # models/flextok-small on its 50 held-out photos
    python bench/small_model.py --model runs/tokenizer-small/checkpoint_000010/ema --limit 16

For each k: mean PSNR and SSIM of the k-token reconstructions (uint8, as the sweep job scores them; the decoder
starts from the same noise for every k of a photo), and the bits the prefix holds (k x log2 64000). For each
thumbnail size n: the same metrics for the photo's n x n block means (8-bit colour, 24 bits a block), shown at
full size. A tokenizer worth its bits beats the thumbnail that holds as many bits.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flextok import FlexTok  # noqa: E402
from pipeline.data.preprocess import center_crop_adm, decode_image, to_model_input, to_rgb  # noqa: E402
from pipeline.image_metrics import pixel_metrics  # noqa: E402
from pipeline.inception import model_output_to_uint8  # noqa: E402


def load_photos(folder: Path, listing: Path, resolution: int, limit: int | None) -> np.ndarray:
    """The photos a CSV lists (column `file`), ADM center-cropped: uint8 [N, R, R, 3]."""
    with open(listing, newline="") as f:
        files = [row["file"] for row in csv.DictReader(f)][:limit]
    return np.stack([center_crop_adm(to_rgb(decode_image((folder / name).read_bytes())), resolution) for name in files])


def thumbnail(photos: np.ndarray, n: int) -> np.ndarray:
    """uint8 [N, R, R, 3] -> each photo's n x n block means (rounded to 8 bits), repeated to [N, R, R, 3]."""
    N, R = photos.shape[:2]
    blocks = photos.reshape(N, n, R // n, n, R // n, 3).astype(np.float64).mean(axis=(2, 4))  # [N, n, n, 3]
    small = np.clip(np.rint(blocks), 0, 255).astype(np.uint8)
    return small.repeat(R // n, axis=1).repeat(R // n, axis=2)


@torch.no_grad()
def reconstructions(model: FlexTok, photos: np.ndarray, ks: list[int], timesteps: int, seed: int) -> dict:
    """k -> uint8 [N, R, R, 3]; photo i starts from the same noise (seed + i) at every k."""
    tokens = model.tokenize(to_model_input(photos))  # [N, n_registers]
    C, h = model.cfg.vae.latent_channels, model.cfg.latent_size
    noise = torch.cat(
        [torch.randn(1, C, h, h, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(photos))]
    )
    out = {}
    for k in ks:
        images = model.detokenize(tokens[:, :k], timesteps=timesteps, noise=noise)  # [N, 3, R, R]
        out[k] = model_output_to_uint8(images).permute(0, 2, 3, 1).numpy()
    return out


def main() -> None:
    shared = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "flextok-small"))
    p.add_argument("--images", default=str(shared / "data" / "imagenet-sample"), help="photo folder")
    p.add_argument("--list", default=str(REPO / "models" / "flextok-small" / "heldout.csv"), help="CSV of photos")
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--timesteps", type=int, default=25, help="decoder steps (the library's default, 25)")
    p.add_argument("--limit", type=int, help="first N photos only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    model = FlexTok.from_pretrained(args.model).float().eval()
    photos = load_photos(Path(args.images), Path(args.list), model.cfg.image_size, args.limit)
    ks = [int(k) for k in args.ks.split(",")]
    start = time.perf_counter()
    recon = reconstructions(model, photos, ks, args.timesteps, args.seed)
    print(f"{args.model}: {len(photos)} photos at {model.cfg.image_size}px, {args.timesteps} decoder steps, guidance 1")
    print(f"(decoding took {time.perf_counter() - start:.0f} s)\n")
    print("| representation | bits | PSNR (dB) | SSIM |")
    print("|---|---:|---:|---:|")
    for k in ks:
        _, psnr, ssim = pixel_metrics(photos, recon[k])
        print(f"| FlexTok k={k} | {k * math.log2(64000):.0f} | {psnr.mean():.2f} | {ssim.mean():.3f} |")
    for n in (1, 2, 4, 8):
        _, psnr, ssim = pixel_metrics(photos, thumbnail(photos, n))
        print(f"| {n}x{n} thumbnail | {24 * n * n} | {psnr.mean():.2f} | {ssim.mean():.3f} |")


if __name__ == "__main__":
    main()
