"""One token-count sweep, start to finish: the driver's side of both the reconstruction and generation sweeps.

    spec = SweepSpec(output, ks, fingerprint, ReconstructStage, stage_kwargs, ...)   # built by a job from flags
    outcome = run_sweep(spec, rows=lambda done: inputs without the keys in `done`)

run_sweep opens `<output>/partial` (resuming when its settings match), runs the model stage and the Inception
stage on Ray Data in input order, collects complete images into chunks, reads them back into bounded per-k
summaries (plus one group per adaptive target, chosen from the chunks' tables: pipeline.eval.sweep_adaptive),
computes the metrics (against the given reference, or one made from the originals of this pass and saved as
reference_stats.npz) and writes results.json, results.md and the figures. Adaptive targets are not part of the
fingerprint: a rerun with other targets resumes with nothing to decode and only reads the chunks again.
`output` is a folder or any fsspec URL; everything, partial chunks included, goes there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..data.corpus import join
from .features import Resources, ordered_execution, with_inception_features
from .fid import Reference, save_reference
from .report import MetricOptions, Report, summarize, write_outputs
from .sweep import REAL
from .sweep_adaptive import AdaptivePlan
from .sweep_results import CHUNK_FORMAT, Collector, Gathered, PartialResults, gather


@dataclass(frozen=True)
class InPassReference:
    """Reference statistics to compute from the originals (rows with k = REAL) of this pass, labelled so."""

    extractor: str
    preprocessing: str
    source: str


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs besides its input rows; the jobs build it from their flags."""

    name: str  # log prefix, e.g. "eval_sweep"
    output: str  # folder or fsspec URL
    ks: tuple[int, ...]
    fingerprint: dict  # settings that must match for a rerun to resume
    stage: type  # ReconstructStage | GenerateStage: rows in, one row per (image, k) out
    stage_kwargs: dict
    model_resources: Resources
    inception_weights: str
    inception_resources: Resources
    chunk_images: int
    metrics: MetricOptions
    reference: Reference | InPassReference
    report: Report  # its `title` may hold {n}: the number of images evaluated
    adaptive: AdaptivePlan | None = None  # reconstruction sweeps: targets read off the decoded table at gather


@dataclass
class SweepOutcome:
    results: dict
    files: dict
    gathered: Gathered
    reference: Reference


class NothingToScoreError(ValueError):
    pass


def run_sweep(spec: SweepSpec, rows: Callable[[frozenset[str]], object | None], log: Callable[[str], None]):
    """`rows(done)`: the stage's input Dataset without the images in `done` (finished by an earlier run), or
    None when nothing is left. Raises ResumeMismatchError (other settings in the output) and
    NothingToScoreError (no readable image) with messages that name no flags."""
    started = time.time()
    in_pass = isinstance(spec.reference, InPassReference)
    keep_real = in_pass or (spec.adaptive is not None and spec.adaptive.needs_original_features)
    groups = ((REAL,) if keep_real else ()) + spec.ks
    partial = PartialResults(join(spec.output, "partial"), spec.fingerprint, groups)
    partial.open()

    with ordered_execution():
        collector = Collector(partial, groups, spec.chunk_images, lambda p: log(f"[{spec.name}] saved {p}"))
        if collector.done:
            log(f"[{spec.name}] resuming: {len(collector.done)} images already in {partial.url}")
        ds = rows(frozenset(collector.done))
        if ds is not None:
            r = spec.model_resources
            ds = ds.map_batches(spec.stage, fn_constructor_kwargs=spec.stage_kwargs, **r.map_kwargs())
            ds = with_inception_features(ds, spec.inception_weights, spec.inception_resources)
            inception = spec.inception_resources.workers
            log(f"[{spec.name}] k={list(spec.ks)}: {r.workers} model actor(s), {inception} Inception actor(s)")
            collector.consume(ds)

    g = gather(partial, spec.metrics.feature_subset, spec.metrics.subset_seed, spec.adaptive)
    if not g.images:
        raise NothingToScoreError(f"no readable images ({len(g.errors)} bad inputs)")
    reference = spec.reference
    if in_pass:
        real = g.per_k[REAL]
        kept = real.subset.features if spec.metrics.prc or spec.metrics.kid else None
        made = spec.reference
        reference = Reference.from_stats(real.stats, made.extractor, made.preprocessing, made.source, kept)
        save_reference(join(spec.output, "reference_stats.npz"), reference)
    results = summarize(g, spec.ks, reference, spec.metrics, spec.adaptive)

    provenance = json.loads(json.dumps(spec.report.provenance))  # a copy
    provenance.setdefault("data", {})["keys_sha256"] = g.keys_sha256
    provenance["reference"] = {
        "source": reference.source,
        "n": reference.n,
        "extractor": reference.extractor,
        "preprocessing": reference.preprocessing,
        "computed_in_this_pass": in_pass,
        "features_kept": None if reference.features is None else len(reference.features),
    }
    run = {**spec.report.run, "wall_s": round(time.time() - started, 1), "images_this_run": collector.images_this_run}
    report = replace(spec.report, provenance=provenance, run=run, title=spec.report.title.format(n=g.images))
    files = write_outputs(spec.output, results, g, ks=spec.ks, report=report)
    return SweepOutcome(results, files, g, reference)


def run_fingerprint(**settings) -> dict:
    """JSON-safe settings that must match for a rerun to resume (plus the chunk layout's version)."""
    return json.loads(json.dumps({**settings, "chunk_format": CHUNK_FORMAT}, default=_json_default, sort_keys=True))


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    if isinstance(x, tuple | set):
        return list(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
