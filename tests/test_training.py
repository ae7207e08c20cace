"""Shared training pieces: optimizer groups, schedule, checkpoints, metrics, signals, wrappers."""

from __future__ import annotations

import os
import signal
import types

import pytest
import torch

from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.model import XLNetLMHeadModel
from xlnet import training as T


def tiny_model(**kw) -> XLNetLMHeadModel:
    torch.manual_seed(0)
    cfg = XLNetConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32, dropout=0.0,
                      dropatt=0.0, **kw)
    return XLNetLMHeadModel(cfg)


def plm_batch(bsz: int = 2, seq: int = 8, npred: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, 50, (bsz, seq), generator=g)
    perm = torch.zeros(bsz, seq, seq)
    perm[:, :, -npred:] = 1.0
    tm = torch.zeros(bsz, npred, seq)
    for k in range(npred):
        tm[:, k, seq - npred + k] = 1.0
    return dict(input_ids=ids, perm_mask=perm, target_mapping=tm, labels=ids[:, -npred:].clone())


def test_schedule_warmup_then_linear_decay():
    f = T.warmup_linear_decay(warmup_steps=4, total_steps=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == 0.0 and f(20) == 0.0
    model = tiny_model()
    opt = T.build_optimizer(T.decay_groups(model, 0.01), lr=1e-3)
    sched = T.build_scheduler(opt, 4, 12)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_optimizer_groups_and_eps():
    model = tiny_model()
    opt = T.build_optimizer(T.decay_groups(model, 0.01), lr=1e-3, eps=1e-6)
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.01, 0.0} and opt.defaults["eps"] == 1e-6
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))  # tied embedding listed once


def test_optimizer_is_fused_and_steps_like_for_each_adamw():
    torch.manual_seed(0)
    model, ref = tiny_model(), tiny_model()
    ref.load_state_dict(model.state_dict())
    opt = T.build_optimizer(T.decay_groups(model, 0.01), lr=1e-2)
    ref_opt = torch.optim.AdamW(T.decay_groups(ref, 0.01), lr=1e-2, eps=1e-6, foreach=True)
    assert opt.defaults["fused"]
    for step in range(3):
        for m in (model, ref):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
        opt.step(), ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_layerwise_lr_decay():
    model = tiny_model()
    groups = T.layerwise_lr_groups(model, 0.01, lr_decay=0.5, n_layer=2)
    opt = T.build_optimizer(groups, lr=1.0)
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["transformer.word_embedding.weight"])] == 0.25  # embeddings: decay^L
    assert by_param[id(named["transformer.layer.0.rel_attn.q"])] == 0.5
    assert by_param[id(named["transformer.layer.1.rel_attn.q"])] == 1.0
    assert by_param[id(named["lm_loss.bias"])] == 1.0  # heads: full lr
    nd = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(named["transformer.layer.0.rel_attn.layer_norm.weight"]) in nd


def test_clip_grad_norm_reports_and_clips():
    model = tiny_model()
    model(**plm_batch()).loss.backward()
    before = T.clip_grad_norm(model, 1e-3)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert before > 1e-3 and after.item() == pytest.approx(1e-3, rel=1e-4)


def test_activation_checkpointing_same_grads_and_names():
    a, b = tiny_model(), tiny_model()
    T.apply_activation_checkpointing(b)
    assert list(a.state_dict()) == list(b.state_dict())
    batch = plm_batch()
    la, lb = a(**batch).loss, b(**batch).loss
    la.backward(), lb.backward()
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-7, msg=n)


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    model = tiny_model()
    opt = T.build_optimizer(T.decay_groups(model, 0.01), lr=1e-2)
    sched = T.build_scheduler(opt, 2, 10)
    for seed in range(3):
        model(**plm_batch(seed=seed)).loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
    T.set_seed(123)
    mems = [torch.randn(2, 4, 16)]
    path = T.save_checkpoint(T.checkpoint_path(tmp_path, 3), model, opt, sched, {"step": 3, "sampler": {"pos": 7}},
                             {"mems": mems})
    assert path.name == "step_00000003" and (path / "model.safetensors").is_file()
    expect_rand = torch.rand(3)

    # weights load with from_pretrained; the rest with load_training_state
    fresh = XLNetLMHeadModel.from_pretrained(path)
    for (n, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), n
    opt2 = T.build_optimizer(T.decay_groups(fresh, 0.01), lr=1e-2)
    sched2 = T.build_scheduler(opt2, 2, 10)
    torch.manual_seed(999)
    tensors = T.load_training_state(path, fresh, opt2, sched2)
    assert torch.equal(torch.rand(3), expect_rand)
    assert torch.equal(tensors["mems"][0], mems[0])
    assert sched2.last_epoch == 3 and T.read_trainer_state(path)["sampler"] == {"pos": 7}
    batch = plm_batch(seed=5)
    for m, o, s in ((model, opt, sched), (fresh, opt2, sched2)):
        m(**batch).loss.backward()
        o.step(), s.step()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_listing_and_keep_last(tmp_path):
    model = tiny_model()
    opt = T.build_optimizer(T.decay_groups(model, 0.0), lr=1e-3)
    for step in (1, 2, 3):
        T.save_checkpoint(T.checkpoint_path(tmp_path, step), model, opt, None, {"step": step}, keep_last=2)
    (tmp_path / "checkpoints" / ".step_00000004.abc.tmp").mkdir()  # an interrupted write is ignored
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert T.latest_checkpoint(tmp_path).name == "step_00000003"
    with pytest.raises(XLNetError, match="not a training checkpoint"):
        T.read_trainer_state(tmp_path)


