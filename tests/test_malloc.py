"""pipeline.malloc: our processes keep large freed blocks instead of mapping them again on every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.malloc import ENV_VARS, env_vars, runtime_env

# Allocate and free a 64 MiB array 20 times; print the minor page faults of that loop.
FAULTS = textwrap.dedent(
    """
    import resource, numpy as np
    {setup}
    np.ones(2**23)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(2**23).sum()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def child_faults(setup: str, extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS} | extra_env
    code = FAULTS.format(setup=setup)
    return int(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True).stdout)


def test_runtime_env_adds_our_variables_and_keeps_the_callers(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    env = runtime_env({"env_vars": {"MALLOC_TRIM_THRESHOLD_": "0", "OTHER": "1"}, "pip": ["x"]})
    assert env["pip"] == ["x"]
    assert env["env_vars"] == {**ENV_VARS, "MALLOC_TRIM_THRESHOLD_": "0", "OTHER": "1"}


def test_variables_the_process_already_has_are_not_set_again(monkeypatch):
    # a job submitted with them passes them on itself, and Ray refuses a runtime_env that repeats them
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1")
    assert "MALLOC_MMAP_THRESHOLD_" not in env_vars()
    assert "MALLOC_TRIM_THRESHOLD_" in env_vars()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tuned_processes_do_not_fault_their_large_blocks_in_again():
    default = child_faults("", {})
    started_with_env = child_faults("", ENV_VARS)  # a Ray worker started with runtime_env()
    tuned_at_run_time = child_faults("from pipeline.malloc import tune_this_process; tune_this_process()", {})
    assert default > 20 * 100  # each array mapped and faulted in anew (numpy asks for 2 MiB pages: 32+ faults)
    assert started_with_env < default / 20
    assert tuned_at_run_time < default / 20
