"""Pretokenization: input shards -> decode (Ray tasks) -> tokenize (a pool of actors) -> commit per shard.

    cfg = PretokenizeConfig(model="ckpt/", inputs=["shards/*.tar"], output="corpus/")
    summary = run_pretokenize(cfg)

The plan, top to bottom:
    one row per input shard still to do
    -> read_units (CPU tasks): records -> RGB -> ADM crop -> augmentation views; bad records become error
       rows; each shard ends with a trailer row that says how many rows it sent
    -> TokenizeActor (ActorPoolStrategy, one model each, GPU when asked): images -> tokens[:, :K]
    -> the driver: gathers each shard's rows; when all have arrived it commits the shard (corpus.commit_unit).

Exactly once: the unit of work is an input shard. A shard's rows count only once its marker exists, and its
files have names fixed by the shard, so a rerun skips committed shards, rewrites uncommitted ones in place,
and never duplicates. Rows are deduplicated by (record, aug) before commit, so a retried batch (an actor that
died) cannot add a row twice, and sorted, so files are the same whatever order Ray delivers them in.
Tokens are ~0.5% of the image bytes, so one committer on the driver is not a bottleneck.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flextok.errors import SettingError

from ..malloc import runtime_env
from .corpus import (
    DATA_DIR,
    MANIFEST,
    TMP_DIR,
    CorpusMeta,
    adaptive_stats,
    commit_unit,
    join,
    output_fs,
    read_markers,
    tokens_table,
    write_summary,
)
from .preprocess import AUGMENT_MODES, PREPROCESSING, to_model_input
from .sources import InputShard, batched, decode_records, expand_inputs

# Rows between the stages: decoded images (binary, R*R*3 bytes) in, token lists out. Error rows carry
# error_class/error and no image; the trailer row of a shard carries `expected` (its number of other rows).
_COMMON = [
    ("unit", pa.string()),
    ("record", pa.int32()),
    ("key", pa.string()),
    ("label", pa.int32()),
    ("source", pa.string()),
    ("aug", pa.int16()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("expected", pa.int64()),
]
IMAGES_SCHEMA = pa.schema(_COMMON + [("image", pa.binary())])
TOKENS_SCHEMA = pa.schema(_COMMON + [("tokens", pa.list_(pa.uint16()))])


@dataclass
class PretokenizeConfig:
    model: str  # checkpoint folder or hub id
    inputs: list[str]  # URLs or globs: .tar shards, .parquet files, image folders
    output: str  # output folder URL
    resolution: int | None = None  # default: the model's image size (the only one it accepts)
    batch_size: int = 64  # images per tokenize call
    workers: int = 1  # tokenizer actors (the job plans these from the cluster: jobs/resources.py)
    gpus_per_worker: float = 0.0  # GPUs per tokenizer actor (> 0: the actor runs on CUDA, or fails)
    cpus_per_worker: float = 1.0  # CPUs reserved per tokenizer actor
    torch_threads: int | None = None  # torch threads per actor; None: cpus_per_worker
    num_tokens: int | None = None  # store each sequence's first K tokens; None: all
    augment: str = "none"  # none | random-flip | flip | tencrop (pipeline.data.preprocess)
    labels: str | None = None  # labels CSV for folder inputs (default: the folder's labels.csv)
    rows_per_file: int = 100_000  # upper bound on rows per data file (a shard's rows never share a file)
    folder_chunk: int = 1000  # images per unit of work when an input is a folder
    block_rows: int = 64  # decoded images per block leaving a read task
    adaptive: str | None = None  # "psnr:TARGET" | "inception:TARGET": each row its own shortest good prefix
    ladder: str | None = None  # adaptive: the k's to choose from, "1,2,4"; None: powers of two up to the registers
    adaptive_timesteps: int = 25  # adaptive: decoder steps of the search's reconstructions
    adaptive_guidance_scale: float = 1.0  # adaptive: their guidance scale
    length_predictor: str | None = None  # adaptive: a predictor folder; k from predicted PSNR, no decoder call


@dataclass
class Summary:
    shards: int = 0  # input shards in this run's plan
    skipped: int = 0  # already committed before this run
    committed: int = 0  # committed by this run
    rows: int = 0  # rows written by this run
    failed: int = 0  # bad records found by this run
    seconds: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (unix time, token rows) per block received
    manifest: dict = field(default_factory=dict)


class JobInputError(SettingError):
    """The configuration or the output folder does not allow the job to run (one-line reason naming the
    PretokenizeConfig fields at fault)."""


EXCLUSIVE = "num_tokens and adaptive exclude each other (the ladder's largest k is the cap)"


# ------------------------------------------------------------------------------------------ stages
def read_units(batch: pa.Table, resolution: int, augment: str, block_rows: int) -> Iterator[pa.Table]:
    """Ray Data task: rows (unit, shard JSON) -> image tables of at most `block_rows` rows + one trailer."""
    for unit, text in zip(batch.column("unit").to_pylist(), batch.column("shard").to_pylist(), strict=True):
        sent = 0
        for chunk in batched(decode_records(InputShard.from_json(text), resolution, augment), block_rows):
            yield pa.Table.from_pylist([_image_row(unit, r) for r in chunk], schema=IMAGES_SCHEMA)
            sent += len(chunk)
        trailer = {"unit": unit, "record": -1, "key": "", "source": "", "aug": 0, "expected": sent}
        yield pa.Table.from_pylist([trailer], schema=IMAGES_SCHEMA)


def _image_row(unit: str, r) -> dict:
    image = None if r.image is None else r.image.tobytes()
    return {
        "unit": unit,
        "record": r.record,
        "key": r.key,
        "label": r.label,
        "source": r.source,
        "aug": r.aug,
        "error_class": r.error_class,
        "error": r.error,
        "image": image,
    }


class TokenizeActor:
    """Ray Data actor: holds one FlexTok; image rows -> token rows (other rows pass through)."""

    def __init__(self, model: str, resolution: int, num_tokens: int, use_gpu: bool, torch_threads: int | None):
        import torch

        from flextok import FlexTok

        from ..devices import stage_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = stage_device("the pretokenize tokenizer actor", use_gpu)
        self.model = FlexTok.from_pretrained(model, map_location=device).eval()
        self.resolution, self.num_tokens = resolution, num_tokens

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, R, R, 3] -> uint16 [B, K]."""
        tokens = self.model.tokenize(to_model_input(images))  # [B, n] int64
        return tokens[:, : self.num_tokens].cpu().numpy().astype(np.uint16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        R, K, n = self.resolution, self.num_tokens, batch.num_rows
        has_image = pc.is_valid(batch.column("image"))
        mask = has_image.to_numpy(zero_copy_only=False)  # [n] bool
        tokens = np.zeros((n, K), np.uint16)  # rows without an image stay null in the output
        if mask.any():
            raw = bytearray(b"".join(batch.column("image").filter(has_image).to_pylist()))  # writable for torch
            tokens[mask] = self.tokenize(np.frombuffer(raw, np.uint8).reshape(-1, R, R, 3))
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * K)
        column = pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1)), mask=pa.array(~mask))
        out = batch.drop_columns(["image"])
        return out.append_column(TOKENS_SCHEMA.field("tokens"), column).cast(TOKENS_SCHEMA)


