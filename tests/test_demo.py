"""`xlnet demo --quick`: the whole pipeline (pretrain -> fine-tune x2 -> baseline -> table, plots) in miniature."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert main(["demo", "--quick", "true", "--objectives", "plm", "mlm", "clm", "--out-dir", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "== 7/7 fine-tuning on supersense from random init" in out
    results = json.loads((demo / "results.json").read_text())
    assert [row["model"] for row in results["table"]] == [
        "majority class", "mini XLNet, PLM pretrained", "mini XLNet, MLM pretrained", "mini XLNet, CLM pretrained",
        "mini XLNet, random init"]
    for objective, folder in (("plm", "pretrain"), ("mlm", "pretrain-mlm"), ("clm", "pretrain-clm")):
        summary = results["pretrain"][objective]
        assert summary["objective"] == objective and Path(summary["out_dir"]) == demo / folder
        assert (demo / f"finetune-{objective}" / "best" / "config.json").is_file()
    assert len(results["plots"]) == 4 and all(Path(p).is_file() for p in results["plots"])
    assert main(["demo", "--objectives", "plm", "plm", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "distinct names" in capsys.readouterr().err
