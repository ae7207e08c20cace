"""`xlnet demo`: the whole product in one command on the embedded data, sized for a 2-core CPU (~15 minutes).

1. pretrain a mini XLNet (4 layers x 128) with the permutation LM objective on the embedded corpus (train-split WordNet
   glosses + the King James Bible);
2. fine-tune it on WordNet supersense classification (45 classes; gloss -> lexicographer file);
3. fine-tune the same architecture from random initialisation with the same recipe;
4. score both on held-out test synsets next to a majority-class baseline, print a table, write plots.

`--objectives plm mlm clm infoword` pretrains one model per objective (the same backbone, samples and budget; BERT's
masked LM, a left-to-right LM and InfoWord next to XLNet's permutation LM) and fine-tunes each: the objectives
compared downstream.
`--ablations no-memory no-span bi-data` adds PLM runs with one of the paper's ablations each (its Table 6 rows that
one setting expresses): no recurrence memory, single-token instead of span targets, bidirectional data;
`ltr-order` (not the paper's) keeps XLNet's targets and query stream but fixes the factorization order to left to
right.
`--seeds 3` repeats every arm, pretraining included, with seeds seed, seed+1, seed+2 (the first seed's runs are the
plain demo's folders, the others go to seed<N>/) and prints mean, spread and seed-by-seed differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from xlnet import metrics as M
from xlnet import tasks as T
from xlnet.assets import supersense_path
from xlnet.cli import Terminated
from xlnet.cliconf import add_dataclass_arguments, build_dataclass
from xlnet.errors import XLNetError
from xlnet.fileio import atomic_write
from xlnet.finetune import FinetuneConfig, finetune, resolve_config, subsample
from xlnet.plots import pyplot, save_png
from xlnet.pretrain import PretrainConfig, format_summary, pretrain, saved_config
from xlnet.training import latest_checkpoint, read_metrics, read_trainer_state


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    # the step and example counts left unset take the demo's values, or --quick's smaller ones; set, they win
    pretrain_steps: int = 0  # 0 = the pretraining default (configs/pretrain-mini.yaml values; 4 with --quick)
    finetune_epochs: int | None = None  # unset: 3 (1 with --quick)
    train_examples: int | None = None  # supersense training synsets used for fine-tuning; unset: 4000 (64 with --quick)
    eval_examples: int | None = None  # dev and test synsets scored; unset: 2000 (64 with --quick)
    max_seq_len: int = 64
    finetune_lr: float = 5e-4
    seed: int = 0
    seeds: int = 1  # repeat everything (pretraining too) with seeds seed .. seed + seeds - 1; report mean and spread
    quick: bool = False  # a one-minute smoke version (few steps; scores meaningless); counts set explicitly win
    objectives: tuple[str, ...] = ("plm",)  # pretraining objectives to compare: plm, mlm, clm, clm-targets, infoword
    ablations: tuple[str, ...] = ()  # PLM ablations to add: no-memory, no-span, bi-data, ltr-order


# --objectives names: (table name, PretrainConfig settings); clm-targets is the left-to-right LM on the span targets
# only, PLM's tokens and as many (equal signal)
OBJECTIVES: dict[str, tuple[str, dict[str, Any]]] = {
    "plm": ("PLM", {"objective": "plm"}), "mlm": ("MLM", {"objective": "mlm"}), "clm": ("CLM", {"objective": "clm"}),
    "clm-targets": ("CLM on span targets", {"objective": "clm", "clm_predict": "targets"}),
    "infoword": ("InfoWord", {"objective": "infoword"})}
# The paper's ablations that one pretraining setting expresses, each one change to the PLM run: (name, change).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "no-memory": ("PLM - memory", {"mem_len": 0}),
    "no-span": ("PLM - span targets", {"max_ngram": 1}),
    "bi-data": ("PLM + bi_data", {"bi_data": True}),
    # not one of the paper's: XLNet's targets and query stream in the fixed left-to-right order (the paper's
    # argument is that sampled orders give bidirectional context; this arm keeps everything else)
    "ltr-order": ("PLM, left-to-right order", {"factorization_order": "left-to-right"}),
}


@dataclass
class Arm:
    """One pretraining run and the fine-tuning from it."""

    key: str  # results.json key and folder suffix: plm, mlm, clm, plm-no-memory ...
    name: str  # table row and plot label
    settings: dict[str, Any] = field(default_factory=dict)  # PretrainConfig fields that differ from the default


def pretraining_arms(cfg: DemoConfig) -> list[Arm]:
    arms = [Arm(o, f"{OBJECTIVES[o][0]} pretrained", OBJECTIVES[o][1]) for o in cfg.objectives]
    return arms + [Arm(f"plm-{a}", *ABLATIONS[a]) for a in cfg.ablations]


# the counts a DemoConfig leaves unset: (the full demo's, --quick's)
COUNTS: dict[str, tuple[int, int]] = {"pretrain_steps": (PretrainConfig.max_steps, 4), "finetune_epochs": (3, 1),
                                      "train_examples": (4000, 64), "eval_examples": (2000, 64)}


def resolve_counts(cfg: DemoConfig) -> DemoConfig:
    """cfg with its unset counts (None, pretrain_steps 0) filled in, --quick's where it is on: a count that was
    set (flag or YAML) wins over --quick's. (0 examples is a setting: all of them.)"""
    unset = {k: full_quick[cfg.quick] for k, full_quick in COUNTS.items()
             if getattr(cfg, k) is None or (k == "pretrain_steps" and cfg.pretrain_steps == 0)}
    return replace(cfg, **unset)