# ------------------------------------------------------------------------------------------ planning
def unit_name(shard: InputShard) -> str:
    """File-name-safe, stable name of a shard's unit of work: readable stem + hash of the shard id."""
    base = posixpath.basename(shard.url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        base = base.removesuffix(suffix)
    if shard.kind == "folder":
        base += f"-{shard.index:06d}"
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", base)[:60]
    return f"{base}-{hashlib.sha1(shard.id.encode()).hexdigest()[:10]}"


def tokenizer_meta(cfg: PretokenizeConfig) -> CorpusMeta:
    """The model's identity and sizes, from its checkpoint files (the driver never holds the weights), checked
    against the configuration."""
    from flextok.checkpoint import is_url, read_checkpoint_info

    info = read_checkpoint_info(cfg.model)
    size, n = info.cfg.image_size, info.cfg.num_registers
    if cfg.resolution is not None and cfg.resolution != size:
        raise JobInputError(
            f"resolution {cfg.resolution}: the model {cfg.model} takes {size}x{size} images", "resolution"
        )
    if cfg.num_tokens is not None and not 1 <= cfg.num_tokens <= n:
        raise JobInputError(f"num_tokens {cfg.num_tokens}: the model makes {n} tokens, so 1 <= K <= {n}", "num_tokens")
    if info.codebook_size > 65536:
        raise JobInputError(f"codebook size {info.codebook_size} does not fit the corpus's uint16 tokens")
    if cfg.augment not in AUGMENT_MODES:
        raise JobInputError(f"augment {cfg.augment}: choose one of {sorted(AUGMENT_MODES)}", "augment")
    is_folder = is_url(cfg.model) or Path(cfg.model).is_dir()
    name = posixpath.basename(str(cfg.model).rstrip("/")) if is_folder else cfg.model
    digest = info.digest()
    adaptive = predictor_meta(cfg, info.cfg, digest) if cfg.length_predictor else adaptive_meta(cfg, n)
    return CorpusMeta(
        tokenizer=name,
        tokenizer_sha256=digest,
        codebook_size=info.codebook_size,
        num_registers=n,
        num_tokens=int(adaptive["adaptive_ladder"].split(",")[-1]) if adaptive else (cfg.num_tokens or n),
        resolution=size,
        augment=cfg.augment,
        preprocessing=PREPROCESSING,
        **adaptive,
    )


def adaptive_meta(cfg: PretokenizeConfig, num_registers: int) -> dict[str, str]:
    """The CorpusMeta fields of --adaptive (empty without it); bad values raise JobInputError (one line)."""
    if not cfg.adaptive:
        if cfg.ladder:
            raise JobInputError("ladder needs adaptive", "ladder", "adaptive")
        return {}
    from .adaptive import parse_adaptive, parse_ladder
    from .adaptive_stage import AdaptiveSettings

    if cfg.num_tokens is not None:
        raise JobInputError(EXCLUSIVE, "num_tokens", "adaptive")
    if cfg.adaptive_timesteps < 1:
        raise JobInputError(
            f"adaptive_timesteps {cfg.adaptive_timesteps}: need at least 1 decoder step", "adaptive_timesteps"
        )
    criterion = parse_adaptive(cfg.adaptive)  # SettingError: one line naming the field
    ladder = parse_ladder(cfg.ladder, num_registers)
    settings = AdaptiveSettings(
        criterion.name, criterion.target, tuple(ladder), cfg.adaptive_timesteps, cfg.adaptive_guidance_scale
    )
    return {
        "adaptive_criterion": criterion.name,
        "adaptive_target": f"{criterion.target:g}",
        "adaptive_ladder": ",".join(map(str, ladder)),
        "adaptive_decoding": settings.decoding_text(),
    }


def predictor_meta(cfg: PretokenizeConfig, model_cfg, tokenizer_sha256: str) -> dict[str, str]:
    """The CorpusMeta fields of --adaptive with --length-predictor: the rule, the predictor's ladder, and the
    predictor (path + sha256) in place of decoder settings. A predictor that does not fit the tokenizer, or a
    --ladder other than its own, is a JobInputError (one line)."""
    from .length_predictor import parse_rule, predictor_digest, read_config

    where = f"length_predictor {cfg.length_predictor}"
    if not cfg.adaptive:
        raise JobInputError(
            "length_predictor needs adaptive psnr:TARGET or psnr-slope:LAMBDA", "length_predictor", "adaptive"
        )
    if cfg.num_tokens is not None:
        raise JobInputError(EXCLUSIVE, "num_tokens", "adaptive")
    if "://" in str(cfg.length_predictor):
        raise JobInputError(f"{where}: a local folder is needed", "length_predictor")
    rule = parse_rule(cfg.adaptive)
    try:
        pcfg = read_config(cfg.length_predictor)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise JobInputError(f"length_predictor {cfg.length_predictor}: {e}", "length_predictor") from None
    ladder = list(pcfg.ladder)
    if cfg.ladder and cfg.ladder.replace(" ", "") != ",".join(map(str, ladder)):
        raise JobInputError(f"ladder {cfg.ladder}: the length predictor predicts the k's {ladder} only", "ladder")
    if pcfg.num_registers != model_cfg.num_registers or tuple(pcfg.fsq_levels) != tuple(model_cfg.fsq_levels):
        raise JobInputError(
            f"{where}: made for a tokenizer with other registers or FSQ levels than {cfg.model}", "length_predictor"
        )
    if pcfg.tokenizer_sha256 and pcfg.tokenizer_sha256 != tokenizer_sha256:
        raise JobInputError(
            f"{where}: trained on another tokenizer's tokens (digest differs from {cfg.model})", "length_predictor"
        )
    return {
        "adaptive_criterion": rule.name,
        "adaptive_target": f"{rule.value:g}",
        "adaptive_ladder": ",".join(map(str, ladder)),
        "adaptive_decoding": f"length-predictor={cfg.length_predictor},sha256={predictor_digest(cfg.length_predictor)}",
    }


def check_output(markers: dict[str, dict], units: dict[str, InputShard], meta: CorpusMeta, output: str) -> None:
    """Committed units must come from the same tokenizer and settings, and folder chunks from the same files."""
    want = meta.to_kv()
    for unit, marker in markers.items():
        if marker["metadata"] != want:
            diff = sorted(k for k in want if marker["metadata"].get(k) != want[k])
            raise JobInputError(
                f"{output} holds shards written with other settings ({', '.join(diff)}); use a new output", "output"
            )
        if unit in units and marker["digest"] != units[unit].digest:
            raise JobInputError(
                f"{units[unit].url}: files or labels changed since shard {unit} was committed; use a new output",
                "output",
            )


def _remove_stale(fs, root: str, todo: list[str]) -> None:
    """Drop what a crashed run left: its temporary files and data files of units without a marker."""
    if fs.exists(join(root, TMP_DIR)):
        fs.rm(join(root, TMP_DIR), recursive=True)
    for unit in todo:
        for path in fs.glob(join(root, DATA_DIR, f"{unit}-[0-9][0-9][0-9][0-9].parquet")):
            fs.rm(path)


def build_dataset(todo: list[tuple[str, InputShard]], cfg: PretokenizeConfig, meta: CorpusMeta, actor_cls: type):
    """The Ray Data plan for the shards still to do."""
    import ray

    items = [{"unit": unit, "shard": shard.to_json()} for unit, shard in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    read_kwargs = {"resolution": meta.resolution, "augment": cfg.augment, "block_rows": cfg.block_rows}
    # The memory request (a worker with its libraries, ~400 MiB measured, plus a few blocks of decoded views)
    # also keeps Ray from fusing decoding into the tokenizer actors, as it does for equal resource requests.
    memory = 512 * 2**20 + 3 * cfg.block_rows * meta.resolution**2 * 3
    ds = ds.map_batches(
        read_units, batch_size=1, batch_format="pyarrow", fn_kwargs=read_kwargs, num_cpus=1, memory=memory
    )
    actor_kwargs = {
        "model": cfg.model,
        "resolution": meta.resolution,
        "num_tokens": meta.num_tokens,
        "use_gpu": cfg.gpus_per_worker > 0,
        "torch_threads": cfg.torch_threads or max(1, int(cfg.cpus_per_worker)),
    }
    if meta.adaptive:
        actor_kwargs["adaptive"] = {
            "criterion": meta.adaptive_criterion,
            "target": float(meta.adaptive_target),
            "ladder": meta.ladder,
            "timesteps": cfg.adaptive_timesteps,
            "guidance_scale": cfg.adaptive_guidance_scale,
        }
        if cfg.length_predictor:
            actor_kwargs["adaptive"]["length_predictor"] = str(Path(cfg.length_predictor).resolve())
    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_gpus=cfg.gpus_per_worker,
        num_cpus=cfg.cpus_per_worker,
    )


# ------------------------------------------------------------------------------------------ the job
class _Gather:
    """Per-unit buffers on the driver: token/error rows deduplicated by (record, aug), and the number of
    rows the unit's trailer announced."""

    def __init__(self):
        self.tables: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, set[tuple[int, int]]] = {}
        self.expected: dict[str, int] = {}

    def add(self, batch: pa.Table) -> list[str]:
        """Take a block of token rows; return the units it completed."""
        units = batch.column("unit").unique().to_pylist()
        for unit in units:
            rows = batch.filter(pc.equal(batch.column("unit"), unit))
            trailer = pc.is_valid(rows.column("expected"))
            for n in rows.filter(trailer).column("expected").to_pylist():
                self.expected[unit] = n
            rows = rows.filter(pc.invert(trailer))
            seen = self.seen.setdefault(unit, set())
            fresh = []
            for record, aug in zip(rows.column("record").to_pylist(), rows.column("aug").to_pylist(), strict=True):
                fresh.append((record, aug) not in seen)
                seen.add((record, aug))
            self.tables.setdefault(unit, []).append(rows.filter(pa.array(fresh, pa.bool_())))
        return [u for u in units if self.expected.get(u) == len(self.seen.get(u, ()))]

    def pop(self, unit: str) -> pa.Table:
        """All rows of a completed unit, in (record, aug) order."""
        self.expected.pop(unit)
        self.seen.pop(unit, None)
        tables = self.tables.pop(unit, [])
        table = pa.concat_tables(tables) if tables else TOKENS_SCHEMA.empty_table()
        return table.sort_by([("record", "ascending"), ("aug", "ascending")])


