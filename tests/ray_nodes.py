"""Test helpers: Ray nodes started with `ray start --block` on loopback, each on explicit free ports with its
own temp dir, in its own process group, so they never meet the pytest session's Ray (`ray_session`).
Stopping one signals that process group only (never `ray stop`, which would end every Ray on the machine)."""

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

import pytest

BIN = Path(sys.executable).parent
# Never upload these with a job (the .gitignore'd ones are skipped by Ray anyway).
EXCLUDES = [".git", ".venv", "out", "runs", ".cache", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRayNode:
    """`ray start --block`: a head (`gcs_address=None`; dashboard and job server on `dashboard_url`) or a
    worker node joining `gcs_address`. `drop_env` names variables the node must not inherit from this
    process. `stop()` ends exactly this node's processes."""

    def __init__(self, num_cpus: int = 2, gcs_address: str | None = None, drop_env: tuple[str, ...] = ()):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp"))  # short: socket paths
        gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in drop_env}
        self.env.update(
            RAY_AUTH_MODE="disabled",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",  # default 60: too short on a busy 2-core machine
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        cmd = [
            str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--temp-dir={self.temp_dir}",
        ]  # fmt: skip
        if gcs_address is None:
            self.gcs_address = f"127.0.0.1:{gcs}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard}"
            cmd += [
                "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
            ]  # fmt: skip
        else:
            self.gcs_address, self.dashboard_url = gcs_address, None
            cmd += [f"--address={gcs_address}"]
        self.log = open(self.temp_dir / "ray-start.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 360) -> None:
        """Until `ray start` says the node's runtime started (and, for a head, its dashboard answers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if "Ray runtime started" in self.log_tail(200) and (self.dashboard_url is None or self.answers()):
                return
            time.sleep(0.5)
        pytest.fail(f"the Ray node did not come up within {timeout_s} s:\n{self.log_tail()}")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join((self.temp_dir / "ray-start.log").read_text().splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it shuts its children down), then SIGKILL whatever of its group is left.

        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 skips the node's 30 s drain; job drivers run in their own
        sessions but fate-share with their supervisor actor, which lives in the head's group.
        """
        pgid = self.proc.pid  # start_new_session: this group holds this node's processes only
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


def wait_for_job(client, job_id: str, timeout_s: float = 600):
    """Poll until the job ends (stopping it at the deadline); -> (final status, its logs)."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    if not status.is_terminal():
        client.stop_job(job_id)
    return status, client.get_job_logs(job_id)