def pretrain_config(cfg: DemoConfig, arm: Arm) -> PretrainConfig:
    """The arm's pretraining settings (cfg: resolved by resolve_counts)."""
    name = "pretrain" if arm.key == "plm" else f"pretrain-{arm.key}"
    pre = PretrainConfig(out_dir=str(Path(cfg.out_dir) / name), seed=cfg.seed, max_steps=cfg.pretrain_steps,
                         **arm.settings)
    if cfg.quick:
        pre.eval_every, pre.eval_batches, pre.warmup_steps = 2, 1, 1
    return pre


def check_arms(cfg: DemoConfig) -> None:
    for flag, names, known in (("objectives", cfg.objectives, OBJECTIVES), ("ablations", cfg.ablations, ABLATIONS)):
        if (flag == "objectives" and not names) or len(set(names)) != len(names) or set(names) - set(known):
            raise XLNetError(f"--{flag} takes distinct names among {', '.join(known)}, got {' '.join(names)}")
    if cfg.ablations and "plm" not in cfg.objectives:
        raise XLNetError("--ablations change the PLM run; keep plm in --objectives to compare against it")
    # the fine-tuning settings too, before pretraining spends minutes
    resolve_config(finetune_config(cfg, Path(cfg.out_dir), "", random_init=False), T.get_task("supersense"))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    cfg = resolve_counts(cfg)
    check_arms(cfg)
    if cfg.seeds < 1:
        raise XLNetError(f"--seeds takes a count of at least 1, got {cfg.seeds}")
    per_seed_cfgs = seed_configs(cfg)
    for seed_cfg in per_seed_cfgs:  # every seed's folders, before minutes go into the first one
        check_reuse(seed_cfg)
    if cfg.seeds == 1:
        return run_seed(cfg)
    per_seed = []
    for i, seed_cfg in enumerate(per_seed_cfgs):
        print(f"==== seed {seed_cfg.seed} ({i + 1} of {cfg.seeds})")
        per_seed.append(run_seed(seed_cfg))
    return summarize_seeds(cfg, per_seed)


def seed_configs(cfg: DemoConfig) -> list[DemoConfig]:
    """One single-seed config per seed; the first seed's runs are the plain demo's folders (so a one-seed demo
    already run is reused), the others go to seed<N>/."""
    if cfg.seeds == 1:
        return [cfg]
    out = Path(cfg.out_dir)
    return [replace(cfg, seed=cfg.seed + i, seeds=1, out_dir=str(out / f"seed{cfg.seed + i}" if i else out))
            for i in range(cfg.seeds)]


