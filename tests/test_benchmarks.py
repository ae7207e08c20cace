"""The benchmarks run (a device session has minutes, not time to debug them): throughput.py's timing modes, its
JSON, an implementation that fails being left out rather than ending the run; attention_kernels.py on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
QUICK = ["--quick", "--modes", "finetune", "--impls", "fast,hf_xlnet", "--no-memory"]


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput

    return throughput


@pytest.mark.parametrize("isolated", [False, True])
def test_throughput_quick_run_writes_rows(isolated: bool, tmp_path) -> None:
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), *QUICK, "--json-out", str(out)]
                         + ["--isolated"] * isolated, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["isolated"] == isolated
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"fast", "hf_xlnet"}
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows.values())
    assert rows["fast"]["speed_vs_hf_xlnet"] == pytest.approx(rows["fast"]["tokens_per_s"]
                                                              / rows["hf_xlnet"]["tokens_per_s"])
    assert "| finetune | ours (fast) |" in run.stdout


def test_failing_implementation_is_left_out(throughput, capsys, monkeypatch) -> None:
    real_build = throughput.build

    def build(args, mode, impl):
        if impl == "fast":
            raise RuntimeError("kernel failed to compile")
        return real_build(args, mode, impl)

    monkeypatch.setattr(throughput, "build", build)
    throughput.main(QUICK + ["--steps", "1"])
    out, err = capsys.readouterr()
    assert "ours (fast) failed and is left out: RuntimeError: kernel failed to compile" in err
    assert "| finetune | HF XLNet |" in out and "| finetune | ours (fast) |" not in out


def test_attention_kernels_quick_run_under_the_interpreter() -> None:
    """attention_kernels.py end to end on CPU (Triton's interpreter): both cores, the kernel profile and the
    ablations (the Triton kernels without dropout, segments, mask) that a GPU session reads."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(BENCHMARKS / "attention_kernels.py"), "--device", "cpu", "--quick",
                          "--profile", "--ablate"], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("| content | triton |", "| query | sdpa |", "## content stream, triton:", "| forward only |",
                "| content | triton | no dropout, segments, mask |"):
        assert row in run.stdout, row


def test_pretrain_recipe_quick_run_table_and_json(tmp_path) -> None:
    out = tmp_path / "recipe.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "pretrain_recipe.py"), "--quick", "--variants", "old",
                          "new", "--json-out", str(out)],  # --quick: 4 steps of an 8-step schedule
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["old", "new"]
    assert all(set(r["valid"]) == {"0", "2", "4"} and r["s_per_step"] > 0 for r in rows)
    # the same first weights' loss differs only through the init std; the table has both rows
    assert rows[0]["valid"]["0"] != rows[1]["valid"]["0"]
    assert "| old |" in run.stdout and "| new |" in run.stdout


def test_data_pipeline_quick_run() -> None:
    """data_pipeline.py at a small shape: both batch forms, and one row per --host-ms with both loops (a step can
    not be shorter than the simulated device step)."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / "data_pipeline.py"), "--seq", "64", "--reuse", "32",
                          "--batch", "2", "--targets", "8", "--steps", "4", "--device-ms", "20", "--host-ms", "0", "15"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "one dense batch" in run.stdout and "one compact batch" in run.stdout
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r[0].strip() for r in rows] == ["0", "15"]
    assert all(float(r[1]) >= 20 and float(r[2]) >= 20 for r in rows)
