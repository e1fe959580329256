"""The demo's plan and report, fast (the full run is `make demo`; its wall time is in docs/demo.md)."""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from jobs import demo
from jobs.common import JobError, add_config_flag

REPO = Path(__file__).resolve().parents[1]


def demo_plan(tmp_path: Path, *flags: str) -> list[demo.Step]:
    args = demo.build_parser().parse_args(["--output", str(tmp_path / "demo"), *flags])
    return demo.plan(args, REPO.parent / "shared" / "data" / "imagenet-sample", demo.Layout(Path(args.output)))


def test_every_step_is_a_cli_command_whose_parser_accepts_its_arguments(tmp_path):
    from jobs.cli import COMMANDS

    steps = demo_plan(tmp_path)
    assert [s.name for s in steps] == [
        "shards", "train tokenizer", "pretokenize", "validate", "train ar", "eval sweep", "eval generate",
    ]  # fmt: skip
    for step in steps:
        assert COMMANDS[step.words][0] == step.module
        parser = importlib.import_module(step.module).build_parser()
        add_config_flag(parser)  # as jobs.common.parse_args does
        _, unknown = parser.parse_known_args(step.argv)
        assert unknown == [], (step.name, unknown)


def test_each_step_reads_what_an_earlier_step_wrote(tmp_path):
    steps = demo_plan(tmp_path)
    work = str(demo.Layout(tmp_path / "demo").work)
    written: set[str] = {work + "/heldout"}  # main() copies the held-out photos there before the first step
    for step in steps:
        opts = dict(zip(step.argv, step.argv[1:], strict=False))  # flag -> the value after it
        for flag in ("--input", "--model", "--corpus", "--ar-model", "--reference-stats"):
            if flag in opts and opts[flag].startswith(work):
                folder = re.match(re.escape(work) + r"/[a-z]+", opts[flag]).group(0)
                assert folder in written, f"{step.name} reads {opts[flag]} before anything wrote it"
        for flag in ("--output", "--export"):
            if flag in opts:
                written.add(opts[flag])


def test_given_model_skips_tokenizer_training_and_is_used_everywhere(tmp_path):
    steps = demo_plan(tmp_path, "--model", "EPFL-VILAB/flextok_d18_d28_in1k", "--gpus", "2")
    assert "train tokenizer" not in [s.name for s in steps]
    users = [s for s in steps if "--model" in s.argv]
    assert {s.argv[s.argv.index("--model") + 1] for s in users} == {"EPFL-VILAB/flextok_d18_d28_in1k"}


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_each_steps_stages_fit_the_demos_gpus_at_once(tmp_path, gpus):
    """`--gpus N` starts a Ray with N GPUs; no step may ask for more at the same time (the sweeps used to ask
    for N decoder GPUs plus one for Inception)."""
    from jobs.resources import Cluster

    cluster = Cluster(cpus=os.cpu_count() or 1, gpus=gpus)
    planned = 0
    for step in demo_plan(tmp_path, "--gpus", str(gpus)):
        job = importlib.import_module(step.module)
        if hasattr(job, "resource_plan"):
            parser = job.build_parser()
            add_config_flag(parser)
            plan = job.resource_plan(parser.parse_args(step.argv), cluster)
            assert plan.gpus <= gpus and plan.shortfall(cluster) is None, (step.name, plan)
            assert all((s.gpus > 0) == (gpus > 0) for s in plan.stages), (step.name, plan)
            planned += 1
    assert planned == 5  # train tokenizer, pretokenize, train ar, eval sweep, eval generate


def test_by_default_the_shipped_models_are_used_and_the_sweep_scores_held_out_photos(tmp_path):
    steps = {s.name: s for s in demo_plan(tmp_path)}
    opt = {name: dict(zip(s.argv, s.argv[1:], strict=False)) for name, s in steps.items()}
    for name in ("pretokenize", "eval sweep", "eval generate"):
        assert Path(opt[name]["--model"]).resolve() == demo.SHIPPED_TOKENIZER, name
    assert Path(opt["eval generate"]["--ar-model"]).resolve() == demo.SHIPPED_AR
    assert opt["eval sweep"]["--input"].endswith("work/heldout")
    assert len(demo.heldout_files(REPO.parent / "shared" / "data" / "imagenet-sample")) == 50
    assert "train tokenizer" in steps and "train ar" in steps  # the demo still trains, to show the loss falling


