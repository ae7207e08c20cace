"""`xlnet demo --quick`: the whole pipeline (pretrain -> fine-tune x2 -> baseline -> table, plots) in miniature."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("labels", [["majority", "PLM", "random init"],
                                    ["majority", "PLM", "PLM - span targets", "PLM + bi_data", "random init"],
                                    ["majority", "PLM", "MLM", "CLM", "CLM on span targets", "PLM - memory",
                                     "PLM - span targets", "PLM + bi_data", "PLM, left-to-right order", "random init"]])
def test_bar_labels_never_overlap(labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlnet.demo import bar_labels, tick_labels_overlap

    fig, (_, ax) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)  # the seed plot's bar panel
    ax.bar(range(len(labels)), [1.0] * len(labels))
    bar_labels(ax, labels)
    ticks = ax.get_xticklabels()
    shown = [t.get_text() for t in ticks]
    assert [s.replace("\n", " ") for s in shown] == labels  # wrapped at spaces only, never cut
    assert (shown == labels) == (len(labels) == 3)  # short names stay as they are
    tilted = ticks[0].get_rotation() != 0
    assert tilted == (len(labels) == 10)  # five fit once wrapped; ten need the tilt as well
    assert tilted or not tick_labels_overlap(ax)
    plt.close(fig)


def test_bad_finetuning_settings_fail_before_pretraining(tmp_path: Path, capsys) -> None:
    """A fine-tuning setting that cannot train fails at once, not after minutes of pretraining."""
    from xlnet.cli import main

    code = main(["demo", "--quick", "true", "--finetune-lr", "-1", "--out-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "lr must be positive" in err
    assert not (tmp_path / "d").exists()
