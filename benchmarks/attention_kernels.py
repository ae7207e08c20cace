"""The attention core alone: the Triton kernel and flex_attention against the SDPA path, forward + backward, on
one GPU.

    python benchmarks/attention_kernels.py            # base shapes, bf16, dropout 0.1
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --device cpu --quick   # smoke run, no GPU

Each takes what a layer's fast_attend hands its core: q + u, k, v, the distance table T = scaled (q + v)·Rᵀ,
the segment coefficient and ids, the additive mask. "sdpa" is the production CUDA path (the masked position
bias built from T by the rel-shift view or the row windows, plus the segment term, then the memory-efficient
kernel with its bias gradient flowing back into T); "triton" is triton_attention; "flex" (CUDA only: no
backward on CPU) is flex_attention.flex_attend, compiled with its fold of segments and mask into T. Rows: the
content stream (L queries) and the query stream (P target slots at random positions). Time: median of 10
forward + backward calls after 3 warm-ups (the first calls also autotune the Triton kernels, or compile flex);
error: the largest relative gradient difference (q, k, v, T, coef) against sdpa at dropout 0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import xlnet.fast_attention as fa
from xlnet.triton_attention import triton_attention


def inputs(args, lq: int, content: bool, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b, n, dh, klen, qlen = args.batch, args.heads, args.head_dim, args.mem + args.seq, args.seq
    rlen = klen + qlen
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    pos = torch.arange(lq) if content else torch.randint(0, qlen, (b, lq), generator=g)
    cols = fa.distance_columns(pos.expand(b, lq).to(device), qlen, klen, rlen)  # [B, 1, Lq, K]
    ids = (torch.arange(qlen) >= qlen // 2).long()
    seg_k = torch.cat([torch.zeros(args.mem, dtype=torch.long), ids]).expand(b, klen).to(device)
    seg_q = (ids if content else ids[pos]).expand(b, lq).to(device)
    mask = torch.where(torch.rand(b, 1, lq, klen, generator=g) < 0.5, fa.mask_value(dtype), 0.0)
    mask[..., 0] = 0.0
    return dict(qc=rand(b, n, lq, dh), k=rand(b, n, klen, dh), v=rand(b, n, klen, dh),
                table=rand(b, n, lq, rlen, scale=0.1), coef=rand(b, n, lq, scale=0.1), cols=None if content else cols,
                c0=cols[:, 0, :, 0], seg_q=seg_q, seg_k=seg_k, mask=mask.to(device, dtype), klen=klen)


def sdpa_core(x: dict, p: float, scale: float) -> torch.Tensor:
    b, n, lq, rlen = x["table"].shape
    geom = (b, n, 1, n * lq * rlen, lq * rlen, lq * rlen, x["klen"])  # one block of rows per (b, n) pair
    same = (x["seg_q"][:, None, :, None] == x["seg_k"][:, None, None, :]).to(x["qc"].dtype)
    bias = fa.position_bias(x["table"][:, :, None], geom, lq, x["cols"], (x["coef"], same), x["mask"], scale, True)
    return F.scaled_dot_product_attention(x["qc"], x["k"], x["v"], attn_mask=bias, dropout_p=p, scale=scale)


def triton_core(x: dict, p: float, scale: float) -> torch.Tensor:
    b, n, lq, rlen = x["table"].shape
    return triton_attention(x["qc"], x["k"], x["v"], x["table"], (n * lq * rlen, lq * rlen), x["c0"], x["coef"],
                            x["seg_q"], x["seg_k"], x["mask"], p, scale)


def flex_core(x: dict, p: float, scale: float) -> torch.Tensor:
    from xlnet.flex_attention import flex_attend

    same = (x["seg_q"][:, None, :, None] == x["seg_k"][:, None, None, :]).to(x["qc"].dtype)
    return flex_attend(x["qc"], x["k"], x["v"], x["table"][:, :, None], x["c0"], (x["coef"], same), x["mask"], p,
                       scale)


LEAVES = ("qc", "k", "v", "table", "coef")


def grads(core, x: dict, p: float, scale: float) -> list[torch.Tensor]:
    out = core(x, p, scale)
    return list(torch.autograd.grad(out.float().square().mean(), [x[k] for k in LEAVES if x[k] is not None]))


def forward_only(core, x: dict, p: float, scale: float) -> torch.Tensor:
    with torch.no_grad():
        return core(x, p, scale)


# Triton kernel variants without one feature each (its constexpr switches): their difference to the full
# kernel is what that feature costs (no hardware counters needed)
NO_SEG, NO_MASK = dict(coef=None, seg_q=None, seg_k=None), dict(mask=None)
ABLATIONS = {"no dropout": ({}, 0.0), "no segments": (NO_SEG, 0.1), "no mask": (NO_MASK, 0.1),
             "no dropout, segments, mask": ({**NO_SEG, **NO_MASK}, 0.0)}  # variant: (inputs left out, dropout)


def timed(core, x: dict, p: float, scale: float, device: str, repeats: int, run=grads) -> float:
    times = []
    for i in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(core, x, p, scale)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mem", type=int, default=384)
    ap.add_argument("--targets", type=int, default=85)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 timed call: a smoke run")
    ap.add_argument("--profile", action="store_true", help="also each core's top kernels (GPU) or operators (CPU)")
    ap.add_argument("--ablate", action="store_true",
                    help="also forward-only times, and the Triton kernels without dropout, segments or mask")
    ap.add_argument("--cores", default="sdpa,triton,flex", help="comma-separated; flex only on CUDA")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.heads, args.head_dim, args.seq, args.mem, args.targets = 2, 2, 16, 32, 16, 6
    repeats = 1 if args.quick else 10
    scale = args.head_dim ** -0.5
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}; B {args.batch}, {args.heads} heads x {args.head_dim}, L {args.seq}, "
          f"mem {args.mem}, P {args.targets}; forward + backward, median of {repeats}")
    print("| stream | core | ms (dropout 0.1) | max rel. grad difference vs sdpa (dropout 0) |")
    print("|---|---|---:|---:|")
    profiles, ablations = [], []
    for stream, lq in (("content", args.seq), ("query", args.targets)):
        x = inputs(args, lq, stream == "content", args.device)
        ref = grads(sdpa_core, x, 0.0, scale)
        cores = {"sdpa": sdpa_core, "triton": triton_core}
        if args.device == "cuda":
            cores["flex"] = torch.compile(flex_core, dynamic=False)
        for core_name, core in ((name, cores[name]) for name in args.cores.split(",") if name in cores):
            err = max(float((a.float() - b.float()).norm() / b.float().norm())
                      for a, b in zip(grads(core, x, 0.0, scale), ref))
            ms = timed(core, x, 0.1, scale, args.device, repeats)
            print(f"| {stream} | {core_name} | {ms:.2f} | {err:.1e} |", flush=True)
            if args.profile:
                profiles.append((stream, core_name, top_kernels(core, x, 0.1, scale, args.device)))
            if args.ablate:
                fwd = timed(core, x, 0.1, scale, args.device, repeats, forward_only)
                ablations.append(f"| {stream} | {core_name} | forward only | {fwd:.2f} | {ms - fwd:.2f} |")
        if args.ablate:
            for variant, (changes, p) in ABLATIONS.items():
                ms = timed(triton_core, {**x, **changes}, p, scale, args.device, repeats)
                ablations.append(f"| {stream} | triton | {variant} | {ms:.2f} | |")
    if ablations:
        print("| stream | core | variant | ms | backward ms (the rest) |\n|---|---|---|---:|---:|")
        print("\n".join(ablations))
    for stream, core_name, rows in profiles:
        print(f"## {stream} stream, {core_name}: self time per forward + backward call, dropout 0.1")
        print("\n".join(f"{us:10.1f} us  {name[:90]}" for name, us in rows))
    print_picked_tiles()


def top_kernels(core, x: dict, p: float, scale: float, device: str, top: int = 8) -> list[tuple[str, float]]:
    """The kernels (CUDA) or operators (CPU) that take the most self time in a call, in microseconds per call:
    where each core's time goes (the Triton kernels one by one, SDPA's kernels and the bias it needs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    calls = 3
    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            grads(core, x, p, scale)
        if cuda:
            torch.cuda.synchronize()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    rows = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / calls)
            for e in prof.key_averages() if e.device_type == kind]
    return sorted(rows, key=lambda row: -row[1])[:top]


def print_picked_tiles() -> None:
    """The tile the autotuner kept for each kernel and call shape (which of triton_attention.TILES win)."""
    import xlnet.triton_attention as ta

    for kernel in ta.TILES:
        for key, config in getattr(ta, "_" + kernel).cache.items():
            lq, klen, _, dropout, seg, mask = key[:6]  # the autotune key: triton_attention.tuned
            kw = config.kwargs
            print(f"# autotuned {kernel}: Lq {lq}, K {klen}, dropout {dropout}, segments {seg}, mask {mask} -> "
                  f"{kw['BLOCK_M']} x {kw['BLOCK_N']}, {config.num_warps} warps, {config.num_stages} stages"
                  f"{', keys down' if kw.get('KEYS_DOWN') else ''}")


if __name__ == "__main__":
    main()
