"""Shared by the parity tests (test_model.py: ours vs HF; test_fast_attention.py and the triton and flex cores'
tests: fast vs reference), and the two-process runs of the training verbs (torchrun on gloo)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xlnet.config import XLNetConfig
from xlnet.tokenizer import Tokenizer

TOL = 1e-5  # max abs difference allowed in float32
B, L, P, V = 4, 9, 3, 61  # batch, length, prediction slots, vocab

# Every attention variant the parity suites sweep.
CONFIGS = {
    "bi": {},
    "uni": {"attn_type": "uni"},
    "uni_same_length": {"attn_type": "uni", "same_length": True},
    "bi_data": {"bi_data": True},
    "clamp_len": {"clamp_len": 3},
    "tied_r": {"untie_r": False},
}


def tiny_config(**kw) -> XLNetConfig:
    base = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_head=8, d_inner=64, dropout=0.0, dropatt=0.0,
                summary_last_dropout=0.0, num_labels=3, attn_impl="reference")
    return XLNetConfig(**{**base, **kw})


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> float:
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} (max {b.abs().max().item():.3g})"
    return diff


def model_pair(cls, config: XLNetConfig, device: str = "cpu", seed: int = 0):
    """The same weights twice, on device: the reference path and the fast path."""
    torch.manual_seed(seed)
    ref = cls(dataclasses.replace(config, attn_impl="reference")).to(device)
    fast = cls(dataclasses.replace(config, attn_impl="fast")).to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_grads_close(ref, fast, rel: float = 1e-4) -> None:
    """Every parameter gradient of fast equals ref's, relative to the gradient's own scale (some are ~1e-7,
    segment embeddings, below any absolute tolerance); a parameter without one in ref has none or zero."""
    grads = dict(fast.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None or grads[name].grad.abs().max() == 0, name
            continue
        assert grads[name].grad is not None, name
        assert_close(grads[name].grad, p.grad, f"grad {name}", tol=rel * p.grad.abs().max().item() + 1e-12)
        checked += 1
    assert checked > 10


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check_core_matches_reference(core: str, variant: str, head: str, device: str, monkeypatch, **config) -> None:
    """The attention core `core` against the reference in float32: PLM with memory, padding and segments (both
    streams), or a classification head (the final layer's <cls> row, its distance row read as a window); logits,
    mems and every gradient. Cores that read unclamped windows fall back to the math core for uni tables."""
    import xlnet.fast_attention as fa
    from xlnet.heads import XLNetForSequenceClassification
    from xlnet.model import XLNetLMHeadModel

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: core)
    config = tiny_config(mem_len=12, **{**CONFIGS[variant], **config})
    lm = head == "lm"
    ref, fast = model_pair(XLNetLMHeadModel if lm else XLNetForSequenceClassification, config, device)
    torch.manual_seed(3)
    mems = [torch.randn(B, 5, config.d_model, device=device) for _ in range(config.n_layer)]
    x = {k: v.to(device) for k, v in plm_inputs(padding=True, two_stream=lm).items()}
    labels = x["input_ids"][:, :P] if lm else torch.tensor([0, 2, 1, 1], device=device)
    r, f = ref(**x, labels=labels, mems=mems), fast(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits")
    for mf, mr in zip(f.mems, r.mems):
        assert_close(mf, mr, "mems")
    r.loss.backward(), f.loss.backward()
    if not (variant == "uni_same_length" and lm):  # a row with no visible key: test_fast_attention.py
        assert_grads_close(ref, fast)


def check_rows_that_see_no_key(core: str, device: str, monkeypatch) -> None:
    """No memory: the query stream's first target in the factorization order sees no key (every score masked, a
    uniform softmax on every path). The CUDA cores get such rows as zeros (FastInputs.dead_g): `core` gives the
    reference's logits and the SDPA core's gradients, which differ from the reference's in those rows' score
    gradients alone (the reference differentiates -1e30's rounding)."""
    import xlnet.fast_attention as fa
    from xlnet.model import XLNetLMHeadModel

    ref, fast = model_pair(XLNetLMHeadModel, tiny_config(mem_len=12), device)
    x = {k: v.to(device) for k, v in plm_inputs(padding=True).items()}
    labels = x["input_ids"][:, :P]
    r = ref(**x, labels=labels)
    r.loss.backward()
    grads = {}
    for name in ("sdpa", core):
        monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False, name=name: name)
        fast.zero_grad()
        f = fast(**x, labels=labels)
        assert_close(f.logits, r.logits, f"logits, {name} core")
        f.loss.backward()
        grads[name] = flat_grads(fast)
    assert_close(grads[core], grads["sdpa"], f"gradients, {core} core against sdpa core", tol=1e-6)
    expected = flat_grads(ref)
    assert 0 < (grads["sdpa"] - expected).norm() < 1e-2 * expected.norm()


