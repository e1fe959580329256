"""The generation sweep with the real tiny AR model over a tiny FlexTok: outputs, class balance, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flextok.ar import ARModel, ar_preset
from flextok.checkpoint import weights_digest
from jobs.common import JobError
from pipeline.data.preprocess import PREPROCESSING
from pipeline.eval import generate as G
from pipeline.eval import sweep_results as SR
from pipeline.eval.fid import FeatureStats, FrechetReference, Reference, load_reference, low_rank_factor, save_reference
from pipeline.inception import Inception

N, KS = 6, "1,32"


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(1)
    ar = ARModel(ar_preset("tiny", num_classes=4)).eval()  # 32 tokens, the tiny FlexTok's 64000 codes
    ar.save_pretrained(root / "ar")
    tiny_model.save_pretrained(root / "flextok")
    return root / "ar", root / "flextok"


@pytest.fixture(scope="module")
def reference(inception_weights, tmp_path_factory) -> Path:
    """Reference statistics for 32px images with the real extractor identity (random features: the numbers
    are not meaningful, the plumbing is what is tested)."""
    identity = Inception(inception_weights).identity
    x = np.random.default_rng(0).random((20, 2048)).astype(np.float32)
    ref = Reference.from_stats(FeatureStats.of(x), identity, f"{PREPROCESSING} @ 32px, uint8", "synthetic", x)
    return save_reference(tmp_path_factory.mktemp("ref") / "ref.npz", ref)


def argv(models, reference, inception_weights, output, *extra) -> list[str]:
    ar, flextok = models
    return [
        "--ar-model", str(ar), "--model", str(flextok), "--reference-stats", str(reference), "--ks", KS,
        "--num-samples", str(N), "--gen-batch", "4", "--timesteps", "3", "--decode-batch", "3",
        "--chunk-images", "2", "--grid-samples", "3", "--cfg-scale", "2", "--top-k", "100",
        "--inception-weights", str(inception_weights), "--output", str(output), *extra,
    ]  # fmt: skip


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


@pytest.fixture(scope="module")
def first_run(ray_session, models, reference, inception_weights, tmp_path_factory) -> Path:
    from jobs.eval_generate import main

    output = tmp_path_factory.mktemp("gen-run") / "a"
    assert main(argv(models, reference, inception_weights, output)) == 0
    return output


def test_generation_sweep_writes_all_outputs(first_run, models):
    for name in ("results.json", "results.md", "fid_vs_tokens.png", "samples_grid.png"):
        assert (first_run / name).is_file(), name
    r = results(first_run)
    assert [row["k"] for row in r["per_k"]] == [1, 32]
    chunks = []
    for path in sorted((first_run / "partial").glob("chunk-*.npz")):
        with np.load(path) as z:
            chunks.append({name: z[name] for name in z.files})
    ref = load_reference(r["provenance"]["reference"]["source"])
    frechet = FrechetReference(ref.mu, ref.sigma, low_rank_factor(ref.features))
    for row in r["per_k"]:
        assert row["num_samples"] == N
        fake = np.concatenate([c[f"features_{row['k']}"] for c in chunks]).astype(np.float64)
        # the FID of this k's saved features against the reference (formula checked against torch-fidelity in
        # test_fid.py; its sqrtm in 2048-d would take minutes here)
        assert row["fid"] == pytest.approx(frechet.distance(fake.mean(0), np.cov(fake, rowvar=False)), rel=1e-6)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["psnr"] is None and row["is_mean"] is None
    assert r["work"]["class_counts"] == {"classes": 4, "min": 1, "max": 2}  # 6 samples over 4 classes
    p = r["provenance"]
    assert p["ar_model"]["sha256"] == weights_digest(ARModel.from_pretrained(models[0]).state_dict())
    assert p["settings"]["cfg_scale"] == 2.0 and p["settings"]["top_k"] == 100 and p["seeds"]["seed"] == 0
    assert [str(k) for c in chunks for k in c["keys"]] == [G.sample_key(i) for i in range(N)]
    assert [int(x) for c in chunks for x in c["labels"]] == [i % 4 for i in range(N)]
    assert r["work"]["decodes_per_image"] == 2.0  # one decoder output per (sample, k), counted
    g = SR.gather(SR.PartialResults(first_run / "partial", {}, (1, 32)))
    assert sorted(g.grid) == [G.sample_key(i) for i in range(3)] and all(sorted(c) == [1, 32] for c in g.grid.values())


def test_generation_resumes_with_the_same_numbers(first_run, models, reference, inception_weights, tmp_path):
    """The state a crash leaves (settings, the first finished chunk, a half-written chunk) is resumed: only the
    missing samples are generated (whole groups regenerated, finished samples skipped), same numbers."""
    from jobs.eval_generate import main

    output = tmp_path / "b"
    (output / "partial").mkdir(parents=True)
    for name in ("settings.json", "chunk-000000.npz"):
        shutil.copy(first_run / "partial" / name, output / "partial" / name)
    (output / "partial" / "chunk-000001.npz.tmp").write_bytes(b"half a chunk")
    assert main(argv(models, reference, inception_weights, output)) == 0
    assert results(output)["run"]["images_this_run"] == N - 2
    assert results(output)["per_k"] == results(first_run)["per_k"]


def test_generation_errors_before_any_work(ray_session, models, reference, inception_weights, tmp_path):
    from jobs.eval_generate import main

    out = tmp_path / "never"
    with pytest.raises(JobError, match=r"k=\[64\] outside 1..32"):
        main([*argv(models, reference, inception_weights, out), "--ks", "1,64"])
    with pytest.raises(JobError, match="--reference-stats is required"):
        main(
            [
                a
                for a in argv(models, reference, inception_weights, out)
                if a not in ("--reference-stats", str(reference))
            ]
        )
    other = save_reference(
        tmp_path / "other.npz", Reference.from_stats(FeatureStats.of(np.eye(3, 2048)), "other-net", "x", "r")
    )
    with pytest.raises(JobError, match="computed with extractor 'other-net'"):
        main([*argv(models, reference, inception_weights, out), "--reference-stats", str(other)])
    assert not out.exists()


def test_group_tokens_do_not_depend_on_other_groups(models):
    """A group's AR tokens come from its own generator: the same in any batch of groups."""
    ar, flextok = models
    stage = G.GenerateStage(str(ar), str(flextok), (1, 32), {}, {"timesteps": 2}, 4, [])
    labels = torch.tensor([0, 1, 2, 3])
    a, lengths = stage.generate(7, labels, 32)
    assert a.shape == (4, 32) and lengths.tolist() == [32] * 4  # no EOS: every sample has k tokens
    assert torch.equal(a, stage.generate(7, labels, 32)[0])
    assert not torch.equal(a, stage.generate(8, labels, 32)[0])


