"""Child process of `bench/tokenizer.py --malloc-compare --official-src DIR`: the release's own code
(apple/ml-flextok's `flextok` package, importable from PYTHONPATH) timed on the same exported weights and
inputs as our children. Imports nothing of ours (both packages are named `flextok`); prints one JSON line.

    PYTHONPATH=<ml-flextok checkout>:<its deps> python bench/official_child.py FOLDER BATCH TIMESTEPS GUIDANCE K REPEATS
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from flextok.flextok_wrapper import FlexTokFromHub


def main() -> None:
    folder, batch, timesteps, guidance, k, repeats = sys.argv[1:7]
    batch, timesteps, k, repeats, guidance = int(batch), int(timesteps), int(k), int(repeats), float(guidance)
    torch.manual_seed(0)
    model = FlexTokFromHub.from_pretrained(folder).eval()
    images = torch.rand(batch, 3, 256, 256) * 2 - 1  # the same draw as bench/tokenizer.py's children
    out: dict = {"code": sys.modules["flextok"].__file__}
    with torch.no_grad():
        tokens = model.tokenize(images)  # list of [1, n]
        prefixes = [t[:, :k] for t in tokens]
        calls = {
            "tokenize": lambda: model.tokenize(images),
            "detokenize": lambda: model.detokenize(
                prefixes,
                timesteps=timesteps,
                guidance_scale=guidance,
                perform_norm_guidance=True,
                generator=torch.Generator().manual_seed(0),
                verbose=False,
            ),
        }
        for op, fn in calls.items():
            fn()  # warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            out[op] = best
            out[op + "_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
    out["tokens_sha"] = hash(tuple(torch.cat(tokens).flatten().tolist()))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
