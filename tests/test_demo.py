"""`xlnet demo --quick`: the whole pipeline (pretrain -> fine-tune x2 -> baseline -> table, plots) in miniature."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from xlnet.cli import main
from xlnet.errors import XLNetError


def quick_demo(tmp_path: Path, capsys, monkeypatch, *flags: str) -> tuple[Path, str]:
    """`xlnet demo --quick true FLAGS` into tmp_path/demo with a cache of its own: (the folder, what it printed)."""
    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "true", *flags, "--out-dir", str(demo)]) == 0
    return demo, capsys.readouterr().out


def test_quick_demo_runs_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    demo, out = quick_demo(tmp_path, capsys, monkeypatch)
    assert "majority class" in out and "mini XLNet, PLM pretrained" in out and "mini XLNet, random init" in out
    results = json.loads((demo / "results.json").read_text())
    models = [row["model"] for row in results["table"]]
    assert models == ["majority class", "mini XLNet, PLM pretrained", "mini XLNet, random init"]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in results["table"])
    assert results["pretrain"]["plm"]["valid_loss"] < results["pretrain"]["plm"]["valid_loss_start"]
    assert (demo / "demo.png").stat().st_size > 10_000
    # the random-init arm has the pretrained arm's architecture but not its weights
    pre = json.loads((demo / "finetune-plm" / "best" / "config.json").read_text())
    rnd = json.loads((demo / "finetune-random" / "best" / "config.json").read_text())
    assert pre["d_model"] == rnd["d_model"] == 128


def test_quick_demo_compares_objectives(tmp_path: Path, capsys, monkeypatch) -> None:
    demo, out = quick_demo(tmp_path, capsys, monkeypatch, "--objectives", "plm", "mlm", "clm", "clm-targets",
                           "infoword")
    assert "== 11/11 fine-tuning on supersense from random init" in out
    results = json.loads((demo / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [
        "majority class", "mini XLNet, PLM pretrained", "mini XLNet, MLM pretrained", "mini XLNet, CLM pretrained",
        "mini XLNet, CLM on span targets pretrained", "mini XLNet, InfoWord pretrained", "mini XLNet, random init"]
    for key, objective in (("plm", "plm"), ("mlm", "mlm"), ("clm", "clm"), ("clm-targets", "clm"),
                           ("infoword", "infoword")):
        summary = results["pretrain"][key]
        folder = demo / ("pretrain" if key == "plm" else f"pretrain-{key}")
        assert summary["objective"] == objective and Path(summary["out_dir"]) == folder
        assert (demo / f"finetune-{key}" / "best" / "config.json").is_file()
    clm_predict = {k: yaml.safe_load((demo / f"pretrain-{k}" / "config.yaml").read_text())["clm_predict"]
                   for k in ("clm", "clm-targets")}
    assert clm_predict == {"clm": "all", "clm-targets": "targets"}
    assert len(results["plots"]) == 6 and all(Path(p).is_file() for p in results["plots"])
    assert main(["demo", "--objectives", "plm", "plm", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "distinct names" in capsys.readouterr().err


def test_quick_demo_runs_the_paper_ablations(tmp_path: Path, capsys, monkeypatch) -> None:
    demo, out = quick_demo(tmp_path, capsys, monkeypatch, "--ablations", "no-memory", "no-span", "bi-data",
                           "ltr-order")
    assert "== 2/11 pretraining, PLM - memory (4 steps" in out
    results = json.loads((demo / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [
        "majority class", "mini XLNet, PLM pretrained", "mini XLNet, PLM - memory", "mini XLNet, PLM - span targets",
        "mini XLNet, PLM + bi_data", "mini XLNet, PLM, left-to-right order", "mini XLNet, random init"]
    # each ablation is the PLM run with one setting changed, as its checkpoint's config records
    changed = {"plm-no-memory": {"mem_len": 0}, "plm-no-span": {"max_ngram": 1}, "plm-bi-data": {"bi_data": True},
               "plm-ltr-order": {"factorization_order": "left-to-right"}}
    plm = yaml.safe_load((demo / "pretrain" / "config.yaml").read_text())
    for key, change in changed.items():
        config = yaml.safe_load((demo / f"pretrain-{key}" / "config.yaml").read_text())
        assert {k: v for k, v in config.items() if plm[k] != v and k != "out_dir"} == change
        assert Path(results["pretrain"][key]["out_dir"]) == demo / f"pretrain-{key}"
        assert (demo / f"finetune-{key}" / "best" / "config.json").is_file()
    model = json.loads((demo / "finetune-plm-bi-data" / "best" / "config.json").read_text())
    assert model["d_model"] == 128
    for bad in (["--ablations", "no-memory", "no-memory"], ["--ablations", "no-dropout"],
                ["--objectives", "mlm", "--ablations", "no-span"]):
        assert main(["demo", *bad, "--out-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("distinct names" in err or "keep plm" in err)


def test_quick_demo_repeats_every_arm_per_seed(tmp_path: Path, capsys, monkeypatch) -> None:
    demo, out = quick_demo(tmp_path, capsys, monkeypatch, "--objectives", "plm", "mlm", "--seed", "3", "--seeds", "2")
    assert "==== seed 4 (2 of 2)" in out and "test acc by seed" in out and "higher in" in out
    # the first seed is the plain demo's layout (a one-seed run already there is reused), later seeds in seed<N>/
    for folder, seed in ((demo, 3), (demo / "seed4", 4)):
        for run in ("pretrain", "pretrain-mlm"):
            assert yaml.safe_load((folder / run / "config.yaml").read_text())["seed"] == seed
        assert json.loads((folder / "results.json").read_text())["config"]["seed"] == seed
    results = json.loads((demo / "results-seeds.json").read_text())
    assert results["seeds"] == [3, 4] and (demo / "demo-seeds.png").stat().st_size > 10_000
    per_seed = [json.loads(Path(p).read_text())["table"] for p in results["runs"]]
    for i, row in enumerate(results["table"]):
        assert row["test_accuracy"] == [t[i]["test_accuracy"] for t in per_seed]
    pretrained = json.loads((demo / "seed4" / "results.json").read_text())["pretrain"]["mlm"]
    assert results["table"][2]["valid_loss"][1] == pretrained["valid_loss"]
    assert [d["model"] for d in results["differences"]] == ["mini XLNet, MLM pretrained", "mini XLNet, random init"]
    assert main(["demo", "--seeds", "0", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--seeds takes a count of at least 1" in capsys.readouterr().err


def test_seed_aggregates_are_paired_means_and_sample_spreads() -> None:
    from xlnet.demo import format_differences, format_seed_table, mean_sd, seed_differences, seed_table

    def table(base: float, plm: float, mlm: float) -> list[dict]:
        return [{"model": "majority class", "valid_loss": None, "dev_accuracy": None, "test_accuracy": base,
                 "test_f1_macro": 0.01},
                {"model": "mini XLNet, PLM pretrained", "valid_loss": 10 * plm, "dev_accuracy": plm,
                 "test_accuracy": plm, "test_f1_macro": 0.1},
                {"model": "mini XLNet, MLM pretrained", "valid_loss": 10 * mlm, "dev_accuracy": mlm,
                 "test_accuracy": mlm, "test_f1_macro": 0.2}]

    rows = seed_table([table(0.1, 0.30, 0.40), table(0.1, 0.36, 0.35), table(0.1, 0.33, 0.42)])
    assert rows[1]["test_accuracy"] == [0.30, 0.36, 0.33] and rows[0]["dev_accuracy"] == [None] * 3
    mean, sd = mean_sd(rows[1]["test_accuracy"])
    assert abs(mean - 0.33) < 1e-12 and abs(sd - 0.03) < 1e-12  # sample sd: sqrt((0.03² + 0.03²) / 2)
    assert mean_sd(rows[0]["dev_accuracy"]) is None
    (diff,) = seed_differences(rows)
    assert [round(d, 6) for d in diff["test_accuracy"]] == [0.10, -0.01, 0.09] and diff["higher"] == 2
    assert abs(diff["mean"] - 0.06) < 1e-12
    text = format_seed_table(rows, [0, 1, 2]) + "\n" + format_differences([diff])
    assert "3.300 ± 0.300" in text and "33.0 ± 3.0" in text and "30.0  36.0  33.0" in text and "+6.0 mean  (+10.0 -1.0 +9.0)  higher in 2 of 3" in text
    with pytest.raises(XLNetError, match="different models"):
        seed_table([table(0.1, 0.3, 0.4), table(0.1, 0.3, 0.4)[:2]])


def synthetic_results(root: Path, seeds: int) -> tuple[list, list[dict], list[dict]]:
    """(arms, per-seed results, seed table) of a demo with every objective and ablation (11 table rows), with
    metrics.jsonl files under root; the last arm near 100% so its value sits where the title used to be hit."""
    from xlnet.demo import DemoConfig, pretraining_arms, seed_table

    cfg = DemoConfig(objectives=("plm", "mlm", "clm", "clm-targets", "infoword"),
                     ablations=("no-memory", "no-span", "bi-data", "ltr-order"))
    arms = pretraining_arms(cfg)
    names = ["majority class"] + [f"mini XLNet, {a.name}" for a in arms] + ["mini XLNet, random init"]
    per_seed = []
    for s in range(seeds):
        pre, runs = {}, {}
        for i, (key, name) in enumerate([(a.key, a.name) for a in arms] + [("random", "random init")]):
            folder = root / f"seed{s}" / key
            folder.mkdir(parents=True)
            rows = [{"split": split, "step": step, "loss": 9 - step / 300 + (i + s) / 10, "accuracy": step / 4000}
                    for step in range(0, 2001, 250) for split in ("train", "valid")]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs[name] = {"config": {"out_dir": str(folder)}}
            if key != "random":
                pre[key] = {"out_dir": str(folder)}
        table = [{"model": n, "test_accuracy": 0.2 + 0.05 * i + 0.02 * s} for i, n in enumerate(names)]
        table[-2]["test_accuracy"] = 0.99
        per_seed.append({"pretrain": pre, "runs": runs, "table": table})
    return arms, per_seed, seed_table([r["table"] for r in per_seed])


def assert_readable(fig, ax_bar, curve_axes: list) -> None:
    """Bar names do not touch, no value leaves its panel or reaches its title, no legend covers a curve panel."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    names = sorted((t.get_window_extent(renderer) for t in ax_bar.get_yticklabels()), key=lambda b: b.y0)
    assert len(names) == 11 and all(low.y1 <= high.y0 for low, high in zip(names, names[1:]))
    panel, title = ax_bar.get_window_extent(renderer), ax_bar.title.get_window_extent(renderer)
    values = [t.get_window_extent(renderer) for t in ax_bar.texts]
    assert len(values) == 11 and all(v.x1 <= panel.x1 and v.y1 <= min(panel.y1, title.y0) for v in values)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends and not any(leg.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
                               for leg in legends for ax in curve_axes)