def _corpus_rows(rows: pa.Table) -> pa.Table:
    """The good rows of a unit in the corpus schema."""
    good = rows.filter(pc.is_null(rows.column("error")))
    return tokens_table(*(good.column(name) for name in ("key", "label", "tokens", "source", "aug")))


def run_pretokenize(
    cfg: PretokenizeConfig,
    log: Callable[[str], None] = print,
    on_commit: Callable[[str, dict], None] | None = None,
    actor_cls: type = TokenizeActor,
    meta: CorpusMeta | None = None,
) -> Summary:
    """Run (or resume) the job; returns what this run did. `on_commit(unit, marker)` is called after each
    shard is committed; `actor_cls` replaces the tokenizer actor (e.g. for fault-injection tests); `meta`:
    `tokenizer_meta(cfg)` when the caller already has it."""
    import ray

    t0 = time.perf_counter()
    if not cfg.inputs:
        raise JobInputError("no inputs given", "inputs")
    if cfg.rows_per_file < 1 or cfg.batch_size < 1 or cfg.folder_chunk < 1:
        raise JobInputError(
            "rows_per_file, batch_size and folder_chunk must be positive", "rows_per_file", "batch_size", "folder_chunk"
        )
    meta = meta or tokenizer_meta(cfg)
    shards = expand_inputs(cfg.inputs, cfg.labels, cfg.folder_chunk)
    units = {unit_name(s): s for s in shards}
    fs, root = output_fs(cfg.output)
    markers = read_markers(fs, root)
    check_output(markers, units, meta, cfg.output)
    todo = [(u, s) for u, s in units.items() if u not in markers]
    summary = Summary(shards=len(units), skipped=len(units) - len(todo))
    others = sorted(set(markers) - set(units))
    if others:
        log(f"[pretokenize] note: {len(others)} committed shard(s) in {cfg.output} are not among these inputs")
    log(f"[pretokenize] {len(units)} input shard(s): {summary.skipped} already committed, {len(todo)} to do")
    if not todo and fs.exists(join(root, MANIFEST)):
        summary.seconds = time.perf_counter() - t0
        return summary
    if fs.exists(join(root, MANIFEST)):
        fs.rm(join(root, MANIFEST))  # the output is incomplete until this run ends
    _remove_stale(fs, root, [u for u, _ in todo])
    if meta.adaptive and actor_cls is TokenizeActor:
        from .adaptive_stage import AdaptiveTokenizeActor

        actor_cls = AdaptiveTokenizeActor
    if todo:
        if not ray.is_initialized():
            ray.init(runtime_env=runtime_env())  # pipeline.malloc: no mmap churn in the actors
        gather, last_log = _Gather(), 0.0
        ds = build_dataset(todo, cfg, meta, actor_cls)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            token_rows = batch.num_rows - batch.column("tokens").null_count
            summary.arrivals.append((time.time(), token_rows))
            for unit in gather.add(batch):
                marker = _commit(fs, root, unit, units[unit], gather.pop(unit), meta, cfg)
                markers[unit] = marker
                summary.committed += 1
                summary.rows += marker["written"]
                summary.failed += marker["failed"]
                if on_commit is not None:
                    on_commit(unit, marker)
                now = time.perf_counter()
                if now - last_log > 2.0 or summary.committed == len(todo):
                    rate = summary.rows / max(now - t0, 1e-9)
                    log(
                        f"[pretokenize] {summary.committed}/{len(todo)} shards committed, {summary.rows} rows, "
                        f"{summary.failed} bad records, {rate:.1f} rows/s"
                    )
                    last_log = now
        missing = [u for u, _ in todo if u not in markers]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) did not complete, e.g. {missing[:3]}; rerun to resume")
    _remove_stale(fs, root, [])
    summary.manifest = write_summary(fs, root, markers, meta)
    summary.seconds = time.perf_counter() - t0
    return summary


