"""Registers, local memory (spills), shared memory and instruction counts of the Triton attention kernels,
compiled ahead of time for a GPU architecture: no GPU needed (Triton's compiler and the ptxas and cuobjdump
it ships do the work).

    python benchmarks/kernel_resources.py                 # every kernel × autotune tile × scenario, sm_90a
    python benchmarks/kernel_resources.py --arch 80       # the same for an A100
    python benchmarks/kernel_resources.py --scenarios content --check   # exit 1 if any tile spills registers
    PYTHONPATH=/path/to/other/triton python benchmarks/kernel_resources.py   # another Triton version

A kernel that spills keeps part of its tile state in local memory (its stack frame: traffic through L1/L2 on
every loop iteration); the autotuner only times what it is offered, so the tile lists in
triton_attention.TILES are the spill-free ones at the base model's shapes. Register allocation changes with
the Triton version: run it under each one the kernels should serve.

Scenarios are the calls a base-model (12 heads × 64) training step makes at the issue's GPU shape (seq 512,
mem 384, 85 targets): the content stream (512 rows over 896 keys), the query stream (85 target rows),
fine-tuning (512 × 512, padding mask), and the same without dropout (inference's forward; training with
dropout 0). The instruction count is of the whole kernel (SASS), a rough proxy for the work per tile, not a
timing. HGMMA / HMMA count the matrix instructions: Hopper's asynchronous warpgroup MMA (wgmma, which needs
an M of 64 or more per warpgroup) against the older per-warp mma.sync.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces the kernels this script compiles
    sys.exit("kernel_resources.py compiles the kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from xlnet import triton_attention as ta  # noqa: E402

KERNELS = {"forward": ta._forward, "backward_kv": ta._backward_kv}
# (Lq, K, HAS_SEG, HAS_MASK, DROPOUT) of each call at the GPU benchmark shape (base preset, head dim 64); the
# distance table has R = K + 512 columns (K keys and the 512 tokens of the segment) in every one
SCENARIOS = {"content": (512, 896, True, True, True), "query": (85, 896, True, True, True),
             "finetune": (512, 512, True, True, True), "no_dropout": (512, 512, True, True, False)}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INT_POINTERS = {"C0", "SEGQ", "SEGK", "SEED"}
FLOAT_POINTERS = {"STATS", "DELTA", "DCOEF", "COEF"}
DATA_POINTERS = {"Q", "Kt", "V", "T", "MASK", "O", "DO", "DQ", "DK", "DV", "DS"}  # in the autocast dtype


def signature(fn, dtype: str) -> dict[str, str]:
    """Argument types as the launcher passes them under bf16 autocast."""
    sig = {}
    for name in fn.arg_names:
        if name in INT_POINTERS:
            sig[name] = "*i32"
        elif name in FLOAT_POINTERS:
            sig[name] = "*fp32"
        elif name in ("scale", "p_drop"):
            sig[name] = "fp32"
        elif name.startswith("stride") or name == "n_head":
            sig[name] = "i32"
        elif name in DATA_POINTERS:
            sig[name] = "*" + dtype
        else:
            sig[name] = "constexpr"
    return sig


def measure(job: tuple) -> dict:
    kernel, tile, scenario, arch = job
    m, n, warps, stages = tile[:4]
    lq, klen, has_seg, has_mask, dropout = SCENARIOS[scenario]
    fn = KERNELS[kernel].fn
    consts = dict(Lq=lq, K=klen, R=klen + 512, D=64, HAS_SEG=has_seg, HAS_MASK=has_mask, DROPOUT=dropout,
                  IEEE=False, BLOCK_D=64, **ta.tile_meta(kernel, tile))
    compiled = triton.compile(ASTSource(fn, signature(fn, "bf16"), consts), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:  # Triton's own cubin: its ptxas, its PTX version
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = cuobjdump("-res-usage", cubin)
        sass = cuobjdump("-sass", cubin)
    ops = [line.split("*/", 1)[1].split() for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    ops = [words[1] if words[0].startswith("@") else words[0] for words in ops if words]  # opcode after a predicate
    return dict(kernel=kernel, scenario=scenario, block_m=m, block_n=n, warps=warps, stages=stages,
                keys_down=ta.tile_meta(kernel, tile).get("KEYS_DOWN", False),
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), shared_kib=compiled.metadata.shared / 1024,
                instructions=len(ops), hgmma=sum(op.startswith("HGMMA") for op in ops),
                hmma=sum(op.startswith("HMMA") for op in ops))


def cuobjdump(flag: str, cubin: str) -> str:
    return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, cubin], capture_output=True, text=True,
                          check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a tile uses local memory or over 227 KiB of shared memory")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario(s): {', '.join(sorted(unknown))} (choose from {', '.join(SCENARIOS)})")
    jobs = [(kernel, tile, scenario, args.arch) for scenario in scenarios for kernel in KERNELS
            for tile in ta.TILES[kernel]]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(measure, jobs))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"| scenario | kernel | BLOCK_M × BLOCK_N | warps | stages | registers | stack bytes | shared KiB | "
              f"SASS instructions | HGMMA / HMMA |  (sm_{args.arch}, Triton {triton.__version__})")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['scenario']} | {r['kernel']}{' (keys down)' * r['keys_down']} | {r['block_m']} × "
                  f"{r['block_n']} | {r['warps']} | {r['stages']} | {r['registers']} | {r['stack_bytes']} | "
                  f"{r['shared_kib']:.1f} | {r['instructions']} | {r['hgmma']} / {r['hmma']} |")
    bad = [r for r in rows if r["stack_bytes"] or r["shared_kib"] > 227]
    if args.check and bad:
        sys.exit(f"{len(bad)} of {len(rows)} kernel tiles spill registers (local memory) or overflow shared memory")


if __name__ == "__main__":
    main()