# the pretraining settings the demo chooses, and the demo flag behind each (for the error message)
DEMO_PRETRAIN_SETTINGS = {"max_steps": "--pretrain-steps", "seed": "--seed", "warmup_steps": "--quick",
                          "eval_every": "--quick", "eval_batches": "--quick"}


def check_reuse(cfg: DemoConfig) -> None:
    """A rerun continues (or reuses) the pretraining run it finds in each arm's folder. A run made with other
    settings would be cut short or stretched past the length its schedule was built for, and reported as this
    demo's, so it is refused, as pretraining itself refuses another seed."""
    for arm in pretraining_arms(cfg):
        pre = pretrain_config(cfg, arm)
        ckpt = latest_checkpoint(pre.out_dir)
        if ckpt is None:
            continue
        saved = saved_config(read_trainer_state(ckpt))
        for k in (*DEMO_PRETRAIN_SETTINGS, *arm.settings):
            if saved[k] != getattr(pre, k):
                flag = DEMO_PRETRAIN_SETTINGS.get(k, f"the {arm.key} arm")
                raise XLNetError(f"{cfg.out_dir} holds a pretraining run ({pre.out_dir}) with {k} {saved[k]!r}, "
                                 f"this demo asks for {getattr(pre, k)!r} ({flag}); choose another --out-dir, or "
                                 "rerun with that run's settings")


