"""Scale bench: does the pipeline's cost stay linear in time and flat in driver memory as N grows?

    .venv/bin/python bench/scale.py --quick      # smallest sizes (< 3 min on 2 cores); exit 1 if driver memory grows
    .venv/bin/python bench/scale.py              # pretokenize 10k, 100k, 1.28M; sweep 5k, 50k; corpus readers 1.28M
    .venv/bin/python bench/scale.py --pretokenize 10000,100000 --sweep 5000 --corpus-rows 0

The real pipeline code runs end to end: webdataset sources (pipeline.data.sources: tar streams, image decoding,
ADM crop), pretokenization (pipeline.data.pretokenize: read tasks, an actor pool, the driver's per-shard gather and
commits, the manifest), the reconstruction sweep as jobs/eval_sweep.py composes it (image_dataset ->
ReconstructStage -> Inception stage -> sweep.Collector -> partial chunks -> sweep.gather -> report.summarize),
and the corpus readers (read_corpus, CorpusDataset). Only the neural networks are stand-ins, so that the
bench measures the pipeline and not the models:

- StandInTokenizer: tokens = blake2b(image bytes), cut into K uint16 ids mod the codebook size.
- StandInDecoder: "decodes" a token prefix to its input, the initial noise (latent = image at the stand-in's
  resolution); the real per-(image, k) noise draws, batching, uint8 conversion and pixel metrics all run.
- StandInInception: 2048 features = a fixed random projection of the 8x8-average-pooled image (no logits).

Input records are made on the fly: `synth://bench/<shard>-<count>.tar` is an fsspec file system (registered in
every Ray worker) whose files are webdataset tars of `count` small JPEGs with .cls labels, built when opened.

Per N it prints wall time, rows/s, the driver's peak private memory (RssAnon, sampled every 0.1 s, minus its
value before the first size: what the driver holds for the work; the object store's shared pages it maps are
not counted here), the object store's peak use (sampled cluster-wide), and the files written. The sweep's
driver holds a bounded part by design (per k: float64 feature statistics and the feature subset; printed).
"Driver memory grows with N" means: at the largest N the driver's peak beyond its bounded part exceeds the
smallest N's by more than 25% + 64 MiB; --quick exits 1 when that happens for either job.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import RESOLUTION, register_synthetic, synthetic_urls  # noqa: E402
from pipeline.data.pretokenize import PretokenizeConfig, TokenizeActor, run_pretokenize  # noqa: E402
from pipeline.eval.features import InceptionStage  # noqa: E402
from pipeline.eval.sweep import ReconstructStage  # noqa: E402

NUM_TOKENS = 32
KS = (1, 2, 4, 8, 12, 16, 20, 24, 32)  # nine token counts
GROWTH_TOLERANCE = (1.25, 64 * 2**20)  # factor, bytes
# feature_subset: images per k kept for precision/recall (the job's default, ADM's 10k; --quick keeps 250 so that
# both of its sizes lie above it, as 50k does above 10k)
FULL = {"pretokenize": [10_000, 100_000, 1_280_000], "sweep": [5_000, 50_000], "corpus_rows": 1_280_000}
FULL |= {"feature_subset": 10_000}
QUICK = {"pretokenize": [2_000, 10_000], "sweep": [1_000, 4_000], "corpus_rows": 0, "feature_subset": 250}


# ------------------------------------------------------------------------------------------ stand-in networks
def hash_tokens(images: np.ndarray, k: int, codebook: int = 64000) -> np.ndarray:
    """uint8 [B, R, R, 3] -> int64 [B, k]: blake2b of each image's bytes as k 16-bit ids mod `codebook`."""
    digests = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=2 * k).digest() for im in images]
    return np.frombuffer(b"".join(digests), np.uint16).reshape(len(images), k).astype(np.int64) % codebook


class StandInTokenizeActor(TokenizeActor):
    """pretokenize's actor without a network: hash_tokens."""

    def __init__(self, model: str, resolution: int, num_tokens: int, use_gpu: bool, torch_threads: int | None):
        self.resolution, self.num_tokens = resolution, num_tokens

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        return hash_tokens(images, self.num_tokens).astype(np.uint16)


@dataclass
class _Cfg:
    image_size: int
    latent_size: int

    @property
    def vae(self):  # initial_noise reads cfg.vae.latent_channels
        return type("VAE", (), {"latent_channels": 3})