def test_checkpoint_debris_is_removed_and_nothing_else(tmp_path, capsys):
    """What a kill -9 leaves while a checkpoint is written (its temp directories) or pruned (a step_* directory
    without trainer_state.json) goes; complete checkpoints, the aside copy of one and what a checkpoint never
    holds stay."""
    model = tiny_model()
    T.save_checkpoint(T.checkpoint_path(tmp_path, 10), model, T.build_optimizer(T.decay_groups(model, 0.0), lr=1e-3),
                      None, {"step": 10})
    root = tmp_path / "checkpoints"
    (root / "step_00000007").mkdir()  # a prune cut short after its last file
    (root / "step_00000008").mkdir()  # ... or before it
    for name in ("model.safetensors", "config.json"):
        (root / "step_00000008" / name).write_bytes(b"x")
    (root / ".step_00000057.k2j4h5g6.tmp").mkdir()  # a checkpoint half-written
    (root / ".step_00000057.k2j4h5g6.tmp" / "training_state.pt").write_bytes(b"x")
    (root / "..step_00000057.k2j4h5g6.tmp.a1b2c3d4.tmp").mkdir()  # its weights' own temp dir, and aside dir
    (root / "..step_00000057.k2j4h5g6.tmp.a1b2c3d4.old").mkdir()
    (root / ".step_00000009.a1b2c3d4.old").mkdir()  # a swap cut short: maybe the only copy of a checkpoint
    (root / "step_00000011").mkdir()
    (root / "step_00000011" / "notes.txt").write_text("mine")
    (root / "notes").mkdir()
    (root / "step_00000012").write_text("a file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / ".step_00000013.a1b2c3d4.tmp").symlink_to(elsewhere)
    kept = {"step_00000010", ".step_00000009.a1b2c3d4.old", "step_00000011", "notes", "step_00000012",
            ".step_00000013.a1b2c3d4.tmp"}
    capsys.readouterr()
    removed = T.remove_checkpoint_debris(tmp_path)
    assert {p.name for p in root.iterdir()} == kept and elsewhere.is_dir() and len(removed) == 5
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(root) in err
    assert "step_00000007 (incomplete)" in err and ".step_00000057.k2j4h5g6.tmp (half-written)" in err
    assert T.latest_checkpoint(tmp_path).name == "step_00000010"
    assert T.remove_checkpoint_debris(tmp_path) == [] and capsys.readouterr().err == ""
    assert T.remove_checkpoint_debris(tmp_path / "nothing") == []


def test_prune_cut_short_leaves_only_debris(tmp_path, monkeypatch):
    """Pruning renames a checkpoint to a temp name before deleting it: a kill in between (here: a delete that
    never happens) leaves debris, not a step_* that still looks complete or has lost some of its files."""
    model = tiny_model()
    opt = T.build_optimizer(T.decay_groups(model, 0.0), lr=1e-3)
    T.save_checkpoint(T.checkpoint_path(tmp_path, 1), model, opt, None, {"step": 1})
    monkeypatch.setattr(T, "shutil", types.SimpleNamespace(rmtree=lambda *a, **k: None))  # training.py's only
    T.save_checkpoint(T.checkpoint_path(tmp_path, 2), model, opt, None, {"step": 2}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step_00000002"]
    (left,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name != "step_00000002"]
    assert left.name.startswith(".step_00000001.") and left.name.endswith(".tmp")
    assert T.remove_checkpoint_debris(tmp_path) == [f"{left.name} (half-written)"]


def test_metrics_logger_jsonl_tensorboard_and_resume(tmp_path):
    log = T.MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log("train", step, loss=5.0 - step, lr=1e-3)
    log.log("valid", 3, loss=4.5)
    log.close()
    rows = T.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["split"] for r in rows] == ["train"] * 3 + ["valid"] and rows[0]["loss"] == 4.0
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tensorboard").iterdir())
    log = T.MetricsLogger(tmp_path, resume_step=2)  # the cut-off run's step 3 is dropped
    log.log("train", 3, loss=1.0)
    log.close()
    assert [(r["step"], r["loss"]) for r in T.read_metrics(tmp_path / "metrics.jsonl")] == [(1, 4.0), (2, 3.0), (3, 1.0)]

    from xlnet.plots import plot_loss_curves

    png = plot_loss_curves(T.read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stop_signal_sets_flag_then_second_ctrl_c_interrupts():
    with T.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM" and stop.agreed(torch.device("cpu"))
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _agree(rank: int, out_dir: str) -> None:
    """One of two gloo processes: rank 1 is asked to stop before its third call to agreed()."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    stop, seen = T.StopSignal(), []
    for call in range(6):
        if rank == 1 and call == 2:
            stop.requested = "SIGTERM"
        seen.append(stop.agreed(torch.device("cpu")))
    dist.destroy_process_group()
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump(seen, f)


def test_ranks_agree_to_stop_one_call_later(tmp_path):
    """Under torchrun agreed() answers with the previous call's all-reduce (no round trip that waits for the
    queued steps): both ranks stop at the same call, the one after rank 1's request."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_agree, args=(str(tmp_path),), nprocs=2)
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1] == [False, False, False, True, True, True]


