"""Split the shared ImageNet sample for the small model: photos whose class index is a multiple of 20 are held
out (50), the rest train it (200). Writes models/flextok-small/{train,heldout}.csv and copies each part into
runs/small-train and runs/small-heldout (image folders with their labels.csv) for the jobs to read.

    python models/make_split.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=os.environ.get("FLEXTOK_SHARED", str(REPO.parent / "shared")))
    args = p.parse_args()
    sample = Path(args.shared) / "data" / "imagenet-sample"
    with open(sample / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    parts = {
        "train": [r for r in rows if int(r["class_index"]) % 20 != 0],
        "heldout": [r for r in rows if int(r["class_index"]) % 20 == 0],
    }
    for name, part in parts.items():
        folder = REPO / "runs" / f"small-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for r in part:
            shutil.copyfile(sample / r["file"], folder / r["file"])
        for path in (REPO / "models" / "flextok-small" / f"{name}.csv", folder / "labels.csv"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(part)
        print(f"{name}: {len(part)} photos -> {folder}")


if __name__ == "__main__":
    main()
