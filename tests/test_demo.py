"""`xlnet demo --quick`: the whole pipeline (pretrain -> fine-tune x2 -> baseline -> table, plots) in miniature."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from xlnet.cli import main


def test_quick_demo_runs_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "true", "--out-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "majority class" in out and "mini XLNet, PLM pretrained" in out and "mini XLNet, random init" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    models = [row["model"] for row in results["table"]]
    assert models == ["majority class", "mini XLNet, PLM pretrained", "mini XLNet, random init"]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in results["table"])
    assert results["pretrain"]["plm"]["valid_loss"] < results["pretrain"]["plm"]["valid_loss_start"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    # the random-init arm has the pretrained arm's architecture but not its weights
    pre = json.loads((tmp_path / "demo" / "finetune-plm" / "best" / "config.json").read_text())
    rnd = json.loads((tmp_path / "demo" / "finetune-random" / "best" / "config.json").read_text())
    assert pre["d_model"] == rnd["d_model"] == 128


def test_quick_demo_compares_objectives(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "true", "--objectives", "plm", "mlm", "clm", "infoword",
                 "--out-dir", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "== 9/9 fine-tuning on supersense from random init" in out
    results = json.loads((demo / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [
        "majority class", "mini XLNet, PLM pretrained", "mini XLNet, MLM pretrained", "mini XLNet, CLM pretrained",
        "mini XLNet, InfoWord pretrained", "mini XLNet, random init"]
    for objective, folder in (("plm", "pretrain"), ("mlm", "pretrain-mlm"), ("clm", "pretrain-clm"),
                              ("infoword", "pretrain-infoword")):
        summary = results["pretrain"][objective]
        assert summary["objective"] == objective and Path(summary["out_dir"]) == demo / folder
        assert (demo / f"finetune-{objective}" / "best" / "config.json").is_file()
    assert len(results["plots"]) == 5 and all(Path(p).is_file() for p in results["plots"])
    assert main(["demo", "--objectives", "plm", "plm", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "distinct names" in capsys.readouterr().err


def test_quick_demo_runs_the_paper_ablations(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    demo = tmp_path / "demo"
    assert main(["demo", "--quick", "true", "--ablations", "no-memory", "no-span", "bi-data",
                 "--out-dir", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "== 2/9 pretraining, PLM - memory (4 steps" in out
    results = json.loads((demo / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [
        "majority class", "mini XLNet, PLM pretrained", "mini XLNet, PLM - memory", "mini XLNet, PLM - span targets",
        "mini XLNet, PLM + bi_data", "mini XLNet, random init"]
    # each ablation is the PLM run with one setting changed, as its checkpoint's config records
    changed = {"plm-no-memory": {"mem_len": 0}, "plm-no-span": {"max_ngram": 1}, "plm-bi-data": {"bi_data": True}}
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
