"""`xlnet pretrain` end to end on a very small model: resume exactness, DDP == grad accumulation, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import record_scalar_reads, two_processes
from xlnet import training as T
from xlnet.cli import main as cli_main
from xlnet.errors import XLNetError
from xlnet.model import XLNetLMHeadModel
from xlnet.pretrain import PretrainConfig, format_summary, pretrain

WORDS = ("the cat dog bird sees likes eats a red blue small big house tree river stone runs over under "
         "and then near far old young green quick slow happy").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A tokenizer (vocab ~200) and a prepared corpus of generated sentences (train + valid)."""
    from xlnet.data.prepare import prepare
    from xlnet.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = []
    for _ in range(120):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(rng.randint(3, 8))]
        docs.append("\n".join(lines))
    text = root / "text.txt"
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer([text], root / "tok", vocab_size=120, num_threads=1)
    data = prepare(tok, [text], root / "data", valid_fraction=0.15, progress=False)
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    return {"tokenizer_dir": str(tok), "data_dir": str(data), "vocab_size": vocab}


def small(corpus: dict, out: Path, **kw) -> PretrainConfig:
    base = dict(model="tiny", vocab_size=corpus["vocab_size"], d_model=32, n_layer=2, n_head=2, d_head=16,
                d_inner=64, dropout=0.1, dropatt=0.1, data_dir=corpus["data_dir"],
                tokenizer_dir=corpus["tokenizer_dir"], seq_len=32, reuse_len=16, mem_len=16, num_predict=6,
                batch_size=4, lr=3e-3, warmup_steps=2, max_steps=6, eval_every=3, eval_batches=1, save_every=3,
                keep_checkpoints=3, out_dir=str(out), device="cpu", progress=False)
    base.update(kw)
    return PretrainConfig(**base)


def losses(out: Path) -> list[tuple[str, int, float]]:
    return [(r["split"], r["step"], r["loss"]) for r in T.read_metrics(out / "metrics.jsonl")]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return XLNetLMHeadModel.from_pretrained(path, verbose=False).state_dict()


def test_steps_are_read_one_behind_except_where_evaluated_or_saved(corpus, tmp_path, monkeypatch):
    """The loop queues step n + 1 before it reads step n's scalars, so a GPU never waits for the host between
    steps; not after a step that is evaluated (every 2 here) or saved, which must see the model as that step
    left it: then the losses, valid losses included, equal a run that also saves at each evaluation."""
    events = record_scalar_reads(monkeypatch)
    pretrain(small(corpus, tmp_path / "a", eval_every=2, save_every=0))
    assert events == [("queue", 1), ("queue", 2), ("read", 1), ("read", 2), ("queue", 3), ("queue", 4), ("read", 3),
                      ("read", 4), ("queue", 5), ("queue", 6), ("read", 5), ("read", 6)]
    pretrain(small(corpus, tmp_path / "b", eval_every=2, save_every=2))
    assert [row[1] for row in losses(tmp_path / "a") if row[0] == "valid"] == [0, 2, 4, 6]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_resume_checks_data_and_tokenizer_by_content_not_path(corpus, tmp_path):
    """Data and tokenizer copied elsewhere resume the run exactly; other data under the old path would not."""
    import shutil

    from xlnet.data.prepare import prepare

    pretrain(small(corpus, tmp_path / "a"))
    b = tmp_path / "b"
    pretrain(small(corpus, b), stop_after_steps=3)
    moved = {k: tmp_path / "moved" / Path(corpus[k]).name for k in ("data_dir", "tokenizer_dir")}
    for k, dst in moved.items():
        shutil.copytree(corpus[k], dst)
    other = prepare(moved["tokenizer_dir"], [Path(corpus["data_dir"]).parent / "text.txt"], tmp_path / "other",
                    valid_fraction=0.3, progress=False)  # the same text split otherwise: other data
    with pytest.raises(XLNetError, match=r"does not match checkpoint.*data_dir '.*other' holds other files than"):
        pretrain(small(corpus, b, data_dir=str(other), tokenizer_dir=str(moved["tokenizer_dir"])), resume="latest")
    done = pretrain(small(corpus, b, **{k: str(v) for k, v in moved.items()}), resume="latest")
    assert done["steps"] == 6
    straight, resumed = (weights(d / "checkpoints" / "step_00000006") for d in (tmp_path / "a", b))
    assert all(torch.equal(w, resumed[name]) for name, w in straight.items())


