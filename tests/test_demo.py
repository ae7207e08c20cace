"""`xlnet demo --quick`: the whole pipeline (pretrain -> fine-tune x2 -> baseline -> table, plots) in miniature."""

from __future__ import annotations

import json
from pathlib import Path

from xlnet.cli import main


def test_quick_demo_runs_end_to_end(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XLNET_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "true", "--out-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "majority class" in out and "mini XLNet, pretrained" in out and "mini XLNet, random init" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    models = [row["model"] for row in results["table"]]
    assert models == ["majority class", "mini XLNet, pretrained", "mini XLNet, random init"]
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in results["table"])
    assert results["pretrain"]["valid_loss"] < results["pretrain"]["valid_loss_start"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    # the random-init arm has the pretrained arm's architecture but not its weights
    pre = json.loads((tmp_path / "demo" / "finetune-pretrained" / "best" / "config.json").read_text())
    rnd = json.loads((tmp_path / "demo" / "finetune-random" / "best" / "config.json").read_text())
    assert pre["d_model"] == rnd["d_model"] == 128
