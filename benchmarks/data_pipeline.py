"""Host cost of the PLM data pipeline, and how much of it the background prefetch hides.

    python benchmarks/data_pipeline.py                     # seq 512, reuse 256, 16 rows, 85 targets
    python benchmarks/data_pipeline.py --device-ms 56      # the simulated device step (H200, compiled base model)

`xlnet pretrain` builds each batch on the host (spans, permutation ranks, target mapping) while, on a GPU, the
previous step runs on the device. This script times one batch of PLMSampler at the GPU benchmark shape, then a
training loop against a simulated device, once with the batches built inline and once through Prefetcher (depth
2). Each simulated step first holds the GIL for --host-ms (the host launching the step's kernels: Python, guards,
launches), then waits out the rest of --device-ms with the GIL released (as a CUDA synchronize does); each
--host-ms value is one row. Inline, a step costs the batch plus the device time; prefetched, ideally the larger of
the two. The corpus is synthetic (random ids, a sentence break every ~20 tokens, 70% of pieces word starts): the
pipeline's cost does not depend on the text.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> None:
    from xlnet.data.plm import PLMConfig, PLMSampler, Prefetcher
    from xlnet.pretrain import DEVICE_INPUTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reuse", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--targets", type=int, default=85)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device-ms", type=float, default=56.0, help="simulated device time per step")
    ap.add_argument("--host-ms", type=float, nargs="+", default=[0.0, 30.0, 50.0, 56.0],
                    help="of each step, the time the launching thread holds the GIL (one row per value)")
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

    def batch_ms(dense: bool) -> tuple[float, float]:
        s, times = sampler(), []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            batch = s.batch_at(step, 0, dense)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[1:]), sum(v.nbytes for v in batch.values()) / 2**20

    def loop(depth: int, host_ms: float) -> float:
        # what `xlnet pretrain` builds: the compact batch, the fields the model needs
        batches = Prefetcher(sampler(), depth=depth, keys=DEVICE_INPUTS["plm"], dense=False)
        next(batches)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
            start = time.perf_counter()
            launched, done = start + host_ms / 1000, start + args.device_ms / 1000
            while time.perf_counter() < launched:  # pure Python: the GIL is held but for forced switches
                pass
            time.sleep(max(0.0, done - time.perf_counter()))  # the device finishes; the GIL is free meanwhile
        batches.close()
        return 1000 * (time.perf_counter() - t0) / args.steps

    print(f"# seq {args.seq}, reuse {args.reuse}, {args.batch} rows, {args.targets} targets; median of {args.steps}")
    for dense in (True, False):
        ms, mib = batch_ms(dense)
        print(f"one {'dense' if dense else 'compact'} batch on the host: {ms:.1f} ms, {mib:.2f} MiB")
    print(f"training loop against a simulated {args.device_ms:.1f} ms device step, ms per step:")
    print("| host holds the GIL, ms | batches inline | prefetched (depth 2) | prefetch speed-up |")
    print("|---:|---:|---:|---:|")
    for host_ms in args.host_ms:
        inline, ahead = loop(0, host_ms), loop(2, host_ms)
        print(f"| {host_ms:.0f} | {inline:.1f} | {ahead:.1f} | {inline / ahead:.2f}x |")


if __name__ == "__main__":
    main()