@pytest.fixture(scope="module")
def eos_ar(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("eos") / "ar"
    ARModel(ar_preset("tiny", num_classes=4, eos=True)).save_pretrained(path)
    return path


def end_at(model: ARModel, stop_of_label: dict[int, int]) -> None:
    """Make each sample draw EOS at step stop_of_label[its label] and never elsewhere."""
    labels: list[int] = []
    transformer = model.transformer

    def remember(_module, args, _out):
        labels[:] = args[0].tolist()  # the class embedding sees the batch's labels first

    def scripted(x, start=0, caches=None):
        logits = transformer(x, start, caches)  # [B, L, V + 1]
        hit = torch.tensor([stop_of_label[label] == start + x.shape[1] - 1 for label in labels])
        logits[:, -1, model.eos_id] = torch.where(hit, 1e4, -1e4)
        return logits

    model.class_embed.register_forward_hook(remember)
    model.transformer = scripted


def test_an_eos_model_decodes_each_sample_from_its_own_length(eos_ar, models, tmp_path, monkeypatch):
    """Samples end at their EOS (k caps them), are decoded from the tokens they have, and each group's
    lengths are written for the job's length summary."""
    decoded: list[int] = []  # the length of every prefix decoded
    decode = G.decode_prefixes

    def recording(model, prefixes, *args):
        decoded.extend(len(x) for x in prefixes)
        return decode(model, prefixes, *args)

    monkeypatch.setattr(G, "decode_prefixes", recording)
    stops = {0: 3, 1: 1, 2: 5, 3: 99}  # class 3 never draws EOS
    stage = G.GenerateStage(
        str(eos_ar), str(models[1]), (4, 32), {}, {"timesteps": 2}, 4, [], lengths_url=str(tmp_path)
    )
    end_at(stage.ar, stops)
    groups = G.sample_groups(6, 4)  # samples 0-3 and 4-5: labels 0, 1, 2, 3 and 0, 1
    out = stage({name: np.array([g[name] for g in groups]) for name in ("group", "start", "count")})
    assert list(out["k"]) == [4, 32] * 6
    expected = {k: [min(stops[i % 4], k) for i in range(6)] for k in (4, 32)}
    assert decoded == [expected[k][i] for i in range(6) for k in (4, 32)]
    summary = G.length_summary(str(tmp_path), groups, (4, 32))
    assert summary["samples"] == 6
    for row in summary["per_k"]:
        lengths = expected[row["k"]]
        assert row["mean"] == pytest.approx(sum(lengths) / 6)
        assert row["histogram"] == {str(n): lengths.count(n) for n in sorted(set(lengths))}
    assert G.length_summary(str(tmp_path), G.sample_groups(10, 4), (4,))["samples"] == 6  # group 2: no file


def test_length_summary_goes_into_results(tmp_path):
    from jobs.eval_generate import add_length_summary

    (tmp_path / "results.json").write_text(json.dumps({"per_k": []}))
    (tmp_path / "results.md").write_text("| k | gFID |\n")
    summary = {"samples": 3, "per_k": [{"k": 8, "mean": 14 / 3, "histogram": {"2": 1, "4": 1, "8": 1}}]}
    add_length_summary(str(tmp_path), summary)
    assert results(tmp_path) == {"per_k": [], "length_summary": summary}
    assert "| 8 | 4.67 | 2: 1, 4: 1, 8: 1 |" in (tmp_path / "results.md").read_text()
