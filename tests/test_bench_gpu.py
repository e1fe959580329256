"""bench/gpu.sh, the prepared GPU check: its dry run passes here, rows are independent, the time guard skips
rows instead of overrunning, and the MFU formula is the stated one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu  # noqa: E402  (bench/gpu.py)


def test_dry_run_checks_every_row_and_passes():
    env = {**os.environ, "PYTHON": sys.executable, "OUT": ""}
    proc = subprocess.run(
        ["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[dry-run] bench/gpu.sh parses" in proc.stdout
    for name in gpu.ROWS:
        assert f"[dry-run] row {name} " in proc.stdout
    assert proc.stdout.rstrip().endswith("[dry-run] OK")


def test_dry_run_fails_on_a_bad_plan(monkeypatch):
    bad = gpu.Sizes(sweep_ks=(1, 999))  # more tokens than the model has registers
    assert gpu.dry_run(["sweep"], bad) == 1


def test_argparse_and_signals_work_after_an_in_process_run():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGALRM, signal.SIGTERM)}
    assert gpu.main(["--dry-run", "--only", "matmul"]) == 0
    assert gpu.main(["--cpu-smoke", "--only", "matmul", "--out", ""]) == 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=int)
    assert parser.parse_args(["--x", "3"]).x == 3
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_unknown_row_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--only", "matmul,nope"])
    assert "unknown row(s) ['nope']" in capsys.readouterr().err


def test_a_failing_row_reports_one_line_and_the_next_row_runs(monkeypatch, tmp_path):
    def broken(s, guard, ctx):
        raise RuntimeError("CUDA out of memory\nsecond line")

    def fine(s, guard, ctx):
        return [gpu.Row("fine", 2.0, "x/s", "measured")]

    monkeypatch.setitem(gpu.ROWS, "broken", broken)
    monkeypatch.setitem(gpu.ROWS, "fine", fine)
    emit = gpu.writer(str(tmp_path), "header", {"device": "test"})
    rows = gpu.run_rows(["broken", "fine"], gpu.SMOKE, gpu.TimeGuard(60), {}, emit)
    assert [r.value for r in rows] == [None, 2.0]
    assert rows[0].how == "error: RuntimeError: CUDA out of memory second line"
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["broken", "fine"]
    assert "| fine | 2 | x/s |" in (tmp_path / "gpu_bench.md").read_text()


def test_time_guard_skips_rows_once_the_budget_is_spent(monkeypatch):
    ran = []
    monkeypatch.setitem(gpu.ROWS, "fine", lambda s, guard, ctx: ran.append(1) or [gpu.Row("fine", 1.0, "", "")])
    rows = gpu.run_rows(["fine", "fine"], gpu.SMOKE, gpu.TimeGuard(0), {}, lambda rows: None)
    assert ran == []
    assert all(r.value is None and "time guard" in r.how for r in rows)


def test_hard_stop_ends_the_run_even_through_a_rows_own_error_handling(monkeypatch):
    def stuck(s, guard, ctx):
        try:
            raise gpu.TimeUpError  # what the SIGALRM/SIGTERM handler raises
        except Exception:  # noqa: BLE001 - a row's own handling must not swallow it
            return [gpu.Row("swallowed", 0.0, "", "")]

    ran = []
    monkeypatch.setitem(gpu.ROWS, "stuck", stuck)
    monkeypatch.setitem(gpu.ROWS, "fine", lambda s, guard, ctx: ran.append(1) or [gpu.Row("fine", 1.0, "", "")])
    rows = gpu.run_rows(["stuck", "fine"], gpu.SMOKE, gpu.TimeGuard(60), {}, lambda rows: None)
    assert rows[0].how == "not measured: stopped by the time guard's hard limit"
    assert ran == [] and "time guard" in rows[1].how


def test_sigterm_stops_the_run_and_the_table_still_prints(monkeypatch, capsys):
    def killed(s, guard, ctx):
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` does at the hard limit
        time.sleep(5)  # the handler raises during this
        return [gpu.Row("never", 1.0, "", "")]

    monkeypatch.setitem(gpu.ROWS, "killed", killed)
    monkeypatch.setitem(gpu.ROWS, "fine", lambda s, guard, ctx: [gpu.Row("fine", 1.0, "", "")])
    assert gpu.main(["--cpu-smoke", "--only", "killed,fine", "--out", ""]) == 0
    table = capsys.readouterr().out.split("## bench/gpu.py")[-1]
    assert "| killed | - |  |" in table and "stopped by the time guard's hard limit" in table
    assert "| fine | - |  |" in table and "skipped by the time guard" in table


def test_ar_flops_per_token_is_6n_plus_attention():
    from flextok.ar import ar_preset

    cfg = ar_preset("tiny", max_tokens=32)  # dim 64, depth 2, vocab 64000
    flops, N = gpu.ar_flops_per_token(cfg)
    hidden = int(2 * 4.0 * 64 / 3)
    block = 4 * 64 * 64 + 3 * 64 * hidden + 2 * 64  # attention, SwiGLU, two RMSNorm weights
    expected = 2 * block + 64 + 64 * 64000  # blocks, final norm, output head
    assert expected == N
    assert flops == 6 * N + 12 * 2 * 64 * 32


def test_cpu_smoke_rows_run_end_to_end():
    """The cheap rows at tiny sizes (the Ray rows and d12_d12 are in the manual smoke run)."""
    small = gpu.Sizes(**{**gpu.SMOKE.__dict__, "tokenizers": ("tiny",)})
    rows = gpu.run_rows(
        ["matmul", "tokenize", "detokenize", "ar_train", "sweep"], small, gpu.TimeGuard(300), {}, lambda r: None
    )
    assert [r.name for r in rows] == [
        "matmul bf16 peak",
        "tokenize tiny",
        "detokenize tiny",
        "AR train tiny tokens/s",
        "AR train tiny MFU",
        "sweep decode",
        "sweep decode, input images",
    ]
    assert all(r.value is not None and r.value > 0 for r in rows), [r.how for r in rows]