def test_straight_run_equals_run_plus_resume(corpus, tmp_path, capsys):
    # straight: 6 steps through the CLI (YAML + flag override), dropout on, so RNG restore matters
    cfg = small(corpus, tmp_path / "a")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}))
    assert cli_main(["pretrain", "--config", str(yaml_path), "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    a = tmp_path / "a"
    assert "done: 6 steps" in printed and "valid loss" in printed and str(a / "loss.png") in printed
    assert (a / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((a / "tensorboard").iterdir())
    assert yaml.safe_load((a / "config.yaml").read_text())["max_steps"] == 6
    ckpt = a / "checkpoints" / "step_00000006"
    assert {"model.safetensors", "config.json", "training_state.pt", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()}

    # 3 steps, stop as if signalled, resume for the other 3
    b = tmp_path / "b"
    first = pretrain(small(corpus, b), stop_after_steps=3)
    assert first["stopped"] and first["steps"] == 3
    with pytest.raises(XLNetError, match="already holds checkpoints"):
        pretrain(small(corpus, b))
    with pytest.raises(XLNetError, match="does not match checkpoint.*lr"):
        pretrain(small(corpus, b, lr=1e-3), resume="latest")
    second = pretrain(small(corpus, b, activation_checkpointing=True), resume="latest")  # runtime-only flag
    assert second["steps"] == 6 and not second["stopped"]
    # resuming the finished run trains nothing and reports the checkpoint's losses
    third = pretrain(small(corpus, b), resume="latest")
    assert third["steps"] == 6 and third["train_s"] == 0
    assert (third["train_loss"], third["valid_loss"]) == (second["train_loss"], second["valid_loss"])
    assert "the checkpoint had finished: nothing to train" in format_summary(third)

    assert losses(a) == losses(b)  # bit-identical trajectory (train and valid losses)
    assert len([r for r in losses(a) if r[0] == "valid"]) == 3  # steps 0, 3, 6
    wa, wb = weights(ckpt), weights(b / "checkpoints" / "step_00000006")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # a second run writing the same directory is refused (it would delete the first one's checkpoints)
    from xlnet.fileio import DirLock

    held = DirLock(b)
    with pytest.raises(XLNetError, match="in use by another xlnet run"):
        pretrain(small(corpus, b, max_steps=7), resume="latest")
    held.release()
    # a longer run from the finished one is allowed, and says that the schedule is stretched from here
    capsys.readouterr()
    longer = pretrain(small(corpus, b, max_steps=7), resume="latest")
    assert longer["steps"] == 7 and longer["run_steps"] == 1
    assert "note: --max-steps 7, the checkpoint's run had 6" in capsys.readouterr().err


def test_profile_steps_write_an_op_table_and_a_trace(corpus, tmp_path):
    """--profile-steps 2: steps 4 and 5 under torch.profiler (the first three are warm-up), the op table and the
    trace written when the window closes; with --prefetch 1 the batches come from a worker process, and the
    run is the same as the inline one."""
    runs = {}
    for name, extra in (("profiled", dict(profile_steps=2, prefetch=1)), ("plain", {})):
        summary = pretrain(small(corpus, tmp_path / name, eval_every=0, **extra))
        runs[name] = losses(tmp_path / name)
        assert ("profile    " in format_summary(summary)) == (name == "profiled")
    out = tmp_path / "profiled"
    table = (out / "profile.txt").read_text()
    assert table.startswith("# torch.profiler, training steps 4 to 5, cpu") and "aten::" in table
    wall, host = map(float, re.search(r"# per step: ([\d.]+) ms wall, ([\d.]+) ms of host ops", table).groups())
    assert 0 < host <= 2 * wall  # own times of ops that ran in the window (two threads at most)
    assert "aten::" in json.dumps(json.loads((out / "profile.json").read_text())["traceEvents"][:2000])
    assert not list(out.glob(".profile*"))
    assert runs["profiled"] == runs["plain"]
    with pytest.raises(XLNetError, match="prefetch must be >= 0"):
        pretrain(small(corpus, tmp_path / "bad", prefetch=-1))


def test_summary_gives_the_steady_rate_beside_the_whole_run() -> None:
    """A short GPU run is mostly compiling: the whole run's tokens/s and the last steps' (with their MFU) are
    both printed, each labelled (MFU used to be the last steps' next to the whole run's rate)."""
    s = dict(stopped=None, steps=60, run_steps=60, tokens=491_520, wall_s=81.0, train_s=63.6, tokens_per_s=7734.2,
             recent_tokens_per_s=87974.0, recent_steps=20, mfu=0.0737, objective="plm", train_loss=6.7219,
             valid_loss_start=None, valid_loss=None, checkpoint=None, plot=None)
    assert ("60 steps, 491,520 tokens in 81s this run (7,734 tokens/s while training; the last 20 steps "
            "87,974 tokens/s, MFU 7.4%)") in format_summary(s)
    assert "(7,734 tokens/s while training)" in format_summary({**s, "mfu": None})  # CPU: no peak, no MFU
    # resumed: the totals, then how many of the steps this run took and in how long
    assert "60 steps, 491,520 tokens; 20 of the steps in 81s this run" in format_summary({**s, "run_steps": 20})


@pytest.mark.parametrize("objective", ["mlm", "clm", "infoword"])
def test_other_objectives_learn_and_resume_exactly(corpus, tmp_path, capsys, objective):
    """Masked LM, left-to-right LM and InfoWord through the same loop: the loss falls, a resumed run is
    bit-identical, and a checkpoint of one objective is not continued with another."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_main(["pretrain", "--config", _yaml(small(corpus, a, objective=objective, max_steps=12,
                                                         eval_every=6, save_every=6), tmp_path)]) == 0
    assert f"{objective.upper()} train loss" in capsys.readouterr().out
    valid = [loss for split, _, loss in losses(a) if split == "valid"]
    assert valid[0] - 0.15 > valid[1] > valid[2], valid
    pretrain(small(corpus, b, objective=objective, max_steps=12, eval_every=6, save_every=6), stop_after_steps=6)
    with pytest.raises(XLNetError, match="does not match checkpoint.*objective"):
        pretrain(small(corpus, b, max_steps=12, eval_every=6, save_every=6), resume="latest")
    pretrain(small(corpus, b, objective=objective, max_steps=12, eval_every=6, save_every=6), resume="latest")
    assert losses(a) == losses(b)
    if objective == "infoword":  # its InfoNCE term is logged beside the masked-LM loss, identically on resume
        nce = [r.get("infonce") for r in T.read_metrics(a / "metrics.jsonl") if r["split"] == "train"]
        assert all(math.isfinite(x) and x > 0 for x in nce) and nce == [
            r.get("infonce") for r in T.read_metrics(b / "metrics.jsonl") if r["split"] == "train"]


def test_left_to_right_on_the_targets_learns_and_counts_its_predictions(corpus, tmp_path):
    from xlnet.pretrain import predictions_per_row

    kw = dict(objective="clm", max_steps=12, eval_every=6, save_every=6)
    cfg = small(corpus, tmp_path / "a", clm_predict="targets", **kw)
    assert predictions_per_row(cfg) == cfg.num_predict and predictions_per_row(small(corpus, tmp_path, **kw)) == 31
    pretrain(cfg)
    valid = [loss for split, _, loss in losses(tmp_path / "a") if split == "valid"]
    assert valid[0] > valid[1] > valid[2], valid  # a quarter of clm's signal per step: slower than the others
    with pytest.raises(XLNetError, match="does not match checkpoint.*clm_predict"):
        pretrain(small(corpus, tmp_path / "a", **{**kw, "max_steps": 18}), resume="latest")


def test_infonce_is_cross_entropy_over_the_other_rows_ngrams():
    from xlnet.pretrain import infonce

    g = torch.Generator().manual_seed(0)
    sentences, ngrams = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    scores = sentences @ ngrams.T / 4.0  # 1/sqrt(d)
    want = -torch.stack([scores[i, i] - torch.logsumexp(scores[i], 0) for i in range(5)]).mean()
    assert abs(infonce(sentences, ngrams).item() - want.item()) < 1e-5
    assert infonce(ngrams * 50, ngrams).item() < 1e-3  # each sentence state is its own n-gram's, far apart
    with pytest.raises(XLNetError, match="infoword runs two forward passes"):
        pretrain(PretrainConfig(objective="infoword", fsdp=True, out_dir="/nonexistent/x"))


def _yaml(cfg: PretrainConfig, where: Path) -> str:
    path = where / f"{Path(cfg.out_dir).name}.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return str(path)


DIST = dict(dropout=0.0, dropatt=0.0, max_steps=4, eval_every=4, save_every=2)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    """The reference for the 2-process runs: 1 process, grad_accum 2 (same rows per micro-batch)."""
    out = tmp_path_factory.mktemp("one")
    pretrain(small(corpus, out, grad_accum=2, **DIST))
    return out


def torchrun(corpus, out: Path, *flags: str) -> subprocess.CompletedProcess:
    proc = two_processes("pretrain", small(corpus, out, grad_accum=1, **DIST), *flags, timeout=180)
    assert proc.stdout.count("done: 4 steps") == 1  # only rank 0 prints
    return proc


def assert_same_run(a: Path, b: Path, steps=None) -> None:
    la, lb = losses(a), losses(b)
    if steps is not None:
        la, lb = [r for r in la if r[1] in steps], [r for r in lb if r[1] in steps]
    assert [r[:2] for r in la] == [r[:2] for r in lb] and la
    for (_, _, x), (_, _, y) in zip(la, lb):
        assert x == pytest.approx(y, abs=1e-5)
    wa, wb = weights(a / "checkpoints" / "step_00000004"), weights(b / "checkpoints" / "step_00000004")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-5, msg=name)


def test_two_process_ddp_matches_one_process_grad_accum(corpus, one_process, tmp_path):
    two = tmp_path / "two"
    torchrun(corpus, two)
    assert_same_run(one_process, two)
    ckpt = two / "checkpoints" / "step_00000004"
    assert T.read_trainer_state(ckpt)["world_size"] == 2
    mems = torch.load(ckpt / "training_state.pt", weights_only=True)["tensors"]["mems"]
    assert len(mems) == 2 and mems[0].shape == (4, 16, 32)  # global rows gathered from both ranks


@pytest.mark.parametrize("objective,flags", [("mlm", ()), ("mlm", ("--fsdp", "true")), ("infoword", ())])
def test_content_stream_objectives_on_two_processes_match_one(corpus, tmp_path, objective, flags):
    """Without a query stream its input `mask_emb` gets no gradient, which DDP and FSDP2 must allow; InfoWord's
    two forward passes a step (the masked rows, then their n-grams) give the same gradients as one process with
    two micro-batches (each micro-batch draws its negatives from its own rows either way)."""
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(small(corpus, one, grad_accum=2, objective=objective, **DIST))
    torchrun(corpus, two, "--objective", objective, *flags)
    assert_same_run(one, two)


def test_fsdp2_matches_and_its_checkpoint_resumes_in_one_process(corpus, one_process, tmp_path):
    fsdp = tmp_path / "fsdp"
    torchrun(corpus, fsdp, "--fsdp", "true")
    assert_same_run(one_process, fsdp)
    # the step-2 checkpoint (full state, gathered from the shards) continues in 1 process x 2 micro-batches
    resumed = tmp_path / "resumed"
    pretrain(small(corpus, resumed, grad_accum=2, **DIST), resume=str(fsdp / "checkpoints" / "step_00000002"))
    assert_same_run(one_process, resumed, steps={3, 4})


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_processes_with_compiled_blocks_match_one_process(corpus, one_process, tmp_path, wrapper):
    """--compile true under DDP and FSDP2: the blocks are compiled in place before the wrapper goes on (auto
    leaves FSDP eager: not yet measured on GPUs); the same run as one eager process, to within float
    reassociation."""
    compiled = tmp_path / "compiled"
    torchrun(corpus, compiled, "--compile", "true", *(["--fsdp", "true"] if wrapper == "fsdp" else []))
    assert_same_run(one_process, compiled)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = XLNetLMHeadModel.forward

    def poisoned(self, *args, **kw):
        out = forward(self, *args, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(XLNetLMHeadModel, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(XLNetError, match=r"non-finite loss at step 3; .*step_00000002"):
        pretrain(small(corpus, out, save_every=2, eval_every=0))
    assert [p.name for p in T.list_checkpoints(out)] == ["step_00000002"]


def test_user_errors_are_one_line(corpus, tmp_path):
    with pytest.raises(XLNetError, match="data directory not found"):
        pretrain(small(corpus, tmp_path / "x", data_dir=str(tmp_path / "missing")))
    with pytest.raises(XLNetError, match="vocab sizes disagree"):
        pretrain(small(corpus, tmp_path / "x", vocab_size=corpus["vocab_size"] + 1))
    # no --vocab-size: the model takes the tokenizer's, whatever the preset's (tiny's is 8000)
    run = pretrain(small(corpus, tmp_path / "v", vocab_size=None, max_steps=1, eval_every=0, save_every=0))
    saved = json.loads((Path(run["checkpoint"]) / "config.json").read_text())
    assert saved["vocab_size"] == corpus["vocab_size"] != 8000
    with pytest.raises(XLNetError, match="no checkpoint"):
        pretrain(small(corpus, tmp_path / "x"), resume="latest")
    with pytest.raises(XLNetError, match="divisible"):
        pretrain(small(corpus, tmp_path / "x", grad_accum=3))
    with pytest.raises(XLNetError, match="compile must be auto, true or false"):
        pretrain(small(corpus, tmp_path / "z", compile="yes please"))
    # settings that cannot train fail before the output directory (config.yaml) is written
    for bad, message in [(dict(lr=-1.0), "lr must be positive"), (dict(lr=float("nan")), "lr must be positive"),
                         (dict(dropout=1.5), "dropout and dropatt must be in"),
                         (dict(num_predict=10_000), "num_predict=10000 does not fit"),
                         # 822 valid tokens for 32 streams of 32: found before training, not at the first evaluation
                         (dict(batch_size=32), r"valid split of .*too small.*larger --valid-fraction.*--eval-every 0")]:
        with pytest.raises(XLNetError, match=message):
            pretrain(small(corpus, tmp_path / "z", **bad))
    assert not (tmp_path / "z").exists()
    assert cli_main(["pretrain", "--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "y")]) == 2


def test_data_without_a_valid_split_pretrains_when_nothing_is_evaluated(corpus, tmp_path):
    from xlnet.data.prepare import prepare

    text = next(Path(corpus["data_dir"]).parent.glob("text.txt"))
    data = prepare(Path(corpus["tokenizer_dir"]), [text], tmp_path / "all", valid_fraction=0, progress=False)
    with pytest.raises(XLNetError, match=r"no valid split \(prepared with --valid-fraction 0\): pretrain with "
                                         r"--eval-every 0"):
        pretrain(small(corpus, tmp_path / "a", data_dir=str(data)))
    assert not (tmp_path / "a").exists()
    run = pretrain(small(corpus, tmp_path / "b", data_dir=str(data), eval_every=0, max_steps=2, save_every=0))
    assert run["valid_loss"] is None and math.isfinite(run["train_loss"])
    assert [split for split, _, _ in losses(tmp_path / "b")] == ["train", "train"]


def test_sigterm_checkpoints_then_exits(corpus, tmp_path):
    out = tmp_path / "term"

    def kill_after_first_step():
        while not (out / "metrics.jsonl").is_file() or '"train"' not in (out / "metrics.jsonl").read_text():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kill_after_first_step, daemon=True).start()
    summary = pretrain(small(corpus, out, max_steps=1000, eval_every=0, save_every=0))
    assert summary["stopped"] == "SIGTERM" and 1 <= summary["steps"] < 1000
    assert T.latest_checkpoint(out).name == f"step_{summary['steps']:08d}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_start_and_resume_remove_checkpoint_debris(corpus, tmp_path, capsys):
    """A killed run's half-written and half-pruned checkpoints (made here by hand) go when a run starts or
    resumes in the directory, with one line on stderr; the checkpoints, and what is not ours, stay."""
    out = tmp_path / "run"
    root = out / "checkpoints"
    for debris in ("step_00000002", ".step_00000005.abcd1234.tmp"):
        (root / debris).mkdir(parents=True)
    (root / "step_00000001").mkdir()
    (root / "step_00000001" / "notes.txt").write_text("not a checkpoint's")
    capsys.readouterr()
    pretrain(small(corpus, out, max_steps=6), stop_after_steps=3)
    err = capsys.readouterr().err
    assert "removed leftovers" in err and "step_00000002 (incomplete)" in err
    assert {p.name for p in root.iterdir()} == {"step_00000001", "step_00000003"}
    (root / "step_00000004").mkdir()
    (root / ".step_00000006.abcd1234.tmp").mkdir()
    assert pretrain(small(corpus, out, max_steps=6), resume="latest")["steps"] == 6
    assert ".step_00000006.abcd1234.tmp (half-written), step_00000004 (incomplete)" in capsys.readouterr().err
    assert {p.name for p in root.iterdir()} == {"step_00000001", "step_00000003", "step_00000006"}


def test_compiled_run_with_checkpointing_matches_eager(corpus, tmp_path):
    """--compile (the GPU default) together with activation checkpointing: the same losses as the eager run, to
    within float reassociation (dropout 0: under compile the masks come from a different generator)."""
    kw = dict(dropout=0.0, dropatt=0.0, max_steps=4, eval_every=2, save_every=4)
    pretrain(small(corpus, tmp_path / "eager", **kw))
    pretrain(small(corpus, tmp_path / "compiled", compile="true", activation_checkpointing=True, **kw))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [r[:2] for r in eager] == [r[:2] for r in compiled] and len(eager) == 7
    assert [r[2] for r in compiled] == pytest.approx([r[2] for r in eager], rel=1e-4)


def test_tiny_yaml_is_the_default():
    path = Path(__file__).resolve().parents[1] / "configs" / "pretrain-mini.yaml"
    assert yaml.safe_load(path.read_text()) == {
        k: v for k, v in dataclasses.asdict(PretrainConfig()).items() if v is not None or k == "perm_size"}


def test_model_overrides_reach_the_built_weights():
    """The default pretraining run: no dropout, mini's width-scaled init (0.05); an override replaces the preset's
    value and the weights are drawn with it."""
    default = PretrainConfig().model_config()
    assert (default.dropout, default.dropatt, default.initializer_range) == (0.0, 0.0, 0.05)
    assert PretrainConfig(model="tiny").model_config().initializer_range == 0.02
    cfg = PretrainConfig(initializer_range=0.1, dropout=None, n_layer=1).model_config()
    assert (cfg.initializer_range, cfg.dropout, cfg.n_layer) == (0.1, 0.1, 1)
    torch.manual_seed(0)
    std = XLNetLMHeadModel(cfg).transformer.word_embedding.weight.std().item()
    assert std == pytest.approx(0.1, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", ["plm", "mlm", "clm", "infoword"])
def test_cuda_bf16_run_learns_and_resumes(corpus, tmp_path, objective):
    """On a GPU (bf16 autocast, fused AdamW, SDPA core, compiled blocks), every objective: the loss falls, and
    4 steps + resume + 4 steps give the straight 8-step run's losses (the CUDA RNG state and mems travel through
    the checkpoint; atomics in CUDA backward kernels make runs agree to rounding, not bit for bit)."""
    kw = dict(device="cuda", max_steps=8, eval_every=4, save_every=4, lr=3e-3, objective=objective)
    straight = pretrain(small(corpus, tmp_path / "a", **kw))
    assert straight["steps"] == 8 and not straight["stopped"]
    train = [r[2] for r in losses(tmp_path / "a") if r[0] == "train"]
    assert all(map(math.isfinite, train)) and train[-1] < train[0]
    pretrain(small(corpus, tmp_path / "b", **kw), stop_after_steps=4)
    pretrain(small(corpus, tmp_path / "b", **kw), resume="latest")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert [r[2] for r in a] == pytest.approx([r[2] for r in b], rel=2e-3)


def test_finetuning_a_checkpoint_takes_its_runs_tokenizer(corpus, tmp_path, monkeypatch):
    """A pretraining checkpoint holds no spiece.model, but its trainer_state.json names the run's tokenizer (as an
    absolute path, whatever the run was given) and its sha256: fine-tuning takes that tokenizer from any directory,
    refuses another one (same piece count or not), and says so when the recorded one is gone."""
    from xlnet.assets import default_tokenizer_dir
    from xlnet.finetune import FinetuneConfig, load_tokenizer

    tok_dir = Path(corpus["tokenizer_dir"]).resolve()
    monkeypatch.chdir(tok_dir.parent)  # the run is given a relative tokenizer directory
    run = pretrain(small(corpus, tmp_path / "p", max_steps=1, eval_every=0, save_every=0, tokenizer_dir=tok_dir.name))
    ckpt = Path(run["checkpoint"])
    assert T.read_trainer_state(ckpt)["config"]["tokenizer_dir"] == str(tok_dir)
    monkeypatch.chdir(tmp_path)
    tok = load_tokenizer(FinetuneConfig(model=str(ckpt)))
    assert tok.model_path.parent.resolve() == tok_dir
    with pytest.raises(XLNetError, match="was pretrained with another tokenizer"):
        load_tokenizer(FinetuneConfig(model=str(ckpt), tokenizer=str(default_tokenizer_dir())))
    state = T.read_trainer_state(ckpt)
    state["config"]["tokenizer_dir"] = "tok_moved"  # moved since (or recorded relative, before runs resolved it)
    (ckpt / T.TRAINER_STATE).write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(XLNetError, match="the tokenizer in tok_moved .*not found from here: pass it as --tokenizer"):
        load_tokenizer(FinetuneConfig(model=str(ckpt)))