def _commit(fs, root, unit: str, shard: InputShard, rows: pa.Table, meta: CorpusMeta, cfg) -> dict:
    bad = rows.filter(pc.is_valid(rows.column("error")))
    errors = [
        {"key": r["key"], "source": r["source"], "error_class": r["error_class"], "message": r["error"]}
        for r in bad.select(["key", "source", "error_class", "error"]).to_pylist()
    ]
    marker = {
        "url": shard.url,
        "kind": shard.kind,
        "index": shard.index,
        "digest": shard.digest,
        "read": len(pc.unique(rows.column("record"))),
        "failed": len(errors),
        "errors": errors,
    }
    if meta.adaptive:
        good = rows.filter(pc.is_null(rows.column("error")))
        if "adaptive_missed" in good.column_names:
            missed, decodes = good.column("adaptive_missed").to_numpy(), good.column("adaptive_decodes").to_numpy()
        else:  # a unit without images
            missed, decodes = np.zeros(0, bool), np.zeros(0, np.int16)
        lengths = pc.list_value_length(good.column("tokens")).to_numpy(zero_copy_only=False)
        marker["adaptive"] = adaptive_stats(lengths, missed, decodes)
    return commit_unit(fs, root, unit, _corpus_rows(rows), meta, cfg.rows_per_file, marker)