def run_seed(cfg: DemoConfig) -> dict[str, Any]:
    """Every arm once with cfg.seed: pretrain, fine-tune, score; results.json and demo.png in cfg.out_dir."""
    out = Path(cfg.out_dir)
    arms = pretraining_arms(cfg)
    stages, stage = 2 * len(arms) + 1, 0
    pre: dict[str, dict[str, Any]] = {}
    for arm in arms:
        pre_cfg = pretrain_config(cfg, arm)
        stage += 1
        print(f"== {stage}/{stages} pretraining, {arm.name.replace(' pretrained', '')} ({pre_cfg.max_steps} steps "
              f"of {pre_cfg.batch_size} x {pre_cfg.seq_len} tokens)")
        # A second `xlnet demo` into the same directory reuses (or finishes) the pretraining run it finds there
        # (check_reuse: one made with the same settings).
        pre[arm.key] = pretrain(pre_cfg, resume="latest" if latest_checkpoint(pre_cfg.out_dir) else None,
                                resume_hint="rerun the same `xlnet demo` command to continue from it")
        print(format_summary(pre[arm.key]))
        if pre[arm.key]["stopped"]:  # the checkpoint is saved; end as the CLI ends any verb on that signal
            raise Terminated if pre[arm.key]["stopped"] == "SIGTERM" else KeyboardInterrupt

    runs = {}
    starts = [(arm.name, f"finetune-{arm.key}", pre[arm.key]["checkpoint"]) for arm in arms]
    # the random-init arm builds the first arm's architecture from its checkpoint's config, not its weights
    for name, folder, model in [*starts, ("random init", "finetune-random", starts[0][2])]:
        stage += 1
        print(f"== {stage}/{stages} fine-tuning on supersense from {name}")
        runs[name] = finetune(finetune_config(cfg, out / folder, model, random_init=name == "random init"))

    table = score_table(cfg, runs, {arm.name: pre[arm.key].get("valid_loss") for arm in arms})
    results = {"config": asdict(cfg), "pretrain": pre, "table": table,
               "finetune": {k: {"dev": v.get("dev"), "test": v.get("test")} for k, v in runs.items()}}
    results["plots"] = [str(p) for p in write_plots(out, arms, pre, runs, table)]
    with atomic_write(out / "results.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(format_table(table))
    print("plots: " + ", ".join(results["plots"]))
    return results


def finetune_config(cfg: DemoConfig, out_dir: Path, model: str, random_init: bool) -> FinetuneConfig:
    """cfg: resolved by resolve_counts."""
    return FinetuneConfig(task="supersense", model=model, random_init=random_init, out_dir=str(out_dir),
                          seed=cfg.seed, max_seq_len=cfg.max_seq_len, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                          max_train_examples=cfg.train_examples, max_eval_examples=cfg.eval_examples, quiet=False)


def majority_baseline(cfg: DemoConfig) -> dict[str, float]:
    """Predict the most frequent training label for every test synset."""
    spec = T.get_task("supersense")
    train = T.read_text_examples(spec, supersense_path("train"))
    majority = Counter(e.label for e in subsample(train, cfg.train_examples, cfg.seed)).most_common(1)[0][0]
    test = subsample(T.read_text_examples(spec, supersense_path("test")), cfg.eval_examples, cfg.seed)
    gold = [e.label for e in test]
    preds = [majority] * len(gold)
    return {"accuracy": M.accuracy(preds, gold), "f1_macro": M.f1_macro(preds, gold)}


def score_table(cfg: DemoConfig, runs: dict[str, dict[str, Any]],
                valid_loss: dict[str, float | None]) -> list[dict[str, Any]]:
    """One row per model; `valid_loss` is each pretrained arm's final pretraining valid loss (by arm name)."""
    rows = [{"model": "majority class", "valid_loss": None, "dev_accuracy": None,
             **prefixed("test_", majority_baseline(cfg))}]
    for name, summary in runs.items():
        dev, test = summary.get("dev") or {}, summary.get("test") or {}
        rows.append({"model": f"mini XLNet, {name}", "valid_loss": valid_loss.get(name),
                     "dev_accuracy": (dev.get("metrics") or {}).get("accuracy"),
                     **prefixed("test_", test.get("metrics") or {})})
    return rows


def prefixed(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    return {prefix + k: v for k, v in d.items() if k in ("accuracy", "f1_macro")}


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "    -" if v is None else f"{100 * v:5.1f}"

    width = max(28, *(len(r["model"]) for r in rows))
    lines = ["WordNet supersense (45 classes), held-out synsets",
             f"{'model':<{width}} {'dev acc':>8} {'test acc':>9} {'test macro-F1':>14}"]
    for r in rows:
        lines.append(f"{r['model']:<{width}} {f(r['dev_accuracy']):>8} {f(r.get('test_accuracy')):>9} "
                     f"{f(r.get('test_f1_macro')):>14}")
    return "\n".join(lines)


def summarize_seeds(cfg: DemoConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the seeds' tables: print mean ± sd and the seed-by-seed differences; results-seeds.json, a plot."""
    out = Path(cfg.out_dir)
    seeds = [r["config"]["seed"] for r in per_seed]
    table = seed_table([r["table"] for r in per_seed])
    differences = seed_differences(table)
    results = {"config": asdict(cfg), "seeds": seeds, "table": table, "differences": differences,
               "runs": [str(Path(r["config"]["out_dir"]) / "results.json") for r in per_seed]}
    results["plots"] = [str(write_seed_plot(out, pretraining_arms(cfg), per_seed, table))]
    with atomic_write(out / "results-seeds.json", "w") as f:
        json.dump(results, f, indent=2)
    print(format_seed_table(table, seeds))
    print(format_differences(differences))
    print("plots: " + ", ".join(results["plots"]))
    return results


SCORES = ("valid_loss", "dev_accuracy", "test_accuracy", "test_f1_macro")


def seed_table(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model with each score's list over the seeds (None where the row has no such score)."""
    models = [r["model"] for r in tables[0]]
    if any([r["model"] for r in t] != models for t in tables):
        raise XLNetError("the seeds' tables list different models; rerun them with the same arms")
    return [{"model": m, **{k: [t[i].get(k) for t in tables] for k in SCORES}} for i, m in enumerate(models)]


def mean_sd(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation, None if any seed lacks the score."""
    if any(v is None for v in values):
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0  # type: ignore[arg-type]


def seed_differences(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model's test accuracy minus the first pretrained arm's, seed by seed (the seeds pair the runs: the same
    fine-tuning synsets and samples)."""
    reference, *others = [r for r in table if r["model"] != "majority class"]
    rows = []
    for r in others:
        diffs = [a - b for a, b in zip(r["test_accuracy"], reference["test_accuracy"])]
        rows.append({"model": r["model"], "against": reference["model"], "test_accuracy": diffs,
                     "mean": statistics.fmean(diffs), "higher": sum(d > 0 for d in diffs)})
    return rows


def format_seed_table(table: list[dict[str, Any]], seeds: list[int]) -> str:
    def f(values: list[float | None], scale: float = 100, digits: int = 1) -> str:
        stats = mean_sd(values)
        return "-" if stats is None else f"{scale * stats[0]:.{digits}f} ± {scale * stats[1]:.{digits}f}"

    width = max(28, *(len(r["model"]) for r in table))
    by_seed = max(6 * len(seeds), 17)
    lines = [f"WordNet supersense (45 classes), held-out synsets; seeds {' '.join(map(str, seeds))} "
             "(each pretrains and fine-tunes anew)",
             f"{'model':<{width}} {'valid loss':>15} {'dev acc':>12} {'test acc':>12} {'test acc by seed':>{by_seed}} "
             f"{'test macro-F1':>14}"]
    for r in table:
        per_seed = " ".join(f"{100 * v:5.1f}" for v in r["test_accuracy"])
        lines.append(f"{r['model']:<{width}} {f(r['valid_loss'], 1, 3):>15} {f(r['dev_accuracy']):>12} "
                     f"{f(r['test_accuracy']):>12} {per_seed:>{by_seed}} {f(r['test_f1_macro']):>14}")
    return "\n".join(lines)


def format_differences(differences: list[dict[str, Any]]) -> str:
    if not differences:
        return ""
    lines = [f"test accuracy minus {differences[0]['against'].replace('mini XLNet, ', '')}'s, seed by seed:"]
    width = max(len(d["model"]) for d in differences) - len("mini XLNet, ")
    for d in differences:
        seeds = " ".join(f"{100 * v:+.1f}" for v in d["test_accuracy"])
        lines.append(f"  {d['model'].replace('mini XLNet, ', ''):<{width}} {100 * d['mean']:+5.1f} mean  ({seeds})  "
                     f"higher in {d['higher']} of {len(d['test_accuracy'])}")
    return "\n".join(lines)


ARM_COLORS = {"PLM pretrained": "tab:green", "MLM pretrained": "tab:blue", "CLM pretrained": "tab:purple",
              "CLM on span targets pretrained": "darkgoldenrod",
              "InfoWord pretrained": "tab:pink",
              "PLM - memory": "tab:olive", "PLM - span targets": "tab:cyan", "PLM + bi_data": "tab:brown",
              "PLM, left-to-right order": "tab:orange",
              "random init": "tab:gray", "majority class": "tab:red"}


def write_plots(out: Path, arms: list[Arm], pre: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]],
                table: list[dict[str, Any]]) -> list[Path]:
    """out/demo.png (demo_figure's plot), and the pretraining runs' own loss plots: their paths."""
    path = save_png(demo_figure(arms, pre, runs, table), out / "demo.png")
    return [path, *(Path(s["plot"]) for s in pre.values() if s.get("plot"))]


def demo_figure(arms: list[Arm], pre: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]],
                table: list[dict[str, Any]]) -> Any:
    """Pretraining loss, fine-tuning dev accuracy and test accuracy, side by side. A model has one colour in all
    three, so one legend beside them names them all (two legends inside the panels covered the curves)."""
    fig, (ax_loss, ax_dev, ax_bar) = pyplot().subplots(1, 3, figsize=(16, figure_height(table)), dpi=110,
                                                  layout="constrained")
    for arm in arms:
        rows = read_metrics(Path(pre[arm.key]["out_dir"]) / "metrics.jsonl")
        for split in ("train", "valid"):
            pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split and "loss" in r]
            if pts:
                ax_loss.plot(*zip(*pts), color=ARM_COLORS[arm.name], marker="o" if split == "valid" else None,
                             markersize=3, alpha=0.35 if split == "train" else 1.0)
    ax_loss.set(title="pretraining loss" + (" (PLM)" if len(pre) == 1 else " (each run's own targets)")
                + "\nfaint: train, dots: valid", xlabel="step", ylabel="loss")
    for name, summary in runs.items():
        rows = read_metrics(Path(summary["config"]["out_dir"]) / "metrics.jsonl")
        pts = [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "valid" and "accuracy" in r]
        if pts:
            ax_dev.plot(*zip(*pts), color=ARM_COLORS[name], marker="o", label=name)
    ax_dev.set(title="fine-tuning: dev accuracy", xlabel="step", ylabel="accuracy")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
    if ax_dev.get_legend_handles_labels()[0]:
        fig.legend(*ax_dev.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    accuracy_bars(ax_bar, table, [[100 * (r.get("test_accuracy") or 0.0)] for r in table])
    ax_bar.set_title("test accuracy (held-out synsets)")
    return fig


def figure_height(table: list[dict[str, Any]]) -> float:
    """Inches: room for one accuracy bar per table row (accuracy_bars)."""
    return max(4.2, 1.5 + 0.32 * len(table))


def accuracy_bars(ax: Any, table: list[dict[str, Any]], per_row: list[list[float]]) -> None:
    """Test accuracy (%) as horizontal bars, one per table row, top down: the mean, and for several seeds their sd
    as an error bar and each seed as a dot; the mean's value right of the bar. Named on the y axis, a dozen long
    names never collide (as tick labels under upright bars did), nor does a value run into the title (as one
    above the top bar did)."""
    names = [r["model"].replace("mini XLNet, ", "") for r in table]
    ends = []
    for i, (name, values) in enumerate(zip(names, per_row)):
        mean, sd = mean_sd(values) or (0.0, 0.0)
        several = len(values) > 1
        ax.barh(i, mean, xerr=sd if several else None, capsize=3, color=ARM_COLORS[name], alpha=0.6)
        if several:
            ax.scatter(values, [i] * len(values), color="black", s=10, zorder=3)
        ends.append(max(mean + sd, *values))
        ax.annotate(f"{mean:.1f}", (ends[-1], i), xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(names)), [n.replace(" pretrained", "").replace(" class", "") for n in names])
    ax.invert_yaxis()  # the table's order
    ax.set_xlim(0, 1.15 * max(ends, default=0.0) or 1.0)  # room for the values
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("accuracy (%)")