def test_flops_and_throughput():
    f = T.xlnet_flops_per_token(256, 4, 1024, 8000, 128, 64, 21)
    dense = 6 * 4 * (4 * 256 * 256 + 2 * 256 * 1024)  # 6N for the blocks' matmuls
    assert dense < f < 3 * dense
    tp = T.Throughput(f, peak=1e12, window=2)
    tp.step(100, 1.0), tp.step(300, 1.0), tp.step(500, 1.0)
    assert tp.tokens_per_s == 400 and tp.total_tokens == 900 and tp.mfu == pytest.approx(400 * f / 1e12)
    assert T.peak_flops(torch.device("cpu"), "bf16") is None
    # without a query stream: the final layer's content stream is read instead (a whole layer against 4 x 21/128
    # of one here), and predicting every next token costs 127/21 of the head
    content = T.xlnet_flops_per_token(256, 4, 1024, 8000, 128, 64, 21, query_stream=False)
    every = T.xlnet_flops_per_token(256, 4, 1024, 8000, 128, 64, 127, query_stream=False)
    assert dense < f < content < every and every - content == pytest.approx(3 * 2 * 256 * 8000 * 106 / 128)


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    T.set_seed(7)
    state = T.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    T.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_resolve_compile() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert T.resolve_compile("auto", cuda) and not T.resolve_compile("auto", cpu)
    assert not T.resolve_compile("auto", cuda, fsdp=True)
    assert T.resolve_compile(True, cpu) and T.resolve_compile("yes", cpu) and not T.resolve_compile("false", cuda)
    with pytest.raises(XLNetError, match="compile must be auto, true or false"):
        T.resolve_compile("fast", cpu)


def test_maybe_compile() -> None:
    """'auto' compiles (every block, in place) only on a GPU and falls back to eager where a frame fails to
    compile; 'true' compiles anywhere and lets failures raise."""
    import torch._dynamo.config as dynamo_config

    def compiled(model: torch.nn.Module) -> bool:
        return all(block._compiled_call_impl is not None for block in model.transformer.layer)

    with dynamo_config.patch(suppress_errors=False):  # restored afterwards
        model = tiny_model()
        assert not T.maybe_compile(model, "auto", torch.device("cpu"))
        assert not T.maybe_compile(model, "false", torch.device("cuda")) and not compiled(model)
        assert T.maybe_compile(model, "true", torch.device("cpu")) and compiled(model)
        assert not dynamo_config.suppress_errors and model.transformer.blocks_compiled
        assert T.maybe_compile(tiny_model(), "auto", torch.device("cuda")) and dynamo_config.suppress_errors
    assert not dynamo_config.suppress_errors
