#!/usr/bin/env bash
# Device-machine calls: GPU tests, SDPA backends, the throughput tables, profile, compiled variants, the Triton
# and flex cores, the real training loop, largest batch for XLNet-large. The default (`tests flex`, sized for one
# 600 s call, 580 s at most): the GPU tests, then the flex core (2026-11-28, never yet run on a GPU): its GPU
# tests, the core alone against SDPA's, and compiled PLM / fine-tuning steps against the SDPA core and HF. Then `e2e
# e2e_step` (the real loop, which since 2026-11-27 queues a step ahead of reading the last, against the
# benchmark's step on the same model; 133k against 151k tokens/s before that change), `triton` (the core on real
# kernels since its backward lost the dq kernel, 2026-11-28: dq is a matrix product over the stored dS; before,
# the core alone took 1.2-1.36x SDPA's time) and `compile` (ours against HF in one process, not re-run since
# d067191). `e2e_flex`: the real loop on the flex core. benchmarks/README.md has what each ran on (`graph`,
# `kernels` and the loop in the fifth GPU session, `rows` and `cudagraphs` in the fourth).
# Logs and JSON go to $OUT (or ./gpu-out). Usage: bash benchmarks/gpu_session.sh [tests|flex|sdpa|bench|profile|compile|graph|rows|cores|cudagraphs|kernels|triton|triton_all|e2e|e2e_flex|e2e_inline|e2e_step|maxbatch]...
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
steps=${*:-tests flex}
# the attention core alone (attention_kernels.py, with its kernel profile and ablations) under a time limit
kernels() { timeout "$1" python3 benchmarks/attention_kernels.py --profile --ablate > "$OUT/kernels.txt" 2>&1; }
# `xlnet pretrain` itself at the benchmark shape and dropout (pretrain's default is 0), 60 steps; $1 names the
# outputs, the rest are extra flags
e2e() {
  local name=$1; shift
  timeout 240 python3 -m xlnet.cli pretrain --model base --seq-len 512 --reuse-len 256 --mem-len 384 \
    --num-predict 85 --batch-size 16 --dropout 0.1 --dropatt 0.1 --max-steps 60 --warmup-steps 10 --eval-every 0 --save-every 0 \
    --profile-steps 5 --progress false --out-dir "/tmp/$name" "$@" > "$OUT/$name.txt" 2>&1; tail -4 "$OUT/$name.txt"
  cp "/tmp/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null; tail -1 "$OUT/${name}_metrics.jsonl"
  cp "/tmp/$name/profile.txt" "$OUT/${name}_profile.txt" 2>/dev/null; head -30 "$OUT/${name}_profile.txt"
}
for s in $steps; do
  case $s in
    # four workers (pytest-xdist, in the device image): the compiled runs' cold compiles are CPU-bound
    # (but the flex core's: `flex` runs those)
    tests) timeout 170 python3 -m pytest -q -m gpu tests -n 4 -p no:cacheprovider --ignore tests/test_flex_attention.py \
             2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
    bench) timeout 200 python3 benchmarks/throughput.py --device cuda --impls fast,hf_xlnet,hf_bert --steps 10 \
             --json-out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; tail -14 "$OUT/bench.txt" ;;
    sdpa) timeout 60 python3 benchmarks/sdpa_backends.py 2>&1 | tee "$OUT/sdpa.txt" | tail -12 ;;
    profile) timeout 150 python3 benchmarks/throughput.py --device cuda --impls fast --steps 5 --no-memory \
             --profile fast > "$OUT/profile.txt" 2>&1; tail -40 "$OUT/profile.txt" ;;
    # compiled blocks (what `xlnet pretrain` runs on a GPU) against HF and eager; the warm-up column is the compile
    compile) timeout 480 python3 benchmarks/throughput.py --device cuda --impls fast_compile,hf_xlnet,fast --steps 8 \
             --json-out "$OUT/compile.json" > "$OUT/compile.txt" 2>&1; grep '^[|#]' "$OUT/compile.txt" ;;
    # A/B: compiled blocks against the whole model as one graph (a cold whole-graph compile took over 2 minutes)
    graph) timeout 460 python3 benchmarks/throughput.py --device cuda --impls fast_compile,fast_compile_graph \
             --modes plm,finetune --steps 8 --no-memory > "$OUT/graph.txt" 2>&1; grep '^[|#]' "$OUT/graph.txt" ;;
    # A/B of the content stream's distance table in blocks of rows (32-row blocks on CPU: 2-11% faster there; on
    # CUDA at most 4-6% on 2026-11-27, within the run's spread: one table) and of the math core, compiled as the CLI runs, against HF, in one process
    rows) timeout 330 python3 benchmarks/throughput.py --device cuda \
             --impls fast_compile,fast_compile_rows64,fast_compile_rows128,fast_compile_math,hf_xlnet --modes plm,finetune \
             --steps 8 --json-out "$OUT/rows.json" > "$OUT/rows.txt" 2>&1; grep '^[|#]' "$OUT/rows.txt" ;;
    # A/B for the compiled step, in one process: the math core (inductor's softmax/dropout, cuBLAS products, no bias
    # gradient from SDPA) against SDPA's memory-efficient kernel
    cores) timeout 480 python3 benchmarks/throughput.py --device cuda --impls fast_compile_math,fast_compile,hf_xlnet \
             --modes plm,finetune --steps 8 --json-out "$OUT/cores.json" > "$OUT/cores.txt" 2>&1
           grep '^[|#]' "$OUT/cores.txt" ;;
    cudagraphs) timeout 480 python3 benchmarks/throughput.py --device cuda --impls fast_compile,hf_xlnet --modes plm,finetune \
             --steps 8 --compile-mode reduce-overhead --no-memory > "$OUT/cudagraphs.txt" 2>&1
           grep '^[|#]' "$OUT/cudagraphs.txt" ;;
    # the attention core alone, Triton against SDPA: each core's kernels timed one by one, forward-only times, and
    # the Triton kernels without dropout, segments or mask (what each feature costs; ~1-2 minutes)
    kernels) kernels 160; grep -v Warning "$OUT/kernels.txt" ;;
    # the fused Triton core (opt-in): its GPU tests (every autotune tile against PyTorch, a bf16 step against SDPA),
    # the core alone against SDPA, then compiled steps with each core interleaved in one process (autotuning on
    # first use; the GPU targets are PLM and fine-tuning; rows print as each mode ends, and an
    # implementation that fails is left out); sized with `tests` to fit one 600 s call (443 s on an H200).
    # `triton_all`: the whole file on real kernels (every model variant: many small shapes, each compiled)
    triton) timeout 120 python3 -m pytest -q tests/test_triton_attention.py -k "every_autotune_tile or cuda_bf16" \
             -p no:cacheprovider 2>&1 | tail -3 \
             | tee "$OUT/triton_tests.txt"
           kernels 100; grep '^[|#]' "$OUT/kernels.txt"
           timeout 270 python3 benchmarks/throughput.py --device cuda --impls fast_compile_triton,fast_compile,hf_xlnet \
             --modes plm,finetune --steps 8 --json-out "$OUT/triton.json" > "$OUT/triton.txt" 2>&1
           grep '^[|#]' "$OUT/triton.txt" ;;
    # the flex core (opt-in, XLNET_ATTN_CORE=flex): its GPU tests (compiled kernel against the reference in fp32,
    # its hashed dropout against PyTorch, a compiled bf16 step against the SDPA core), the core alone against
    # SDPA's (no profile or ablations), then compiled steps with the flex and SDPA cores interleaved in one process
    flex) timeout 120 python3 -m pytest -q -m gpu tests/test_flex_attention.py -n 4 -p no:cacheprovider 2>&1 | tail -8 \
             | tee "$OUT/flex_tests.txt"
           timeout 90 python3 benchmarks/attention_kernels.py --cores sdpa,flex > "$OUT/flex_kernels.txt" 2>&1
           grep '^[|#]' "$OUT/flex_kernels.txt"
           timeout 200 python3 benchmarks/throughput.py --device cuda --impls fast_compile_flex,fast_compile,hf_xlnet \
             --modes plm,finetune --steps 8 --json-out "$OUT/flex.json" > "$OUT/flex.txt" 2>&1
           grep '^[|#]' "$OUT/flex.txt" ;;
    triton_all) timeout 560 python3 -m pytest -q tests/test_triton_attention.py -p no:cacheprovider 2>&1 | tail -5 \
             | tee "$OUT/triton_all.txt" ;;
    # the real training loop (embedded corpus, base preset at the benchmark shape, compiled blocks, prefetched
    # batches): its logged tokens/s (last 20 steps) against `compile`'s step shows what the loop around it costs
    # (2026-11-27, H200: 88k tokens/s against the step's 120-140k); steps 4-8 profiled (profile.txt).
    # e2e_inline: the same with the batches built inline (--prefetch 0): what the worker process saves
    e2e) e2e e2e ;;
    # the benchmark's compiled PLM step on the e2e run's model (its vocab, 8000) in the same session: the gap
    e2e_step) timeout 200 python3 benchmarks/throughput.py --device cuda --impls fast_compile --modes plm --steps 8 \
                --vocab-size 8000 --no-memory --json-out "$OUT/e2e_step.json" > "$OUT/e2e_step.txt" 2>&1
              grep '^[|#]' "$OUT/e2e_step.txt" ;;
    e2e_inline) e2e e2e_inline --prefetch 0 ;;
    e2e_flex) XLNET_ATTN_CORE=flex e2e e2e_flex ;;
    maxbatch) timeout 120 python3 benchmarks/max_batch.py --max-batch 128 --json-out "$OUT/maxbatch.json" > "$OUT/maxbatch.txt" 2>&1
             tail -6 "$OUT/maxbatch.txt" ;;
  esac
done