def test_plots_stay_readable_with_eleven_models(tmp_path: Path) -> None:
    """demo-seeds.png and demo.png for every objective and ablation: horizontal bars named on the y axis, values
    beside the bars, legends outside the curves (upright bars had overlapping names, a value in the title and
    legends over the curves)."""
    import matplotlib.pyplot as plt

    from xlnet.demo import demo_figure, seed_figure, write_seed_plot

    arms, per_seed, table = synthetic_results(tmp_path / "runs", seeds=2)
    fig = seed_figure(arms, per_seed, table)
    ax_loss, ax_bar = fig.axes
    assert [t.get_text() for t in ax_bar.get_yticklabels()][-3:] == ["PLM + bi_data", "PLM, left-to-right order",
                                                                   "random init"]
    assert_readable(fig, ax_bar, [ax_loss])
    plt.close(fig)
    one = per_seed[0]
    fig = demo_figure(arms, one["pretrain"], one["runs"], one["table"])
    ax_loss, ax_dev, ax_bar = fig.axes
    assert_readable(fig, ax_bar, [ax_loss, ax_dev])
    plt.close(fig)
    path = write_seed_plot(tmp_path, arms, per_seed, table)
    assert path == tmp_path / "demo-seeds.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert path.stat().st_size > 10_000 and not list(tmp_path.glob(".*.tmp"))


