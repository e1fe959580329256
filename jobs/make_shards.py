"""Write webdataset shards from an image folder (+ optional labels CSV).

    python jobs/make_shards.py --input photos/ --labels photos/labels.csv --output shards/ --shard-size 1000

Each sample is `<key>.<ext>` with the original image bytes (`.jpeg` written as `.jpg`) and `<key>.cls` when it
has a label. key = the path relative to the folder without its extension, with '.' replaced by '_' (webdataset
splits a sample's key at the first dot). Shards are `<prefix>-000000.tar`, ...; each is written by webdataset's
TarWriter under a temporary name and renamed; tar headers carry no time or owner, so reruns make identical files.
"""

from __future__ import annotations

import argparse

from jobs.common import fail, parse_args, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards", description="Image folder (+ labels CSV) -> webdataset shards.")
    p.add_argument("--input", help="image folder URL (required)")
    p.add_argument("--labels", help="labels CSV (file,class_index); default: the folder's labels.csv if any")
    p.add_argument("--output", help="output folder URL (required)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    return p


def sample_name(rel: str) -> tuple[str, str]:
    """Relative image path -> (webdataset key, extension)."""
    stem, ext = rel.rsplit(".", 1)
    ext = ext.lower()
    return stem.replace(".", "_"), "jpg" if ext == "jpeg" else ext


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if not args.input or not args.output:
        fail("--input and --output are required")
    if args.shard_size < 1:
        fail(f"--shard-size must be positive, got {args.shard_size}")
    from webdataset import TarWriter

    from pipeline.data.corpus import join, output_fs
    from pipeline.data.sources import InputError, expand_inputs

    try:
        shards = expand_inputs([args.input], args.labels, folder_chunk=args.shard_size)
    except InputError as e:
        fail(str(e))
    if any(s.kind != "folder" for s in shards):
        fail(f"--input {args.input} must be an image folder")
    out_fs, out_root = output_fs(args.output)
    out_fs.makedirs(out_root, exist_ok=True)
    samples = 0
    for i, shard in enumerate(shards):
        in_fs, in_root = output_fs(shard.url)
        path = join(out_root, f"{args.prefix}-{i:06d}.tar")
        with (
            out_fs.open(path + ".tmp", "wb") as f,
            TarWriter(f, encoder=False, user="", group="", mode=0o644, mtime=0) as tar,
        ):
            for rel, label in zip(shard.files, shard.labels, strict=True):
                key, ext = sample_name(rel)
                sample = {"__key__": key, ext: in_fs.cat_file(join(in_root, rel))}
                if label is not None:
                    sample["cls"] = str(label).encode()
                tar.write(sample)
        out_fs.mv(path + ".tmp", path)
        samples += len(shard.files)
        print(f"[make_shards] {path}: {len(shard.files)} samples")
    print(f"make_shards: {samples} samples in {len(shards)} shard(s) -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