def test_use_trained_sweeps_and_generates_with_this_runs_models(tmp_path):
    steps = {s.name: s for s in demo_plan(tmp_path, "--use-trained")}
    work = demo.Layout(tmp_path / "demo")
    opt = {name: dict(zip(s.argv, s.argv[1:], strict=False)) for name, s in steps.items()}
    for name in ("pretokenize", "eval sweep", "eval generate"):
        assert opt[name]["--model"] == work.job("tokenizer")
    assert opt["eval generate"]["--ar-model"] == work.job("ar")


def test_quality_sentence_reports_the_measured_trend():
    rising = {
        "per_k": [{"k": 1, "psnr": 11.0, "ssim": 0.1, "fid": 300.0}, {"k": 32, "psnr": 17.3, "ssim": 0.4, "fid": 200.0}]
    }
    assert demo.quality_sentence(rising) == (
        "Mean PSNR rises with every k: 11.0 dB at k=1, 17.3 dB at k=32 (SSIM 0.10 -> 0.40); rFID 300 -> 200."
    )
    falling = {"per_k": [{"k": 1, "psnr": 12.0, "ssim": 0.1}, {"k": 2, "psnr": 11.0, "ssim": 0.1}]}
    assert "does not rise" in demo.quality_sentence(falling)


def test_the_reconstruction_sweep_evaluates_the_adaptive_targets_unless_told_not_to(tmp_path):
    sweep = {s.name: s for s in demo_plan(tmp_path)}["eval sweep"]
    assert sweep.argv[sweep.argv.index("--adaptive") + 1] == demo.DEMO_TARGETS
    assert sweep.argv[sweep.argv.index("--grid-images") + 1] == str(demo.GRID_IMAGES)
    sweep = {s.name: s for s in demo_plan(tmp_path, "--adaptive", "psnr:12")}["eval sweep"]
    assert sweep.argv[sweep.argv.index("--adaptive") + 1] == "psnr:12"
    assert "--adaptive" not in {s.name: s for s in demo_plan(tmp_path, "--adaptive", "")}["eval sweep"].argv


def test_ks_from_a_yaml_list_reaches_both_sweeps_as_a_flag(tmp_path):
    from jobs.common import parse_args

    config = tmp_path / "demo.yaml"
    config.write_text("ks: [1, 4, 16]\n")
    args = parse_args(demo.build_parser(), ["--config", str(config), "--output", str(tmp_path / "demo")])
    steps = demo.plan(args, REPO.parent / "shared" / "data" / "imagenet-sample", demo.Layout(Path(args.output)))
    sweeps = [s for s in steps if s.words[0] == "eval"]
    assert [s.argv[s.argv.index("--ks") + 1] for s in sweeps] == ["1,4,16", "1,4,16"]


def test_output_folder_that_is_not_a_demo_folder_is_left_alone(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("precious")
    with pytest.raises(JobError, match="not a demo folder"):
        demo.prepare_output(keep)
    assert (keep / "thesis.tex").read_text() == "precious"


def test_previous_demo_output_is_replaced(tmp_path):
    out = tmp_path / "demo"
    demo.prepare_output(out)
    (out / "old.png").write_bytes(b"x")
    demo.prepare_output(out)
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]


def fake_sweep(folder: Path, grid: str, fids: dict[int, float], adaptive: dict | None = None) -> None:
    """What eval sweep / eval generate leave behind, with made-up numbers (and adaptive targets' figures)."""
    folder.mkdir(parents=True)
    per_k = [{"k": k, "fid": f, "psnr": 10.0 + k, "ssim": 0.5} for k, f in fids.items()]
    doc = {"per_k": per_k, "work": {"images": 250}, "provenance": {}, "files": {"grid": grid}}
    figures = [grid]
    if adaptive is not None:
        doc["adaptive"] = adaptive
        doc["files"] |= {"rate_plot": "rate_vs_quality.png", "adaptive_grid": "adaptive_grid.png"}
        figures += ["rate_vs_quality.png", "adaptive_grid.png"]
    (folder / "results.json").write_text(json.dumps(doc))
    for name in figures:
        Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / name)