def test_bad_finetuning_settings_fail_before_pretraining(tmp_path: Path, capsys) -> None:
    """A fine-tuning setting that cannot train fails at once, not after minutes of pretraining."""
    from xlnet.cli import main

    code = main(["demo", "--quick", "true", "--finetune-lr", "-1", "--out-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "lr must be positive" in err
    assert not (tmp_path / "d").exists()


def test_quick_takes_the_counts_that_were_set() -> None:
    """--quick fills in the counts left unset with its small ones; a count that was set wins (it used to be
    ignored: --quick --pretrain-steps 10 pretrained 4 steps)."""
    from xlnet.demo import Arm, DemoConfig, finetune_config, pretrain_config, resolve_counts

    quick = resolve_counts(DemoConfig(quick=True))
    assert (quick.pretrain_steps, quick.finetune_epochs, quick.train_examples, quick.eval_examples) == (4, 1, 64, 64)
    full = resolve_counts(DemoConfig())
    assert (full.pretrain_steps, full.finetune_epochs, full.train_examples, full.eval_examples) == (2000, 3, 4000, 2000)
    mine = resolve_counts(DemoConfig(quick=True, pretrain_steps=10, finetune_epochs=2, train_examples=0))
    pre = pretrain_config(mine, Arm("plm", "PLM pretrained"))
    assert (pre.max_steps, pre.eval_every, pre.warmup_steps) == (10, 2, 1)
    ft = finetune_config(mine, Path("x"), "m", random_init=False)
    assert (ft.epochs, ft.max_train_examples, ft.max_eval_examples) == (2, 0, 64)  # 0 examples: all of them


def fake_pretraining_run(folder: Path, config: dict) -> None:
    """A checkpoint as far as the demo's reuse check reads one: trainer_state.json with the run's config."""
    (folder / "checkpoints" / "step_00000004").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000004" / "trainer_state.json").write_text(json.dumps({"config": config}))


def test_rerun_refuses_pretraining_runs_made_with_other_settings(tmp_path: Path, capsys) -> None:
    """Each arm's folder (every seed's, before any work) against the settings the demo would pretrain it with."""
    from dataclasses import asdict

    from xlnet.demo import DemoConfig, check_reuse, pretrain_config, pretraining_arms, resolve_counts

    cfg = resolve_counts(DemoConfig(out_dir=str(tmp_path / "d"), quick=True, ablations=("no-span",)))
    plm, no_span = (asdict(pretrain_config(cfg, arm)) for arm in pretraining_arms(cfg))
    fake_pretraining_run(tmp_path / "d" / "pretrain", plm)
    fake_pretraining_run(tmp_path / "d" / "pretrain-plm-no-span", no_span)
    check_reuse(cfg)  # the same settings: reused
    for change, message in ((dict(pretrain_steps=6), "with max_steps 4, this demo asks for 6 (--pretrain-steps)"),
                            (dict(seed=1), "with seed 0, this demo asks for 1 (--seed)"),
                            (dict(quick=False, pretrain_steps=4), "warmup_steps 1, this demo asks for 100 (--quick)")):
        with pytest.raises(XLNetError, match=re.escape(message)):
            check_reuse(resolve_counts(DemoConfig(out_dir=cfg.out_dir, ablations=("no-span",),
                                                  **{"quick": True, **change})))
    fake_pretraining_run(tmp_path / "e" / "pretrain-plm-no-span", {**no_span, "max_ngram": 3})
    with pytest.raises(XLNetError, match=r"max_ngram 3, this demo asks for 1 \(the plm-no-span arm\)"):
        check_reuse(resolve_counts(DemoConfig(out_dir=str(tmp_path / "e"), quick=True, ablations=("no-span",))))
    # through the CLI: one line naming the folder, before anything runs (the second seed's folder included)
    fake_pretraining_run(tmp_path / "f" / "seed1" / "pretrain", {**plm, "seed": 1, "max_steps": 9})
    capsys.readouterr()
    assert main(["demo", "--quick", "true", "--seeds", "2", "--out-dir", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "f" / "seed1") in err and "choose another --out-dir" in err
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["seed1"]


def test_sigterm_in_pretraining_ends_as_other_verbs_and_a_plain_rerun_continues(tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """SIGTERM while the demo pretrains: the checkpoint is saved, exit 143 with cli's one line, and the hint names
    what continues it (a plain rerun; `xlnet demo` has no --resume). A rerun with another step count is refused
    (it would stretch the run), one with the same settings finishes it; --pretrain-steps wins over --quick's."""
    from xlnet import training as T

    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    log = T.MetricsLogger.log

    def terminate_after_step_one(self, split: str, step: int, **values) -> None:
        log(self, split, step, **values)
        if split == "train" and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(T.MetricsLogger, "log", terminate_after_step_one)
    flags = ["demo", "--quick", "true", "--out-dir", str(demo)]
    assert main([*flags, "--pretrain-steps", "3"]) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "== 1/3 pretraining, PLM (3 steps" in captured.out and "stopped by SIGTERM" in captured.out
    assert "rerun the same `xlnet demo` command to continue" in captured.err and "--resume" not in captured.err
    assert captured.err.strip().splitlines()[-1] == "xlnet demo: terminated (SIGTERM)"
    assert T.read_trainer_state(T.latest_checkpoint(demo / "pretrain"))["step"] < 3  # (a step is queued ahead)
    monkeypatch.setattr(T.MetricsLogger, "log", log)
    assert main(flags) == 2  # --quick's 4 steps against the run's 3
    assert "with max_steps 3, this demo asks for 4 (--pretrain-steps)" in capsys.readouterr().err
    assert main([*flags, "--pretrain-steps", "3"]) == 0
    results = json.loads((demo / "results.json").read_text())
    assert results["pretrain"]["plm"]["steps"] == results["config"]["pretrain_steps"] == 3