def check_activation_checkpointing(config: XLNetConfig, device: str = "cpu") -> None:
    """torch.utils.checkpoint around each layer (as training.apply_activation_checkpointing does), with dropout
    on: recomputation must redraw the same masks, so the loss and gradients equal the un-checkpointed run's."""
    from torch.utils.checkpoint import checkpoint

    from xlnet.model import XLNetLMHeadModel

    torch.manual_seed(0)
    plain = XLNetLMHeadModel(config).to(device)
    ckpt = XLNetLMHeadModel(config).to(device)
    ckpt.load_state_dict(plain.state_dict())
    for layer in ckpt.transformer.layer:
        inner = layer.forward
        layer.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    x = {k: v.to(device) for k, v in plm_inputs(padding=True).items()}
    labels = x["input_ids"][:, :P]
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        out = model(**x, labels=labels)
        out.loss.backward()
        losses.append(out.loss)
    assert_close(losses[1], losses[0], "loss")
    assert_grads_close(plain, ckpt)


def plm_inputs(seed: int = 1, padding: bool = False, segments: bool = True, two_stream: bool = True,
               bsz: int = B, n_pred: int = P) -> dict:
    """Random tokens, A/B/<cls> segments, optional left padding, and a random factorization order with
    n_pred target slots (the last slot of row 0 left empty, as a padded slot)."""
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(9, V, (bsz, L), generator=g)}
    if segments:  # A, B and <cls> (segment 2)
        x["token_type_ids"] = (torch.arange(L) >= L // 2).long().expand(bsz, L).clone()
        x["token_type_ids"][:, -1] = 2
    if padding:  # left padding of varying length
        mask = torch.ones(bsz, L)
        for b in range(bsz):
            mask[b, : b % 3] = 0
        x["attention_mask"] = mask
    if two_stream:
        rank = torch.stack([torch.randperm(L, generator=g) for _ in range(bsz)])
        x["perm_mask"] = (rank[:, None, :] >= rank[:, :, None]).float()  # rank-0 rows are fully masked
        tm = torch.zeros(bsz, n_pred, L)
        for b in range(bsz):
            pos = torch.randperm(L, generator=g)[:n_pred]
            tm[b, torch.arange(n_pred), pos] = 1
        tm[0, -1] = 0  # a padded prediction slot
        x["target_mapping"] = tm
    return x


def two_processes(verb: str, cfg, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`xlnet VERB --config <cfg as YAML> FLAGS` in 2 processes on gloo (one thread each); asserts it succeeded.
    The YAML lands beside cfg.out_dir."""
    yaml_path = Path(cfg.out_dir).with_suffix(".yaml")
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "xlnet.cli", verb, "--config", str(yaml_path), *flags]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_finetune_run(one: str | Path, two: str | Path, tol: float = 1e-5) -> list[dict]:
    """Two fine-tuning (or distillation) output directories hold the same run: every logged value to `tol`, the
    same dev scores, the best model's weights to `tol`. Returns the two summaries."""
    from safetensors.torch import load_file

    from xlnet.training import read_metrics

    one, two = Path(one), Path(two)
    rows = [read_metrics(d / "metrics.jsonl") for d in (one, two)]
    assert [(r["split"], r["step"]) for r in rows[0]] == [(r["split"], r["step"]) for r in rows[1]]
    for a, b in zip(*rows):
        for key in set(a) - {"time"}:
            assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key)
    weights = [load_file(d / "best" / "model.safetensors") for d in (one, two)]
    for name, w in weights[0].items():
        torch.testing.assert_close(w, weights[1][name], rtol=0, atol=tol, msg=name)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert summaries[0]["dev"]["metrics"] == summaries[1]["dev"]["metrics"]
    return summaries


def record_scalar_reads(monkeypatch) -> list[tuple[str, int]]:
    """Patch training.PendingScalars to record ("queue", n) when step n's scalars are queued and ("read", n)
    when they are read; returns the list the loop fills."""
    import xlnet.training as TR

    events: list[tuple[str, int]] = []

    class Recording(TR.PendingScalars):
        def __init__(self, **values):
            super().__init__(**values)
            self.step = sum(kind == "queue" for kind, _ in events) + 1
            events.append(("queue", self.step))

        def read(self):
            events.append(("read", self.step))
            return super().read()

    monkeypatch.setattr(TR, "PendingScalars", Recording)
    return events


def original_tokenizer(lowercase: bool = False) -> Tokenizer:
    """The embedded spiece.model with the original XLNet scripts' cleanup: preprocess_text(text, lower=uncased),
    which strips accents (keep_accents False) and collapses spaces (tests/data/make_original_*.py's oracle)."""
    tok = Tokenizer.load(Path(__file__).parents[1] / "src" / "xlnet" / "assets" / "tokenizer")
    return dataclasses.replace(tok, lowercase=lowercase, strip_accents=True, remove_space=True)
