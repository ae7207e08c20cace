"""Host cost of the PLM data pipeline, and how much of it the background prefetch hides.

    python benchmarks/data_pipeline.py                     # seq 512, reuse 256, 16 rows, 85 targets
    python benchmarks/data_pipeline.py --device-ms 56      # the simulated device step (H200, compiled base model)

`xlnet pretrain` builds each batch on the host (spans, permutation ranks, target mapping) while, on a GPU, the
previous step runs on the device. This script times one batch of PLMSampler at the GPU benchmark shape, then a
training loop against a simulated device: each step waits --device-ms with the GIL released (as a CUDA
synchronize does), once with the batches built inline and once through Prefetcher (depth 2). Inline, a step costs
the batch plus the device time; prefetched, the larger of the two. The corpus is synthetic (random ids, a
sentence break every ~20 tokens, 70% of pieces word starts): the pipeline's cost does not depend on the text.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    from xlnet.data.plm import PLMConfig, PLMSampler, Prefetcher

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reuse", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--targets", type=int, default=85)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device-ms", type=float, default=56.0, help="simulated device time per step")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    n = max(4_000_000, args.batch * args.seq * (args.steps + 4) * 2)
    tokens = rng.integers(9, args.vocab, n).astype(np.int32)
    sent = np.cumsum(rng.random(n) < 0.05) % 2 == 0
    word_start = rng.random(args.vocab) < 0.7
    cfg = PLMConfig(seq_len=args.seq, reuse_len=args.reuse, batch_size=args.batch, num_predict=args.targets)

    def sampler() -> PLMSampler:
        return PLMSampler(tokens, sent, word_start, cfg)

    s = sampler()
    next(s)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        next(s)
        times.append(time.perf_counter() - t0)
    batch_ms = 1000 * statistics.median(times)

    def loop(depth: int) -> float:
        batches = Prefetcher(sampler(), depth=depth)
        next(batches)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
            time.sleep(args.device_ms / 1000)  # the device step; the GIL is free meanwhile
        batches.close()
        return 1000 * (time.perf_counter() - t0) / args.steps

    inline, ahead = loop(0), loop(2)
    print(f"# seq {args.seq}, reuse {args.reuse}, {args.batch} rows, {args.targets} targets; median of {args.steps}")
    print("| | ms per step |")
    print("|---|---:|")
    print(f"| one batch on the host | {batch_ms:.1f} |")
    print(f"| simulated device step | {args.device_ms:.1f} |")
    print(f"| loop, batches inline | {inline:.1f} |")
    print(f"| loop, prefetched (depth 2) | {ahead:.1f} |")
    print(f"prefetch: {inline / ahead:.2f}x the steps per second of the inline loop")


if __name__ == "__main__":
    main()
