"""Image preprocessing as the paper evaluates: decode -> RGB -> ADM center crop -> [-1, 1] tensors.

    img = decode_image(data)                   # PIL RGB, EXIF orientation applied; ImageDecodeError on bad input
    arr = center_crop_adm(img, 256)            # uint8 [256, 256, 3] (guided-diffusion's center_crop_arr)
    x = to_model_input(np.stack([arr]))        # float [1, 3, 256, 256] in [-1, 1]

Augmentation copies for AR training are numbered (the corpus's `aug` column):
    0      the ADM center crop (no augmentation)
    1      its horizontal flip
    2..6   ten-crop: top-left, top-right, bottom-left, bottom-right, center crops of size R taken from
           the ADM center crop at int(1.1 * R) (as LlamaGen's `--ten-crop`)
    7..11  the horizontal flips of 2..6
`AUGMENT_MODES` names the sets a job can ask for; "random-flip" keeps one of {0, 1} per image, chosen by a
hash of the image's key (so reruns make the same choice).
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEN_CROP_SCALE = 1.1
AUGMENT_MODES: dict[str, tuple[int, ...]] = {
    "none": (0,),
    "random-flip": (0, 1),  # one of the two per image
    "flip": (0, 1),
    "tencrop": tuple(range(2, 12)),
}
PREPROCESSING = "rgb(exif-transpose, alpha over white, 16-bit /257) -> adm-center-crop(box halving, bicubic)"


class ImageDecodeError(ValueError):
    """The bytes are not a usable image: empty, corrupt, truncated or unsupported."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Image file bytes -> an RGB PIL image with EXIF orientation applied.

    Raises ImageDecodeError (or ImageTooLargeError above `max_pixels`, default PIL's MAX_IMAGE_PIXELS) with a reason."""
    if not data:
        raise ImageDecodeError("empty image data")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if limit and w * h > limit:
            raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {limit}")
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited over white; 16/32-bit integer gray is scaled by 1/257."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)  # [H, W] in 0..65535 (16-bit gray)
        gray = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F


def center_crop_adm(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM (guided-diffusion) center crop: BOX-halve while the short side >= 2R, BICUBIC-resize the short
    side to R, crop the center. RGB PIL image -> uint8 [R, R, 3]."""
    img = to_rgb(img)
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)  # [H, W, 3]
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])


def ten_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """[H, W, 3] -> five [size, size, 3] crops: top-left, top-right, bottom-left, bottom-right, center
    (torchvision's five_crop positions)."""
    H, W = arr.shape[:2]
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    corners = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), (top, left)]
    return [np.ascontiguousarray(arr[y : y + size, x : x + size]) for y, x in corners]


def random_flip_choice(key: str) -> int:
    """The augmentation id (0 or 1) that "random-flip" keeps for this key: a fair, reproducible coin."""
    return hashlib.sha256(key.encode()).digest()[0] & 1


def augment_ids(mode: str, key: str) -> tuple[int, ...]:
    """The augmentation ids one image gets under an augment mode."""
    if mode not in AUGMENT_MODES:
        raise ValueError(f"unknown augment mode '{mode}'; choose one of {sorted(AUGMENT_MODES)}")
    if mode == "random-flip":
        return (random_flip_choice(key),)
    return AUGMENT_MODES[mode]


def augmented_views(img: Image.Image, resolution: int, aug_ids: tuple[int, ...]) -> list[np.ndarray]:
    """One uint8 [R, R, 3] view per augmentation id (see the module docstring for the numbering)."""
    views: list[np.ndarray] = []
    center = crops = None
    for aug in aug_ids:
        if aug in (0, 1):
            center = center_crop_adm(img, resolution) if center is None else center
            views.append(center if aug == 0 else np.ascontiguousarray(center[:, ::-1]))
        elif 2 <= aug <= 11:
            if crops is None:
                crops = ten_crop(center_crop_adm(img, int(resolution * TEN_CROP_SCALE)), resolution)
            crop = crops[(aug - 2) % 5]
            views.append(crop if aug < 7 else np.ascontiguousarray(crop[:, ::-1]))
        else:
            raise ValueError(f"unknown augmentation id {aug} (known: 0..11)")
    return views


def to_model_input(batch: np.ndarray) -> torch.Tensor:
    """uint8 [B, R, R, 3] -> float32 [B, 3, R, R] in [-1, 1] (x / 127.5 - 1).

    Computed in numpy, not torch: data loaders call this in their own threads (Ray Data's prefetch), and a torch
    op there starts an OpenMP thread team for that thread. With more OpenMP threads than cores, libgomp stops
    spinning between parallel regions, and every small op of the training thread then waits to wake its team
    (the tiny tokenizer trained 1.6x slower: docs/performance.md)."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, R, R, 3], got {batch.dtype} {list(batch.shape)}")
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)  # [B, 3, R, R]
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return torch.from_numpy(x)
