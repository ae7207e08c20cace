"""Shared by the parity tests (test_model.py: ours vs HF; test_fast_attention.py: fast vs reference)."""

from __future__ import annotations

import torch

from xlnet.config import XLNetConfig

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
    assert diff <= tol, f"{what}: max abs diff {diff:.3g}"
    return diff
