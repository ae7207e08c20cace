"""Training / inference throughput: ours (fast), ours (reference), HF XLNet, HF BERT at the same shape.

    python benchmarks/throughput.py                      # CPU, tiny model, seq 256, batch 8, 42 targets, mem 128
    python benchmarks/throughput.py --quick              # smoke run (small shape, 2 steps)
    python benchmarks/throughput.py --device cuda        # base model, seq 512, batch 16, 85 targets, mem 384, bf16

One table per run. Modes:
- plm:      permutation-LM training step with memory (two streams, fused AdamW). BERT: BertForMaskedLM, 15% masked.
- finetune: sequence-classification training step (content stream only, no memory, fused AdamW).
- infer:    sequence-classification forward in eval mode under inference_mode.

Batches are random tokens in the PLM layout (not the data pipeline): segments A | B | <cls> (ids 0, 1, 2), the
targets are `--targets` random positions with random permutation ranks above every non-target (non-targets are
seen by everyone), perm_mask[i, j] = 1 iff j is a target with rank(j) >= rank(i), target_mapping one-hot.
Memory (plm) is the previous step's `mems`, so every timed step attends over mem + seq keys.

Timing: all implementations of a mode live in one process and their steps are interleaved round by round (the
machine is shared, so a burst of load hits all of them alike); the table gives the median step. --isolated times
each implementation alone in fresh processes instead (two per implementation, the second round in reverse order):
one process shares its allocator's state and the caches between implementations, a user's process holds one.
glibc malloc is tuned as the xlnet CLI tunes it (xlnet/allocator.py) unless --no-malloc-tune. Memory: CPU peak
RSS delta (ru_maxrss at the end minus RSS before the model is built) from a fresh subprocess per implementation
and mode; CUDA torch.cuda.max_memory_allocated in-process.

FLOPs (analytic, matrix products only, 2 per multiply-add; the same "useful" count for every XLNet
implementation: work whose result is read, so HF's extra work on non-target query rows and on the final layer's
unread content rows is not credited). Per layer, with L tokens, M memory, K = M + L keys, R = K + L distances
(bi), P targets, d = d_model = n_head * d_head, F = d_inner, V = vocab:
  content stream  2·L·d² (q) + 4·K·d² (k, v) + 2·R·d² (r, once per step) + 2·L·K·d (q·k) + 2·L·R·d (q·r)
                  + 2·L·K·d (p·v) + 2·L·d² (o) + 4·L·d·F (FFN)
  query stream    the same with P rows: 2·P·d² + 2·P·K·d + 2·P·R·d + 2·P·K·d + 2·P·d² + 4·P·d·F
  final layer     k, v, and the query stream as above; content rows only where read: none under a query
                  stream (plm: mems cache layer inputs), the <cls> row for classification (1 row, K distances)
  LM head         2·P·d·V
BERT MLM per layer 8·L·d² + 4·L²·d + 4·L·d·F, head 2·L·d² + 2·L·d·V (HF computes logits at all L positions).
Training = 3 x forward; classification heads (< 0.1%) are left out. TFLOP/s = FLOPs / median step time;
MFU (CUDA only) = TFLOP/s / --peak-tflops (H100 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from xlnet.allocator import tune_host_allocator
from xlnet.fast_attention import CORES  # the attention cores a benchmarked implementation can force

# the default set; also "fast_compile" (every block compiled in place, as `xlnet pretrain --compile` does),
# "fast_compile_graph" (the whole model as one graph: the A/B for regional compilation), and any of ours with a
# core suffix, e.g. "fast_compile_triton", "fast_compile_math" (that attention core for that implementation's steps
# only: an A/B of cores in one process) or a row-block suffix, e.g. "fast_compile_rows64" (the content stream's
# distance table in blocks of 64 rows, fast_attention.row_block; "rows0": one block)
IMPLS = ["fast", "reference", "hf_xlnet", "hf_bert"]
ROWS = (0, 16, 32, 64, 128)  # the row-block suffixes
LABELS = {"fast": "ours (fast)", "fast_compile": "ours (fast, compiled)",
          "fast_compile_graph": "ours (fast, compiled as one graph)", "reference": "ours (reference)",
          "hf_xlnet": "HF XLNet", "hf_bert": "HF BERT"}
for _impl in ("fast", "fast_compile", "fast_compile_graph"):
    for _core in CORES:
        LABELS[f"{_impl}_{_core}"] = f"{LABELS[_impl][:-1]}, {_core} core)"
    for _rows in ROWS:
        LABELS[f"{_impl}_rows{_rows}"] = f"{LABELS[_impl][:-1]}, {f'rows {_rows}' if _rows else 'one table'})"
OURS = ("fast", "fast_compile", "fast_compile_graph", "reference")
MODES = ["plm", "finetune", "infer"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", default=None, help="model preset (default: tiny on cpu, base on cuda)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--targets", type=int, default=None)
    ap.add_argument("--mem", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary of every model (default: the preset's; 8000 is the embedded tokenizer's)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="bf16 autocast for every implementation (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--compile", action="store_true", help="compile the blocks of every one of our models")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compiled implementations")
    ap.add_argument("--activation-checkpointing", action="store_true", help="checkpoint each of our layers")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--quick", action="store_true", help="small shape, 2 steps: a smoke run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--json-out", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--plot", default=None, metavar="PNG", help="also draw tokens/s per mode and implementation")
    ap.add_argument("--no-malloc-tune", action="store_true",
                    help="leave glibc malloc at its defaults (the xlnet CLI tunes it: xlnet/allocator.py)")
    ap.add_argument("--profile", default=None, metavar="IMPL",
                    help="after timing, profile 3 steps of IMPL in each mode and print its top kernels")
    ap.add_argument("--isolated", action="store_true",
                    help="time each implementation alone in fresh processes (two each, in alternating order) "
                         "instead of interleaved in one: what a user running one of them sees")
    ap.add_argument("--_memory_child", nargs=2, metavar=("MODE", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--_time_child", nargs=2, metavar=("MODE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    defaults = dict(precision="bf16" if cuda else "fp32", preset="base" if cuda else "tiny", seq=512 if cuda else 256,
                    batch=16 if cuda else 8, targets=85 if cuda else 42, mem=384 if cuda else 128,
                    steps=20 if cuda else 7)
    if args.quick:
        defaults.update(seq=64, batch=2, targets=10, mem=32, steps=2)
        args.warmup = 1
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------------------------
# batches and models


def plm_batch(args, vocab: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, L, P = args.batch, args.seq, args.targets
    ids = torch.randint(9, vocab, (B, L), generator=g)
    seg = torch.zeros(B, L, dtype=torch.long)
    seg[:, L // 2:] = 1
    seg[:, -1] = 2
    ids[:, -1] = 3  # <cls>
    perm = torch.zeros(B, L, L)
    tm = torch.zeros(B, P, L)
    for b in range(B):
        pos = torch.randperm(L - 1, generator=g)[:P]  # <cls> is never a target
        rank = torch.zeros(L)
        rank[pos] = 1 + torch.randperm(P, generator=g).float()  # targets above every non-target (rank 0)
        is_t = torch.zeros(L, dtype=torch.bool)
        is_t[pos] = True
        perm[b] = (is_t[None, :] & (rank[None, :] >= rank[:, None])).float()
        tm[b, torch.arange(P), pos] = 1
    labels = torch.gather(ids, 1, tm.argmax(-1))
    batch = dict(input_ids=ids, token_type_ids=seg, attention_mask=torch.ones(B, L), perm_mask=perm,
                 target_mapping=tm, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def cls_batch(args, vocab: int, device: str, seed: int = 0) -> dict:
    b = plm_batch(args, vocab, device, seed)
    b = {k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    b["attention_mask"][::2, : args.seq // 8] = 0  # left padding on half the rows
    b["labels"] = torch.arange(args.batch, device=device) % 2
    return b


def mlm_batch(args, vocab: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, vocab, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels[chosen] = ids[chosen]
    ids = ids.masked_fill(chosen, 6)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              labels=labels).items()}


def our_config(args, impl: str):
    from xlnet.config import XLNetConfig

    vocab = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    return XLNetConfig.from_preset(args.preset, mem_len=args.mem, attn_impl=impl, dropout=0.1, dropatt=0.1,
                                   summary_last_dropout=0.1, num_labels=2, **vocab)


def with_setting(step, core: str | None = None, rows: int | None = None):
    """step with the attention core or the content stream's row block forced while it runs (both are picked per
    forward and read as constants by the compiled blocks, which recompile for each value: the implementations of
    one process can differ in them)."""
    import xlnet.fast_attention as fa

    def run():
        saved = fa.FORCED_CORE, dict(fa.ROW_BLOCK)
        if core is not None:
            fa.FORCED_CORE = core
        if rows is not None:
            fa.ROW_BLOCK.update({"cpu": rows, "cuda": rows})
        try:
            step()
        finally:
            fa.FORCED_CORE = saved[0]
            fa.ROW_BLOCK.clear()
            fa.ROW_BLOCK.update(saved[1])
    return run


def build(args, mode: str, impl: str):
    """A zero-argument `step` for this mode and implementation (a training step, or an inference forward)."""
    import transformers

    base, _, suffix = impl.rpartition("_")
    if suffix in CORES and base in OURS:
        return with_setting(build(args, mode, base), core=suffix)
    if suffix.startswith("rows") and base in OURS:
        return with_setting(build(args, mode, base), rows=int(suffix[4:]))

    torch.manual_seed(0)
    dev = args.device
    ours_cfg = our_config(args, "reference" if impl == "reference" else "fast")
    hf_xcfg = transformers.XLNetConfig(**ours_cfg.to_hf_dict())
    bert_cfg = transformers.BertConfig(vocab_size=ours_cfg.vocab_size, hidden_size=ours_cfg.d_model,
                                       num_hidden_layers=ours_cfg.n_layer, num_attention_heads=ours_cfg.n_head,
                                       intermediate_size=ours_cfg.d_inner, max_position_embeddings=max(512, args.seq),
                                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)
    if mode == "plm":
        if impl in OURS:
            from xlnet.model import XLNetLMHeadModel
            model = XLNetLMHeadModel(ours_cfg)
        elif impl == "hf_xlnet":
            model = transformers.XLNetLMHeadModel(hf_xcfg)
        else:
            model = transformers.BertForMaskedLM(bert_cfg)
    else:
        if impl in OURS:
            from xlnet.heads import XLNetForSequenceClassification
            model = XLNetForSequenceClassification(ours_cfg)
        elif impl == "hf_xlnet":
            model = transformers.XLNetForSequenceClassification(hf_xcfg)
        else:
            model = transformers.BertForSequenceClassification(bert_cfg)
    model.to(dev)
    if args.activation_checkpointing and impl in OURS:
        from xlnet.training import apply_activation_checkpointing
        apply_activation_checkpointing(model)
    call = model
    if impl == "fast_compile_graph":
        call = torch.compile(model, mode=args.compile_mode, dynamic=False)
    elif impl == "fast_compile" or (args.compile and impl in OURS):
        from xlnet.training import compile_blocks
        compile_blocks(model, mode=args.compile_mode)
    vocab = ours_cfg.vocab_size
    if impl == "hf_bert":
        batch = mlm_batch(args, vocab, dev) if mode == "plm" else cls_batch(args, vocab, dev)
        batch.pop("token_type_ids", None)
    else:
        batch = plm_batch(args, vocab, dev) if mode == "plm" else cls_batch(args, vocab, dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), amp:
                call(**{k: v for k, v in batch.items() if k != "labels"})
        return step

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)  # every impl alike
    state = {"mems": None}

    def step():
        kw = dict(batch)
        if mode == "plm" and impl != "hf_bert":
            kw["mems"] = state["mems"]
            if impl == "hf_xlnet":
                kw["use_mems"] = True
        with amp:
            out = call(**kw)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode == "plm" and impl != "hf_bert":
            state["mems"] = out.mems
    return step


# ------------------------------------------------------------------------------------------------------------
# FLOPs


def flops(args, mode: str, impl: str) -> float:
    from xlnet.config import XLNetConfig

    c = XLNetConfig.from_preset(args.preset)
    d, F, V, n = c.d_model, c.d_inner, c.vocab_size, c.n_layer
    L, B = args.seq, args.batch
    if impl == "hf_bert":
        per_layer = 8 * L * d * d + 4 * L * L * d + 4 * L * d * F
        fwd = B * (n * per_layer + (2 * L * d * d + 2 * L * d * V if mode == "plm" else 0))
        return fwd * (1 if mode == "infer" else 3)
    M = args.mem if mode == "plm" else 0
    K = M + L
    R = K + L
    P = args.targets if mode == "plm" else 0

    def rows(m: int, dist: int) -> int:  # q, q·k, q·r, p·v, o and FFN for m query rows reading `dist` distances
        return 2 * m * d * d + 2 * m * K * d + 2 * m * dist * d + 2 * m * K * d + 2 * m * d * d + 4 * m * d * F

    kv = 4 * K * d * d
    layer = kv + rows(L, R) + rows(P, R)
    last = kv + (rows(1, K) if mode != "plm" else 0) + rows(P, R)
    fwd = B * ((n - 1) * layer + last) + n * 2 * R * d * d + B * 2 * P * d * V
    return fwd * (1 if mode == "infer" else 3)


# ------------------------------------------------------------------------------------------------------------
# measurement


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_mode(args, mode: str, impls: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(median step, wall time of the warm-up steps: torch.compile's cost for the compiled ones)."""
    if args.isolated:
        return time_isolated(args, mode, impls)
    times, warm = time_steps(args, mode, impls)
    return {impl: statistics.median(ts) for impl, ts in times.items()}, warm


