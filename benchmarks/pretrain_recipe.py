"""How fast the demo's pretraining leaves the unigram plateau under each recipe change (README, "The pretraining
recipe").

    python benchmarks/pretrain_recipe.py                       # every variant, 400 steps of a 1000-step schedule
    python benchmarks/pretrain_recipe.py --variants old new --stop 1000

Each variant is `xlnet pretrain` on the embedded corpus (mini preset, the demo's batch and schedule) with a few
settings changed from the earlier recipe (dropout 0.1, init std 0.02, lr 1e-3); the run stops after --stop steps
of its --schedule-steps schedule, so the valid losses are those the full run would log at the same steps. The
corpus' unigram entropy is 6.7 nats: a loss near it means the model predicts word frequencies
and nothing else yet. Prints one markdown table (valid loss every 100 steps, seconds per step) and, with --json-out,
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

OLD = {"dropout": 0.1, "dropatt": 0.1, "initializer_range": 0.02, "lr": 1e-3}
NO_DROPOUT = {"dropout": 0.0, "dropatt": 0.0}
# name: settings over the earlier recipe (OLD); "new" is the recipe that became the default on 2026-11-27
VARIANTS: dict[str, dict[str, Any]] = {
    "old": {},
    "lr 5e-4": {"lr": 5e-4},
    "lr 1.5e-3": {"lr": 1.5e-3},
    "warmup 300": {"warmup_steps": 300},
    "num_predict 32": {"num_predict": 32},
    "init 0.05": {"initializer_range": 0.05},
    "dropout 0": NO_DROPOUT,
    "dropout 0, lr 7e-4": {**NO_DROPOUT, "lr": 7e-4},
    "dropout 0, lr 1.5e-3": {**NO_DROPOUT, "lr": 1.5e-3},
    "dropout 0, init 0.01": {**NO_DROPOUT, "initializer_range": 0.01},
    "dropout 0, init 0.04": {**NO_DROPOUT, "initializer_range": 0.04},
    "dropout 0, init 0.05": {**NO_DROPOUT, "initializer_range": 0.05},
    "dropout 0, init 0.08": {**NO_DROPOUT, "initializer_range": 0.08},
    "new": {**NO_DROPOUT, "initializer_range": 0.05, "lr": 1.5e-3},
    "dropout 0, init 0.05, lr 2e-3": {**NO_DROPOUT, "initializer_range": 0.05, "lr": 2e-3},
}


def run_variant(name: str, stop: int, schedule: int, out: Path, **extra: Any) -> dict[str, Any]:
    from xlnet import training as T
    from xlnet.pretrain import PretrainConfig, pretrain

    settings = {**OLD, "max_steps": schedule, "save_every": 10**9, "progress": False, **VARIANTS[name], **extra}
    start = time.perf_counter()
    pretrain(PretrainConfig(out_dir=str(out), **settings), stop_after_steps=stop)
    seconds = time.perf_counter() - start
    valid = {r["step"]: r["loss"] for r in T.read_metrics(out / "metrics.jsonl") if r["split"] == "valid"}
    return {"variant": name, "settings": VARIANTS[name], "valid": valid, "s_per_step": seconds / stop}


def format_rows(rows: list[dict[str, Any]]) -> str:
    steps = sorted({s for r in rows for s in r["valid"]})
    lines = ["| variant (over dropout 0.1, init 0.02, lr 1e-3) | " + " | ".join(f"step {s}" for s in steps)
             + " | s/step |", "|---|" + "---:|" * (len(steps) + 1)]
    for r in rows:
        losses = " | ".join(f"{r['valid'][s]:.3f}" if s in r["valid"] else "-" for s in steps)
        lines.append(f"| {r['variant']} | {losses} | {r['s_per_step']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                    help="among: " + ", ".join(VARIANTS))
    ap.add_argument("--stop", type=int, default=None, help="steps run per variant (default 400; --quick: 4)")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="the lr schedule's length (max_steps; default 1000; --quick: 8)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--quick", action="store_true", help="a 1-layer model and few steps: checks the script runs")
    args = ap.parse_args(argv)
    stop = args.stop or (4 if args.quick else 400)
    schedule = args.schedule_steps or (8 if args.quick else 1000)

    from xlnet.allocator import tune_host_allocator

    tune_host_allocator()
    extra = dict(n_layer=1, eval_every=2, eval_batches=1, warmup_steps=1) if args.quick else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants):
            rows.append(run_variant(name, stop, schedule, Path(tmp) / str(i), **extra))
            print(f"{name}: " + ", ".join(f"{s} {v:.3f}" for s, v in rows[-1]["valid"].items()), flush=True)
    print(format_rows(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
