"""`ray job submit` end to end: a separate local Ray head, a real pretokenize job, its output checked.

The head is started here with `ray start --head --block` in its own process group, on explicit free
ports and its own temp dir, so it never meets the pytest session's Ray (`ray_session`), which is
neither used nor touched. Stopping it signals that process group only (never `ray stop`, which would
end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.corpus import validate_corpus
from pipeline.preprocess import center_crop_adm, decode_image, to_model_input

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_IMAGES = 8
# Never upload these with the job (the .gitignore'd ones are skipped by Ray anyway).
EXCLUDES = [".git", ".venv", "out", "runs", ".cache", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRayHead:
    """`ray start --head` on explicit ports with its own temp dir; `stop()` ends exactly its processes."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: socket paths
        gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(
            RAY_AUTH_MODE="disabled",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        self.log = open(self.temp_dir / "ray-start.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the Ray head's dashboard did not come up within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join((self.temp_dir / "ray-start.log").read_text().splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it shuts its children down), then SIGKILL whatever of its group is left.

        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 skips the node's 30 s drain; job drivers run in their own
        sessions but fate-share with their supervisor actor, which lives in this group.
        """
        pgid = self.proc.pid  # start_new_session: this group holds our head's processes only
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=60)
        if not wait_group_gone(pgid, timeout_s=15):
            os.killpg(pgid, signal.SIGKILL)
            wait_group_gone(pgid, timeout_s=15)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def ray_head():
    head = LocalRayHead()
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture
def job_inputs(tmp_path, tiny_model, imagenet_sample) -> dict[str, Path]:
    """A tiny tokenizer saved to disk and a few real photos (with their labels.csv rows)."""
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    images = tmp_path / "images"
    images.mkdir()
    header, *rows = (imagenet_sample / "labels.csv").read_text().splitlines()
    rows = rows[:NUM_IMAGES]
    for row in rows:
        shutil.copy(imagenet_sample / row.split(",")[0], images)
    (images / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return {"model": model_dir, "images": images, "output": tmp_path / "corpus"}


def test_submitted_pretokenize_job_succeeds_and_writes_the_corpus(ray_head, job_inputs, tiny_model):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    entrypoint = (
        f"python jobs/pretokenize.py --model {job_inputs['model']} --input {job_inputs['images']}"
        f" --output {job_inputs['output']} --resolution 32 --batch-size 4 --gpus-per-worker 0 --workers 1"
    )
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": {"PYTHONUNBUFFERED": "1"}},
    )
    deadline = time.monotonic() + 600
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"

    assert validate_corpus(str(job_inputs["output"])).problems == []
    table = pads.dataset(job_inputs["output"] / "data", format="parquet").to_table().sort_by("key")
    stems = sorted(p.stem for p in job_inputs["images"].glob("*.JPEG"))
    assert table.column("key").to_pylist() == stems
    # The job's tokens are the tokenizer's own: check the first image end to end.
    image = center_crop_adm(decode_image((job_inputs["images"] / f"{stems[0]}.JPEG").read_bytes()), 32)
    expected = tiny_model.tokenize(to_model_input(image[None]))[0].tolist()
    assert table.column("tokens")[0].as_py() == expected