def time_isolated(args, mode: str, impls: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Each implementation in a fresh process of its own, twice, the second round in reverse order (drift of
    the machine spreads over all); the median of all its steps, the first round's warm-up. One whose process
    fails is left out, as in the interleaved run (the child says why)."""
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    warm: dict[str, float] = {}
    for order in (impls, impls[::-1]):
        for impl in order:
            out = child(args, "--_time_child", mode, impl)
            if out is not None:
                times[impl] += out["times"]
                warm.setdefault(impl, out["warmup_s"])
    return {impl: statistics.median(ts) for impl, ts in times.items() if ts}, warm


def time_child(args, mode: str, impl: str) -> None:
    torch.set_num_threads(args.threads)
    times, warm = time_steps(args, mode, [impl])
    if impl not in warm:
        sys.exit(1)
    print(json.dumps({"times": times[impl], "warmup_s": warm[impl]}))


def time_steps(args, mode: str, impls: list[str]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every step time of each implementation (interleaved round by round) and its warm-up's wall time. One that
    fails to build or warm up (a kernel on an untried GPU, say) is reported and left out; the others go on."""
    steps, warm = {}, {}
    for impl in impls:
        try:
            step = build(args, mode, impl)
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step()
            sync(args.device)
        except Exception as e:  # noqa: BLE001  (any failure of one implementation)
            print(f"# {mode}: {LABELS[impl]} failed and is left out: {type(e).__name__}: {str(e)[:500]}",
                  file=sys.stderr, flush=True)
            continue
        steps[impl], warm[impl] = step, time.perf_counter() - t0
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(args.steps):  # interleaved rounds
        for impl, step in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            times[impl].append(time.perf_counter() - t0)
    return times, warm


def profile(args, mode: str, impl: str, top: int = 25) -> None:
    """Top operators by device time (self) over 3 steps after warm-up."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step = build(args, mode, impl)
    for _ in range(args.warmup):
        step()
    sync(args.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            step()
        sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(f"## profile: {mode}, {LABELS[impl]}")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def memory_child(args, mode: str, impl: str) -> None:
    """Peak RSS of building + 3 steps, minus RSS after the imports. Linux: writing 5 to clear_refs resets the
    high-water mark (VmHWM), so the import peak does not hide the step's."""
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (imports outside the measured delta)
    import xlnet.heads  # noqa: F401
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, field = status_kb("VmRSS"), "VmHWM"
    except OSError:  # no procfs: ru_maxrss (includes the import peak)
        base, field = 0, None
    step = build(args, mode, impl)
    for _ in range(3):
        step()
    peak = status_kb(field) if field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_delta_mb": (peak - base) / 1024}))


def memory(args, mode: str, impl: str) -> float | None:
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = build(args, mode, impl)
        for _ in range(3):
            step()
        sync("cuda")
        return torch.cuda.max_memory_allocated() / 2**20
    out = child(args, "--_memory_child", mode, impl)
    return None if out is None else out["peak_rss_delta_mb"]


def child(args, role: str, mode: str, impl: str) -> dict | None:
    """Run this script as a fresh process in `role` (--_memory_child / --_time_child) with this run's settings;
    its last output line, parsed (None if it failed: its error is shown)."""
    cmd = [sys.executable, __file__, role, mode, impl, "--device", args.device, "--preset", args.preset,
           "--seq", str(args.seq), "--batch", str(args.batch), "--targets", str(args.targets), "--mem",
           str(args.mem), "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", args.precision, "--compile-mode", args.compile_mode]
    cmd += ["--compile"] * args.compile + ["--no-malloc-tune"] * args.no_malloc_tune
    cmd += ["--activation-checkpointing"] * args.activation_checkpointing
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], meta: dict, path: str) -> None:
    """Grouped bars: tokens/s of each implementation per mode (one panel per mode: their scales differ), the
    ratio to HF XLNet on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    titles = {"plm": "PLM training step (with memory)", "finetune": "fine-tuning step", "infer": "inference"}
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.8), dpi=120, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mine = [r for r in rows if r["mode"] == mode]
        names = [LABELS[r["impl"]].replace(" (", "\n(") for r in mine]
        colors = ["tab:gray" if r["impl"].startswith("hf_") else "tab:blue" for r in mine]
        bars = ax.bar(range(len(mine)), [r["tokens_per_s"] for r in mine], color=colors)
        for bar, r in zip(bars, mine):
            if "speed_vs_hf_xlnet" in r:
                ax.annotate(f"{r['speed_vs_hf_xlnet']:.2f}×", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(mine)), names, fontsize=7)
        ax.set_title(titles.get(mode, mode), fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{meta['machine']} ({meta['device']}, {meta['threads']} threads), torch {meta['torch']}, "
                 f"{meta['preset']} preset, seq {meta['seq']}, batch {meta['batch']}, {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return name


def main(argv=None) -> None:
    """Rows are printed (and --json-out rewritten) as each mode finishes: a run cut short by a time limit (a lent
    GPU's lease) keeps the modes it measured."""
    args = parse_args(argv)
    malloc_tuned = not args.no_malloc_tune and tune_host_allocator()  # as the CLI runs (both implementations)
    if args._memory_child:
        memory_child(args, *args._memory_child)
        return
    if args._time_child:
        time_child(args, *args._time_child)
        return
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    modes = [m for m in args.modes.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(modes) - set(MODES)) + sorted(set(impls) - set(LABELS))
    if unknown:
        sys.exit(f"throughput.py: unknown mode/implementation {', '.join(unknown)} "
                 f"(modes: {', '.join(MODES)}; implementations: {', '.join(LABELS)})")
    meta = dict(device=args.device, machine=machine(), threads=args.threads, torch=torch.__version__,
                preset=args.preset, vocab=our_config(args, "fast").vocab_size, seq=args.seq, batch=args.batch,
                targets=args.targets, mem=args.mem, steps=args.steps, compile=args.compile, compile_mode=args.compile_mode,
                attn_core=os.environ.get("XLNET_ATTN_CORE", "auto"), date=time.strftime("%Y-%m-%d"),
                load=os.getloadavg()[0], malloc_tuned=malloc_tuned, isolated=args.isolated)
    if not args.json:
        print_header(args, meta)
    rows = []
    for mode in modes:
        if args.profile:
            profile(args, mode, args.profile)
        rows += measure_mode(args, mode, impls)
        if args.json_out:
            write_json(args.json_out, dict(meta=meta, rows=rows))
        if not args.json:
            print_rows([r for r in rows if r["mode"] == mode])
    if args.plot:
        plot(rows, meta, args.plot)
    if args.json:
        print(json.dumps(dict(meta=meta, rows=rows), indent=2))


def measure_mode(args, mode: str, impls: list[str]) -> list[dict]:
    med, warm = time_mode(args, mode, impls)
    rows = []
    for impl in med:  # those that ran
        t = med[impl]
        fl = flops(args, mode, impl)
        rows.append(dict(mode=mode, impl=impl, step_s=t, warmup_s=warm[impl], tokens_per_s=args.batch * args.seq / t,
                         tflops=fl / t / 1e12,
                         mfu=(fl / t / 1e12 / args.peak_tflops if args.device == "cuda" else None),
                         memory_mb=None if args.no_memory else memory(args, mode, impl)))
    ref = next((r for r in rows if r["impl"] == "hf_xlnet"), None)
    for r in rows if ref else []:
        r["speed_vs_hf_xlnet"] = r["tokens_per_s"] / ref["tokens_per_s"]
        if r["memory_mb"] is not None and ref["memory_mb"]:
            r["memory_vs_hf_xlnet"] = r["memory_mb"] / ref["memory_mb"]
    return rows


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def print_header(args, meta: dict) -> None:
    mem_name = "peak RSS Δ MiB" if args.device == "cpu" else "max alloc MiB"
    timing = f"{args.steps} steps in each of 2 processes per implementation" if args.isolated else \
        f"{args.steps} interleaved steps"
    print(f"# {meta['date']} {meta['machine']}, {args.device}, {args.threads} threads, torch {meta['torch']}; "
          f"preset {args.preset}, vocab {meta['vocab']}, seq {args.seq}, batch {args.batch}, targets {args.targets}, "
          f"mem {args.mem}, "
          f"median of {timing}; load avg {meta['load']:.1f}; compile mode {args.compile_mode}, "
          f"attention core {meta['attn_core']}; malloc {'tuned' if meta['malloc_tuned'] else 'default'}; "
          f"warm-up = the first {args.warmup} steps (compiling, if compiled)")
    print(f"| mode | implementation | step ms | tokens/s | TFLOP/s | MFU | {mem_name} | speed vs HF XLNet "
          f"| memory vs HF XLNet | warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "–"
        mem = f"{r['memory_mb']:.0f}" if r["memory_mb"] is not None else "–"
        sp = f"{r['speed_vs_hf_xlnet']:.2f}×" if "speed_vs_hf_xlnet" in r else "–"
        mr = f"{r['memory_vs_hf_xlnet']:.2f}×" if "memory_vs_hf_xlnet" in r else "–"
        print(f"| {r['mode']} | {LABELS[r['impl']]} | {1000 * r['step_s']:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tflops']:.3f} | {mfu} | {mem} | {sp} | {mr} | {r['warmup_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