def test_report_has_every_file_and_the_page_shows_them_with_the_settings(tmp_path):
    out = demo.Layout(tmp_path / "demo")
    fake_sweep(out.work / "recon", "recon_grid.png", {1: 120.5, 4: 80.25, 16: 60.0})
    fake_sweep(out.work / "generate", "samples_grid.png", {1: 150.0, 4: 130.0, 16: 125.0})
    args = demo.build_parser().parse_args(["--ks", "1,4,16", "--tokenizer-steps", "7"])
    steps = [demo.Step(("shards",), "jobs.make_shards", ["--input", "x"], seconds=3.0, status=0)]
    for run in ("tokenizer", "ar"):
        metrics = out.work / "runs" / run / "tensorboard" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True)
        metrics.write_text("".join(json.dumps({"step": i, "loss": 2.0 / i}) + "\n" for i in range(1, 5)))
    demo.write_report(out, args, Path("/data/imagenet-sample"), steps, total_s=61.0)

    names = ("results.json", "fid_vs_tokens.png", "recon_grid.png", "samples_grid.png", "training_loss.png")
    for name in (*names, "index.html"):
        assert (out.root / name).is_file(), name
    page = (out.root / "index.html").read_text()
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out.root / src).is_file(), src
    assert "tokenizer-steps" in page and ">7<" in page and "flextok shards --input x" in page
    assert "80.25" in page and "130.00" in page  # rFID and gFID of k=4
    results = json.loads((out.root / "results.json").read_text())
    assert results["settings"]["ks"] == "1,4,16"
    assert [r["fid"] for r in results["generation"]["per_k"]] == [150.0, 130.0, 125.0]


def fake_adaptive(ks: list[int], targets: dict[str, tuple[float, float, int]]) -> dict:
    """An adaptive block of results.json: target -> (mean tokens, PSNR, missed), on 250 images."""
    fixed = [{"k": k, "mean_tokens": float(k), "psnr": 10.0 + k, "fid": 100.0 / k} for k in ks]
    rows = [
        {"target": t, "criterion": t.split(":")[0], "mean_tokens": m, "psnr": p, "fid": 50.0, "ssim": 0.4,
         "missed": x, "images": 250, "decodes_if_searched": {"mean": 2.5, "max": 3, "bound": 3}}
        for t, (m, p, x) in targets.items()
    ]  # fmt: skip
    return {"ladder": ks, "fixed_k": fixed, "targets": rows}


def test_report_shows_the_adaptive_targets_with_their_figures_and_measured_words(tmp_path):
    out = demo.Layout(tmp_path / "demo")
    targets = {"psnr:13": (3.5, 13.75, 2), "psnr:20": (15.0, 25.5, 40), "psnr-slope:0.2": (6.0, 16.5, 0)}
    adaptive = fake_adaptive([1, 4, 16], targets)
    fake_sweep(out.work / "recon", "recon_grid.png", {1: 120.5, 4: 80.25, 16: 60.0}, adaptive)
    fake_sweep(out.work / "generate", "samples_grid.png", {1: 150.0, 4: 130.0, 16: 125.0})
    args = demo.build_parser().parse_args(["--ks", "1,4,16"])
    demo.write_report(out, args, Path("/data/imagenet-sample"), [], total_s=61.0)

    page = (out.root / "index.html").read_text()
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out.root / src).is_file(), src
    assert 'src="rate_vs_quality.png"' in page and 'src="adaptive_grid.png"' in page
    assert "psnr:13: 3.5 tokens per photo on average, mean PSNR 13.75 dB" in page
    assert "(2 of 250 photos miss it even at k=16; fixed k=1: 11.00 dB and k=4: 14.00 dB)" in page  # around 3.5
    assert "40 of 250 photos miss it even at k=16; fixed k=4: 14.00 dB and k=16: 26.00 dB" in page
    slope = "psnr-slope:0.2: 6.0 tokens per photo on average, mean PSNR 16.50 dB (a gain target, nothing to miss;"
    assert slope in page
    results = json.loads((out.root / "results.json").read_text())
    assert results["reconstruction"]["adaptive"]["targets"][1]["target"] == "psnr:20"


def test_report_without_adaptive_targets_has_no_adaptive_section(tmp_path):
    out = demo.Layout(tmp_path / "demo")
    fake_sweep(out.work / "recon", "recon_grid.png", {1: 120.5, 4: 80.25})
    fake_sweep(out.work / "generate", "samples_grid.png", {1: 150.0, 4: 130.0})
    demo.write_report(out, demo.build_parser().parse_args(["--adaptive", ""]), Path("/x"), [], total_s=1.0)
    assert "Adaptive token budgets" not in (out.root / "index.html").read_text()
    assert not (out.root / "rate_vs_quality.png").exists()