def write_seed_plot(out: Path, arms: list[Arm], per_seed: list[dict[str, Any]], table: list[dict[str, Any]]) -> Path:
    """out/demo-seeds.png: seed_figure's plot."""
    return save_png(seed_figure(arms, per_seed, table), out / "demo-seeds.png")


def seed_figure(arms: list[Arm], per_seed: list[dict[str, Any]], table: list[dict[str, Any]]) -> Any:
    """Validation loss of every pretraining run (one line per seed) and test accuracy: mean, sd and each seed
    (accuracy_bars). The legend sits beside the curves, not over them; the figure grows with the table."""
    fig, (ax_loss, ax_bar) = pyplot().subplots(1, 2, figsize=(13, figure_height(table)), dpi=110,
                                          layout="constrained", gridspec_kw={"width_ratios": [1.15, 1]})
    for arm in arms:
        for i, results in enumerate(per_seed):
            rows = read_metrics(Path(results["pretrain"][arm.key]["out_dir"]) / "metrics.jsonl")
            pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == "valid" and "loss" in r]
            if pts:
                ax_loss.plot(*zip(*pts), color=ARM_COLORS[arm.name], alpha=0.7, marker="o", markersize=2,
                             label=arm.name.replace(" pretrained", "") if i == 0 else None)
    ax_loss.set(title="pretraining: valid loss (each run's own targets),\none line per seed", xlabel="step",
                ylabel="loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    accuracy_bars(ax_bar, table, [[100 * v for v in row["test_accuracy"]] for row in table])
    ax_bar.set_title(f"test accuracy over {len(per_seed)} seeds\n(bar: mean ± sd, dots: seeds)")
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="options as YAML keys (flags override them)")
    add_dataclass_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    run_demo(build_dataclass(DemoConfig, args.config, args))
    return 0
