"""Largest PLM training batch that fits on one GPU, with and without activation checkpointing.

    python benchmarks/max_batch.py                        # XLNet-large, seq 512, 85 targets, mem 384, bf16 autocast
    python benchmarks/max_batch.py --preset base --json-out base.json

For each setting the model (ours, attn_impl="fast", dropout 0.1) and a fused AdamW are built once; batches are
probed by doubling from 1 until a step runs out of memory, then by bisection between the last batch that fitted
and the first that did not. A batch "fits" when four full training steps (forward with last step's memory,
backward, optimizer step) finish; the table gives that batch, its tokens/s (median of steps 2-4 of the
probe) and torch.cuda.max_memory_allocated. Batches come from throughput.plm_batch (random tokens in the PLM layout).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (batches and configs shared with the throughput benchmark)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="large")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--targets", type=int, default=85)
    ap.add_argument("--mem", type=int, default=384)
    ap.add_argument("--max-batch", type=int, default=1024, help="stop doubling here")
    ap.add_argument("--json-out", default=None)
    return ap.parse_args(argv)


def build(args, checkpointing: bool):
    from xlnet.model import XLNetLMHeadModel
    from xlnet.training import apply_activation_checkpointing

    torch.manual_seed(0)
    model = XLNetLMHeadModel(throughput.our_config(args, "fast")).cuda().train()
    if checkpointing:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    return model, opt


def steps(model, opt, args, batch: int, n: int) -> list[float]:
    """n training steps at this batch (memory carried across them); seconds per step."""
    args.batch = batch
    x = throughput.plm_batch(args, model.config.vocab_size, "cuda")
    mems, times = None, []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**x, mems=mems)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mems = out.mems
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def fits(model, opt, args, batch: int) -> float | None:
    """Median seconds of steps 2-4 at this batch, or None when it runs out of memory (the timing comes from the
    probe itself: a second run after failed probes could fail on a fragmented cache)."""
    try:
        torch.cuda.reset_peak_memory_stats()
        return statistics.median(steps(model, opt, args, batch, 4)[1:])
    except torch.OutOfMemoryError:
        return None
    finally:
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def largest(model, opt, args) -> dict:
    """The largest batch that fits, its step time and peak memory, and whether the search stopped at
    --max-batch with everything fitting."""
    best, bad, b = dict(max_batch=0), None, 1

    def probe(batch: int) -> bool:
        t = fits(model, opt, args, batch)
        if t is not None and batch > best["max_batch"]:
            best.update(max_batch=batch, step_s=t, tokens_per_s=batch * args.seq / t,
                        max_alloc_gib=torch.cuda.max_memory_allocated() / 2**30)
        return t is not None

    while b <= args.max_batch:
        if not probe(b):
            bad = b
            break
        b *= 2
    while bad is not None and bad - best["max_batch"] > 1:
        mid = (best["max_batch"] + bad) // 2
        if not probe(mid):
            bad = mid
    return dict(best, capped=bad is None)


def main(argv=None) -> None:
    args = parse_args(argv)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, seq=args.seq, targets=args.targets,
                mem=args.mem, date=time.strftime("%Y-%m-%d"))
    rows = []
    for checkpointing in (False, True):
        model, opt = build(args, checkpointing)
        row = dict(preset=args.preset, activation_checkpointing=checkpointing, **largest(model, opt, args))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json_out:  # after each setting, so a run cut short keeps what it measured
            Path(args.json_out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    print(f"# {meta['date']} {meta['gpu']}, torch {meta['torch']}; {args.preset}, seq {args.seq}, "
          f"{args.targets} targets, mem {args.mem}, bf16 autocast, fused AdamW")
    print("| activation checkpointing | largest batch | tokens/s | max alloc GiB |")
    print("|---|---:|---:|---:|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–"
        mem = f"{r['max_alloc_gib']:.1f}" if r.get("max_alloc_gib") else "–"
        batch = f"≥ {r['max_batch']} (search cap)" if r["capped"] else r["max_batch"]
        print(f"| {'on' if r['activation_checkpointing'] else 'off'} | {batch} | {tps} | {mem} |")


if __name__ == "__main__":
    main()