class StandInFlexTok:
    """tokenize: hash_tokens of the image; detokenize: returns its input, the initial noise, as the image."""

    device = torch.device("cpu")

    def __init__(self, resolution: int, num_registers: int):
        self.cfg, self.num_registers = _Cfg(resolution, resolution), num_registers

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, R, R] in [-1, 1] -> [B, n]
        images = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        return torch.from_numpy(hash_tokens(images, self.num_registers))

    def detokenize(self, prefixes, timesteps, guidance_scale, apg, noise: torch.Tensor) -> torch.Tensor:
        return noise.clamp(-1, 1)  # [J, 3, R, R]


class StandInReconstructStage(ReconstructStage):
    """The sweep's model stage with StandInFlexTok in place of the checkpoint."""

    def __init__(self, ks, settings, grid_keys, real_features, device="cpu", threads=None):
        from pipeline.eval.sweep import DecodeSettings

        self.model = StandInFlexTok(RESOLUTION, NUM_TOKENS)
        self.ks, self.s = ks, DecodeSettings(**settings)
        self.grid, self.real_features = set(grid_keys), real_features


class _Projection:
    has_classifier = False

    def __init__(self, resolution: int, dim: int = 2048):
        pooled = 3 * (resolution // 8) ** 2
        self.weight = torch.from_numpy(np.random.default_rng(0).standard_normal((pooled, dim), np.float32))

    def __call__(self, images: np.ndarray) -> dict[str, torch.Tensor]:  # uint8 [B, R, R, 3] -> [B, 2048]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        pooled = torch.nn.functional.avg_pool2d(x, 8).flatten(1)  # [B, 3 * (R/8)^2]
        return {"pool": pooled @ self.weight}


class StandInInceptionStage(InceptionStage):
    """The Inception stage with a fixed random projection in place of the network."""

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.net = _Projection(RESOLUTION)


# ------------------------------------------------------------------------------------------ measuring
def current_rss() -> int:
    """This process's private resident memory (RssAnon), bytes (Linux). The object store's shared pages that
    the driver maps while reading blocks (RssShmem) are not the driver's: they are the object store's figure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def init_ray(runtime_env: dict, num_cpus: int = 2) -> None:
    """A local Ray for a bench. Ray gives its raylet 30 s to register, which a heavily loaded machine can
    exceed; here the registration is polled for up to 10 minutes (the bench's own patience only). The raylet's
    own ~25 s wait for its agents' port files is not covered: under heavy load it still aborts."""
    import ray
    import ray._private.services as services

    get_node = services.get_node

    def patient_get_node(*args, **kwargs):
        deadline = time.monotonic() + 600
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    services.get_node = patient_get_node
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env=runtime_env,
        )
    finally:
        services.get_node = get_node


class Sampler:
    """Peak driver RSS and peak object-store use, sampled in a thread between reset() and peak()."""

    def __init__(self, period: float = 0.1):
        import ray

        self.ray, self.period = ray, period
        self.rss = self.store = 0
        self.total_store = ray.cluster_resources().get("object_store_memory", 0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last_store = 0.0
        while not self.stopped.is_set():
            self.rss = max(self.rss, current_rss())
            if time.monotonic() - last_store > 0.5:
                free = self.ray.available_resources().get("object_store_memory", self.total_store)
                self.store = max(self.store, int(self.total_store - free))
                last_store = time.monotonic()
            time.sleep(self.period)

    def reset(self) -> None:
        self.rss = current_rss()
        self.store = 0
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()

    def stop(self) -> None:
        """Before ray.shutdown(): the thread asks Ray for the object store's use."""
        self.stopped.set()
        self.thread.join()

    def peak(self) -> tuple[int, int, int]:
        """RSS peak, object-store peak, and the peak of what Python and numpy allocated (tracemalloc)."""
        time.sleep(2 * self.period)
        return self.rss, self.store, tracemalloc.get_traced_memory()[1]


@dataclass
class Row:
    job: str
    n: int
    seconds: float
    rows_per_s: float
    driver_peak_mib: float  # RssAnon above its value before the first size
    store_peak_mib: float
    files: int
    note: str = ""
    bounded_mib: float = 0.0  # what the driver may hold by design at this N (the sweep's feature subsets)
    traced_peak_mib: float = 0.0  # the peak of Python and numpy allocations during the run (tracemalloc)


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def pretokenize_at(n: int, work: Path, model: str, sampler: Sampler, base_rss: int) -> Row:
    out = work / f"corpus-{n}"
    cfg = PretokenizeConfig(model=model, inputs=synthetic_urls(n), output=str(out), batch_size=256, block_rows=256)
    sampler.reset()
    summary = run_pretokenize(cfg, log=lambda line: None, actor_cls=StandInTokenizeActor)
    rss, store, traced = sampler.peak()
    if summary.rows != n:
        raise RuntimeError(f"pretokenize wrote {summary.rows} rows, expected {n}")
    mib = 2**20
    rate = n / summary.seconds
    return Row(
        "pretokenize",
        n,
        summary.seconds,
        rate,
        (rss - base_rss) / mib,
        store / mib,
        count_files(out),
        "",
        0,
        traced / mib,
    )


def standin_inception_features(ds, weights: str, res):
    """pipeline.eval.features.with_inception_features with StandInInceptionStage (same resources)."""
    return ds.map_batches(StandInInceptionStage, fn_constructor_kwargs={"threads": res.threads}, **res.map_kwargs())


def sweep_at(n: int, work: Path, sampler: Sampler, base_rss: int, feature_subset: int) -> Row:
    """pipeline.eval.sweep_run.run_sweep, as `flextok eval sweep` calls it (in-pass reference, precision/recall
    on the bounded subset; KID off, as by default), with the model and Inception stages swapped for stand-ins.
    The driver's bounded part, per group (the originals and 9 k's): the feature statistics (float64, 2048 x
    2048) and the subset, at most min(n, Subset.capacity) rows between compactions."""
    from pipeline.data.sources import image_dataset
    from pipeline.eval import sweep_run
    from pipeline.eval.features import Resources
    from pipeline.eval.report import MetricOptions, Report
    from pipeline.eval.sweep import DecodeSettings
    from pipeline.eval.sweep_results import Subset

    sweep_run.with_inception_features = standin_inception_features  # the only stage run_sweep builds itself
    out = work / f"sweep-{n}"
    settings = DecodeSettings(timesteps=1, decode_batch=64)
    spec = sweep_run.SweepSpec(
        name="scale",
        output=str(out),
        ks=KS,
        fingerprint=sweep_run.run_fingerprint(n=n, ks=KS),
        stage=StandInReconstructStage,
        stage_kwargs=dict(ks=KS, settings=asdict(settings), grid_keys=[], real_features=True),
        model_resources=Resources(workers=1, cpus=0.5, batch_size=16),
        inception_weights="stand-in",
        inception_resources=Resources(workers=1, cpus=0.5, batch_size=256),
        chunk_images=256,
        metrics=MetricOptions(prc=True, kid=False, feature_subset=feature_subset),
        reference=sweep_run.InPassReference("stand-in", "none", "synth"),
        report=Report({}, {}, [], "recon_grid.png", True, "rFID", "scale bench, {n} images"),
    )
    sampler.reset()
    start = time.perf_counter()
    outcome = sweep_run.run_sweep(spec, lambda done: image_dataset(synthetic_urls(n), RESOLUTION).limit(n), log=_quiet)
    seconds = time.perf_counter() - start
    rss, store, traced = sampler.peak()
    if outcome.results["work"]["images"] != n:
        raise RuntimeError(f"the sweep saw {outcome.results['work']['images']} images, expected {n}")
    mib = 2**20
    groups = len(KS) + 1
    held = min(n, Subset(feature_subset).capacity)
    subsets = groups * held * (4 * 2048 + 8)  # float32 features + uint64 priority
    stats = groups * (2048 * 2048 + 2048) * 8  # float64 sums and outer-product sums (pipeline.eval.fid)
    bounded = (subsets + stats) / mib
    note = f"feature subset {feature_subset:,} per k; bounded part <= {bounded:.0f} MiB"
    peak = (rss - base_rss) / mib
    row = Row("sweep (9 k)", n, seconds, n / seconds, peak, store / mib, count_files(out), note, bounded, traced / mib)
    return row


def _quiet(line: str) -> None:
    pass


def grows(rows: list[Row]) -> bool:
    """The driver's traced peak beyond its bounded part, at the largest N, exceeds the smallest N's by more
    than the tolerance. (Traced, not RSS: RSS also holds what glibc and Arrow's memory pool keep after a free,
    which rises with the run's length and not with what the code holds; it is printed beside.)"""
    if len(rows) < 2:
        return False
    small = rows[0].traced_peak_mib - rows[0].bounded_mib
    large = rows[-1].traced_peak_mib - rows[-1].bounded_mib
    factor, extra = GROWTH_TOLERANCE
    return large > small * factor + extra / 2**20


def print_rows(rows: list[Row]) -> None:
    print(
        "| job | N | wall s | rows/s | driver traced peak MiB | driver RssAnon peak MiB (above start) | "
        "object store peak MiB | files | note |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r.job} | {r.n:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} | {r.traced_peak_mib:.0f} | "
            f"{r.driver_peak_mib:.0f} | {r.store_peak_mib:.0f} | {r.files:,} | {r.note} |",
            flush=True,
        )


def save_tiny_model(folder: Path) -> str:
    """pretokenize reads the model's identity and sizes on the driver: a random `tiny` FlexTok (never run)."""
    from flextok import FlexTok
    from flextok.config import tiny

    torch.manual_seed(0)
    FlexTok(tiny(image_size=RESOLUTION, num_registers=NUM_TOKENS)).save_pretrained(folder)
    return str(folder)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest sizes only")
    p.add_argument("--pretokenize", help="comma-separated record counts")
    p.add_argument("--sweep", help="comma-separated image counts")
    p.add_argument("--corpus-rows", type=int, help="rows of the corpus-reader bench (0: skip)")
    p.add_argument("--feature-subset", type=int, help="the sweep's feature subset per k (default 10000; --quick 250)")
    p.add_argument("--work", help="scratch folder (default: a temporary one, deleted)")
    args = p.parse_args()
    sizes = QUICK if args.quick else FULL
    pre = [int(x) for x in args.pretokenize.split(",") if x] if args.pretokenize is not None else sizes["pretokenize"]
    swp = [int(x) for x in args.sweep.split(",") if x] if args.sweep is not None else sizes["sweep"]
    corpus_rows = sizes["corpus_rows"] if args.corpus_rows is None else args.corpus_rows
    feature_subset = args.feature_subset or sizes["feature_subset"]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from pipeline.malloc import runtime_env

    register_synthetic()
    # By name: a hook defined in __main__ is pickled by value, and fsspec file-system classes hold a lock.
    pythonpath = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = runtime_env(
        {"worker_process_setup_hook": "bench.synthetic.register_synthetic", "env_vars": {"PYTHONPATH": pythonpath}}
    )
    init_ray(env)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}; {os.cpu_count()} CPUs", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        model = save_tiny_model(work / "tiny")
        tracemalloc.start()
        sampler = Sampler()
        # one small run of each job first, not reported: the driver's one-time costs (imports, Ray Data's
        # first execution, malloc arenas) would otherwise land on the smallest N and hide growth or fake it
        start = time.perf_counter()
        pretokenize_at(1_000, work / "warm-up", model, sampler, 0)
        sweep_at(500, work / "warm-up", sampler, 0, feature_subset)
        print(f"warm-up (pretokenize 1,000, sweep 500): {time.perf_counter() - start:.0f} s", flush=True)
        base = current_rss()
        rows: list[Row] = []
        for n in pre:
            rows.append(pretokenize_at(n, work, model, sampler, base))
            print_rows(rows[-1:])
        if grows(rows):
            failed.append("pretokenize")
        sweep_rows: list[Row] = []
        for n in swp:
            sweep_rows.append(sweep_at(n, work, sampler, base, feature_subset))
            print_rows(sweep_rows[-1:])
        if grows(sweep_rows):
            failed.append("sweep")
        print()
        print_rows(rows + sweep_rows)
        if corpus_rows:
            from bench.corpus import corpus_bench

            tracemalloc.stop()  # tracing every allocation slowed the readers 2-3x (docs/performance.md)
            corpus_bench(corpus_rows, work)
        sampler.stop()
    ray.shutdown()
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    print(f"driver ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if failed:
        print(f"FAIL: driver memory grows with N: {', '.join(failed)}")
        return 1
    print("driver memory flat in N (within 25% + 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
