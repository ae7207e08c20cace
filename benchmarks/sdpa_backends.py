"""Which `scaled_dot_product_attention` backend serves XLNet's content stream fastest on this GPU.

    python benchmarks/sdpa_backends.py            # base shape: B 16, 12 heads, L 512, K 896 (mem 384), bf16

The fast path hands SDPA a float bias (the masked, rel-shifted position term) that needs a gradient, with
dropout, and q/k carry the segment one-hots (head dim 64 + 8). For each backend that accepts that call this
times forward + backward (median of 10 after 3 warm-ups) for q/k head dims 72 (segments folded into q·k) and 64
(segment term left to the bias), and checks its gradients against the memory-efficient kernel's with dropout 0.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION}


def tensors(b: int, n: int, lq: int, k: int, dqk: int, dv: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(b, n, lq, dqk), (b, n, k, dqk), (b, n, k, dv), (b, n, lq, k)]
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for s in shapes]


def run(backend: str, xs: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    q, k, v, bias = xs
    with sdpa_kernel(BACKENDS[backend]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    return list(torch.autograd.grad(out.float().square().mean(), xs))


def timed(backend: str, xs: list[torch.Tensor], p: float) -> float:
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(backend, xs, p)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--klen", type=int, default=896)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; B {args.batch}, {args.heads} heads, "
          f"L {args.seq}, K {args.klen}, bf16, bias with gradient")
    print("| backend | q/k head dim | fwd+bwd ms (dropout 0.1) | max rel. grad error vs efficient (dropout 0) |")
    print("|---|---:|---:|---:|")
    for dqk in (72, 64):
        xs = tensors(args.batch, args.heads, args.seq, args.klen, dqk, 64)
        ref = run("efficient", xs, 0.0)
        for name in BACKENDS:
            try:
                grads = run(name, xs, 0.0)
                err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(grads, ref))
                ms = timed(name, xs, 0.1)
                print(f"| {name} | {dqk} | {ms:.2f} | {err:.1e} |", flush=True)
            except RuntimeError as e:  # this backend does not take this call
                print(f"| {name} | {dqk} | – | not supported: {str(e).splitlines()[0][:80]} |", flush=True)


if __name__ == "__main__":
    main()
