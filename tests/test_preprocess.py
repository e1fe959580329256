"""Preprocessing: decoding to RGB (modes, EXIF, bad bytes), the ADM center crop, augmentation, model input."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards import png_header_only

from pipeline.data.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    augment_ids,
    augmented_views,
    center_crop_adm,
    decode_image,
    random_flip_choice,
    to_model_input,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ decoding
def test_decode_real_jpeg_is_rgb(imagenet_sample: Path):
    data = (imagenet_sample / "n01440764_tench.JPEG").read_bytes()
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.size == Image.open(io.BytesIO(data)).size


def test_decode_grayscale_jpeg_repeats_the_gray_channel(imagenet_sample: Path):
    data = (imagenet_sample / "n04008634_projectile.JPEG").read_bytes()
    assert Image.open(io.BytesIO(data)).mode == "L"
    arr = np.asarray(decode_image(data))
    assert arr.shape[2] == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_decode_cmyk_jpeg():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    arr = np.asarray(decode_image(encode(cmyk, "JPEG", quality=95)))
    assert arr.shape == (16, 16, 3)
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60 and arr[..., 2].mean() < 60


def test_decode_rgba_composites_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red on the left, fully transparent black on the right
    arr = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (arr[:, :4] == (255, 0, 0)).all()
    assert (arr[:, 4:] == 255).all()


def test_decode_palette_with_transparency_composites_over_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    arr = np.asarray(decode_image(encode(img, "PNG", transparency=0)))
    assert tuple(arr[0, 0]) == (0, 255, 0)
    assert (arr[1:, :] == 255).all()


def test_decode_16bit_gray_scales_to_8bit():
    values = np.array([[0, 257 * 128, 65535, 257]], np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    arr = np.asarray(decode_image(encode(img, "PNG")))
    assert arr[0, :, 0].tolist() == [0, 128, 255, 1]


def test_decode_applies_exif_orientation():
    arr = np.zeros((20, 40, 3), np.uint8)  # wide: 40 x 20
    arr[:, :20] = (255, 0, 0)  # left half red
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)  # displayed portrait
    shown = np.asarray(out)
    assert shown[:20, :, 0].mean() > 200 and shown[20:, :, 0].mean() < 60  # red ends up on top


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "cannot decode"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "cannot decode"),
    ],
)
def test_decode_rejects_bad_bytes(data: bytes, reason: str):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decode_rejects_truncated_jpeg(imagenet_sample: Path):
    data = (imagenet_sample / "n01440764_tench.JPEG").read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("side", [10_000, 20_000])  # 1.1x and 4.5x PIL's MAX_IMAGE_PIXELS
def test_decode_rejects_decompression_bombs(side: int):
    assert side * side > Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError):
        decode_image(png_header_only(side, side))


# ------------------------------------------------------------------------------------------ cropping
# Expected values below follow guided-diffusion's center_crop_arr as published (image_datasets.py): BOX-halve
# (floor sizes) while the short side >= 2R, BICUBIC-resize to round(side * R / short), crop at (size - R) // 2.
# They are worked out by hand from how each input is built, not by running a second implementation.
def blocks(width: int, height: int, block: int) -> Image.Image:
    """Constant block x block tiles, colour tile_colour(tile row, tile column): not linear, so that any
    filter reaching a neighbouring tile changes it."""
    y, x = np.mgrid[0:height, 0:width] // block
    return Image.fromarray(tile_colour(y, x))


def tile_colour(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    return np.stack([7 * col**2 % 251, 11 * row**2 % 251, np.zeros_like(col)], -1).astype(np.uint8)


def test_center_crop_halves_twice_then_crops_the_middle():
    # 256x128, R=32: BOX-halve to 128x64, again to 64x32 (short side 32 < 64: stop), scale 1, crop left
    # (64 - 32) // 2 = 16. Each 4x4 tile halves twice into one pixel: out[i, j] = tile (row i, column j + 16).
    out = center_crop_adm(blocks(256, 128, 4), 32)
    rows, cols = np.mgrid[0:32, 0:32]
    np.testing.assert_array_equal(out, tile_colour(rows, cols + 16))


@pytest.mark.parametrize(("width", "height", "left", "top"), [(43, 32, 5, 0), (32, 43, 0, 5), (40, 33, 4, 0)])
def test_center_crop_offset_rounds_down(width: int, height: int, left: int, top: int):
    # short side < 2R and scale R/short; (43, 32): scale 1, offset (43 - 32) // 2 = 5, not round(5.5) = 6.
    # (40, 33): scale 32/33 gives round(38.79) = 39 x 32, offset (39 - 32) // 2 = 3 on the resized image.
    img = blocks(width, height, 1)
    out = center_crop_adm(img, 32)
    assert out.shape == (32, 32, 3)
    if (width, height) == (40, 33):
        resized = np.asarray(img.resize((39, 32), resample=Image.BICUBIC))
        np.testing.assert_array_equal(out, resized[:, 3:35])
    else:
        np.testing.assert_array_equal(out, np.asarray(img)[top : top + 32, left : left + 32])


def test_center_crop_upsamples_the_short_side_and_crops():
    # 20x10 (red for x < 5, blue from x = 5), R=32: scale 3.2 -> 64x32, the edge moves to x = 16, crop left
    # (64 - 32) // 2 = 16: the edge lands on column 0, and beyond bicubic's reach (2 source px = 6.4) all blue.
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = (255, 0, 0)
    arr[:, 5:] = (0, 0, 255)
    out = center_crop_adm(Image.fromarray(arr), 32)
    assert (out[:, 7:] == (0, 0, 255)).all()
    assert (out[:, 0, 0] > 0).all()  # the red side still reaches the first column


def test_center_crop_upsamples_small_images(imagenet_sample: Path):
    small = Image.new("RGB", (97, 135), (10, 20, 30))
    out = center_crop_adm(small, 256)
    assert out.shape == (256, 256, 3)
    assert (out == (10, 20, 30)).all()


# ------------------------------------------------------------------------------------------ augmentation
def test_flip_view_is_the_mirror_of_the_center_crop(imagenet_sample: Path):
    img = decode_image((imagenet_sample / "n01440764_tench.JPEG").read_bytes())
    center, flipped = augmented_views(img, 32, (0, 1))
    np.testing.assert_array_equal(center, center_crop_adm(img, 32))
    np.testing.assert_array_equal(flipped, center[:, ::-1])


def test_ten_crop_views(imagenet_sample: Path):
    img = decode_image((imagenet_sample / "n01440764_tench.JPEG").read_bytes())
    views = augmented_views(img, 32, augment_ids("tencrop", "k"))
    assert len(views) == 10 and all(v.shape == (32, 32, 3) for v in views)
    big = center_crop_adm(img, int(32 * 1.1))  # 35 x 35
    np.testing.assert_array_equal(views[0], big[:32, :32])  # top-left
    np.testing.assert_array_equal(views[3], big[-32:, -32:])  # bottom-right
    for plain, flipped in zip(views[:5], views[5:], strict=True):
        np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert len({v.tobytes() for v in views}) == 10


def test_random_flip_is_a_reproducible_fair_coin(imagenet_sample: Path):
    keys = [p.stem for p in imagenet_sample.glob("*.JPEG")]
    choices = [random_flip_choice(k) for k in keys]
    assert choices == [random_flip_choice(k) for k in keys]
    assert 0.35 < np.mean(choices) < 0.65
    assert augment_ids("random-flip", keys[0]) == (choices[0],)


def test_unknown_augment_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown augment mode"):
        augment_ids("mixup", "k")


# ------------------------------------------------------------------------------------------ model input
def test_to_model_input_scales_and_transposes():
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    batch[0, 1, 2] = (255, 0, 128)
    x = to_model_input(batch)
    assert x.dtype.is_floating_point and tuple(x.shape) == (2, 3, 4, 4)
    assert x[0, :, 1, 2].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_to_model_input_is_x_over_127_5_minus_1_in_float32_for_every_byte():
    batch = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)  # every value, every channel
    want = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the formula, in torch float32
    got = to_model_input(batch)
    assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_to_model_input_starts_no_thread_team_in_a_loader_thread():
    """Loaders call it in their own threads; a torch op there would start an OpenMP team (one more thread)."""
    code = textwrap.dedent(
        """
        import os, threading, numpy as np, torch
        from pipeline.data.preprocess import to_model_input
        torch.set_num_threads(2)
        torch.ones(10**6).add_(1)  # the main thread's team
        out = {}
        def loader():
            before = len(os.listdir("/proc/self/task"))
            to_model_input(np.zeros((8, 64, 64, 3), np.uint8))
            out["new"] = len(os.listdir("/proc/self/task")) - before
        t = threading.Thread(target=loader); t.start(); t.join()
        print(out["new"])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert int(result.stdout) == 0


def test_to_model_input_rejects_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((2, 3, 4, 4), np.uint8))
