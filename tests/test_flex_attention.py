"""The flex core (src/xlnet/flex_attention.py) against the reference: model outputs and gradients, and its
attention dropout (hashed keep mask, made exact from two calls' log-sum-exps) against plain PyTorch with the same
mask. Without CUDA, flex_attention runs its dense eager implementation, whose backward torch refuses on CPU only
by a device check that these tests lift (`flex_on_cpu`); on a GPU the core runs compiled."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import (CONFIGS, B, P, assert_close, assert_grads_close, check_activation_checkpointing,
                     check_core_matches_reference, check_rows_that_see_no_key, flat_grads, model_pair, plm_inputs,
                     tiny_config)
from xlnet.flex_attention import flex_core, flex_keep, fold_into_table
from xlnet.model import XLNetLMHeadModel
from xlnet.training import compile_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """flex_attention's eager implementation differentiates on any device; torch 2.13 refuses CPU tensors that
    need a gradient before reaching it. Also quiets its 'called without torch.compile' warning."""
    import torch.nn.attention.flex_attention as tfa

    monkeypatch.setattr(tfa, "_validate_device", lambda *args: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*compile", category=UserWarning)
        yield


def force_flex(monkeypatch) -> None:
    import xlnet.fast_attention as fa

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: "flex")


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("head", ["lm", "classification"])
def test_flex_core_matches_reference(variant: str, head: str, flex_on_cpu, monkeypatch) -> None:
    """Every attention variant (uni tables fall back to the math core: their windows are clamped)."""
    check_core_matches_reference("flex", variant, head, DEVICE, monkeypatch)


def test_flex_core_rows_that_see_no_key(flex_on_cpu, monkeypatch) -> None:
    check_rows_that_see_no_key("flex", DEVICE, monkeypatch)


def random_call(lq: int, klen: int, d_head: int = 8, n_head: int = 3, bsz: int = 2, seed: int = 0):
    """Inputs of one flex_core call with the bidirectional table's geometry: R = K + Lq columns, row i's keys
    from column c0_i (content-stream rows, and query-stream rows at arbitrary positions)."""
    gen = torch.Generator().manual_seed(seed)
    width = klen + lq
    qc, kc, v = (torch.randn(bsz, n_head, n, d_head, generator=gen) for n in (lq, klen, klen))
    table = torch.randn(bsz, n_head, lq, width, generator=gen)
    c0 = torch.randint(0, lq + 1, (bsz, lq), generator=gen)
    return [t.to(DEVICE).requires_grad_() for t in (qc, kc, v, table)], c0.to(DEVICE)


def dense(qc, kc, v, table, c0, keep: torch.Tensor | None, scale: float, drop: int = 0) -> torch.Tensor:
    """The same attention from plain ops: the table gathered at c0 + j, softmax, the kept probabilities times v."""
    cols = c0[:, None, :, None] + torch.arange(kc.shape[2], device=c0.device)
    score = qc @ kc.transpose(-1, -2) * scale + table.gather(-1, cols.expand(-1, qc.shape[1], -1, -1))
    prob = torch.softmax(score, -1)
    if keep is not None:
        prob = prob * keep * (65536 / (65536 - drop))
    return prob @ v


def keep_grid(seed: torch.Tensor, shape: tuple[int, ...], drop: int) -> torch.Tensor:
    """flex_keep over every (b, h, i, j) of a [B, n, Lq, K] call, from int32 index grids."""
    idx = [torch.arange(n, dtype=torch.int32, device=seed.device).view(
        [-1 if d == k else 1 for d in range(4)]) for k, n in enumerate(shape)]
    return flex_keep(seed, *idx, shape[1:], drop)


def dropout_call(p: float, lq: int, klen: int, scale: float, **shape) -> tuple[torch.Tensor, torch.Tensor, list]:
    """flex_core's output and plain PyTorch's with the keep mask of the seed flex_core drew (replayed from the
    generator), and the inputs."""
    inputs, c0 = random_call(lq, klen, **shape)
    torch.manual_seed(11)
    out = flex_core(*inputs, c0, p, scale)
    keep, drop = None, round(p * 65536)
    if p:
        torch.manual_seed(11)
        seed = torch.randint(-2**31, 2**31 - 1, (1,), dtype=torch.int32, device=DEVICE)[0]
        keep = keep_grid(seed, (*out.shape[:3], klen), drop).to(out.dtype)
        assert 0 < keep.mean() < 1
        if p == 0.9:  # whole rows dropped
            assert (keep.sum(-1) == 0).any()
    return out, dense(*inputs, c0, keep, scale, drop), inputs


def assert_same_call(out: torch.Tensor, expected: torch.Tensor, inputs: list, tol: float) -> None:
    """Output and the gradients of q, k, v and the table (finite) agree."""
    assert_close(out, expected, "output", tol=tol)
    grad = torch.randn_like(out)
    for name, g, w in zip("qkvt", torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert g.isfinite().all(), name
        assert_close(g, w, f"grad {name}", tol=tol)


@pytest.mark.parametrize("p, lq, klen", [(0.0, 7, 20), (0.3, 7, 20), (0.3, 20, 33), (0.9, 5, 3)])
def test_flex_core_dropout_and_gradients_against_torch(p: float, lq: int, klen: int, flex_on_cpu) -> None:
    """Output and the gradients of q, k, v and the table equal plain PyTorch with the keep mask that the hash
    gives for the call's seed. p = 0.9 with 3 keys drops whole rows: output 0, finite gradients."""
    assert_same_call(*dropout_call(p, lq, klen, 0.35), tol=1e-5)


def test_flex_keep_rate_and_independence() -> None:
    """The hashed keep mask drops p of the scores, independently of position and between seeds."""
    shape, drop = (4, 12, 64, 96), round(0.1 * 65536)
    masks = [keep_grid(torch.tensor(s, dtype=torch.int32), shape, drop).float() for s in (1, 2, -7)]
    n = masks[0].numel()
    for m in masks:
        assert abs(m.mean() - 0.9) < 4 * (0.09 / n) ** 0.5  # four standard deviations
        assert abs(m[..., 0::2].mean() - m[..., 1::2].mean()) < 8 * (0.09 / n) ** 0.5
    both = (masks[0] * masks[1]).mean()
    assert abs(both - 0.81) < 4 * (0.81 * 0.19 / n) ** 0.5  # two seeds: independent masks


def test_hash_compiles_to_the_same_mask() -> None:
    """Inductor's code for the keep mask (C++ here, Triton on a GPU) wraps int32 products as eager PyTorch does:
    a compiled flex call whose score_mod drops by the hash gives the eager call's output (CPU: inference only)."""
    from torch.nn.attention.flex_attention import flex_attention

    (qc, kc, v, _), _ = random_call(16, 40, d_head=16)
    qc, kc, v = (t.detach() for t in (qc, kc, v))
    seed = torch.tensor([-123456789], dtype=torch.int32, device=DEVICE)
    shape, drop = (qc.shape[1], 16, 40), round(0.25 * 65536)

    def dropped(s, b, h, i, j):
        return torch.where(flex_keep(seed[0], b, h, i, j, shape, drop), s, float("-inf"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = flex_attention(qc, kc, v, score_mod=dropped)
    compiled = torch.compile(flex_attention, dynamic=False)(qc, kc, v, score_mod=dropped)
    assert_close(compiled, eager, "compiled against eager", tol=1e-5)


def test_fold_into_table_puts_each_term_at_its_column() -> None:
    """The folded table read at c0 + j is the position term plus the segment term plus the mask."""
    (qc, kc, v, table), c0 = random_call(6, 9)
    coef = torch.randn(2, 3, 6, device=DEVICE)
    same = (torch.rand(2, 1, 6, 9, device=DEVICE) < 0.5).float()
    mask = torch.where(torch.rand(1, 1, 6, 9, device=DEVICE) < 0.3, -1e30, 0.0)
    folded = fold_into_table(table.detach(), c0, (coef, same), mask, 9)
    cols = (c0[:, None, :, None] + torch.arange(9, device=DEVICE)).expand(-1, 3, -1, -1)
    expected = table.detach().gather(-1, cols) + coef[..., None] * same + mask
    assert torch.equal(folded.gather(-1, cols), expected)
    assert fold_into_table(table, c0, (), None, 9) is table


def test_flex_needs_cuda(monkeypatch) -> None:
    import xlnet.fast_attention as fa
    from xlnet.errors import XLNetError

    monkeypatch.setattr(fa, "FORCED_CORE", "flex")
    with pytest.raises(XLNetError, match="XLNET_ATTN_CORE=flex needs a CUDA device"):
        fa.pick_core(torch.device("cpu"))


# --- on a GPU: the compiled kernel ---------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head", ["lm", "classification"])
@pytest.mark.parametrize("variant", ["bi", "bi_data"])
def test_cuda_flex_training_matches_reference_fp32(variant: str, head: str, monkeypatch) -> None:
    """The compiled kernel in float32 (head dim 16, flex's smallest) against the reference on the same GPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_core_matches_reference("flex", variant, head, DEVICE, monkeypatch, n_head=2, d_head=16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("p, lq, klen", [(0.3, 70, 150), (0.9, 5, 3)])
def test_cuda_flex_dropout_against_torch(p: float, lq: int, klen: int, monkeypatch) -> None:
    """The compiled kernel's hashed dropout and its gradients (several tiles) against plain PyTorch."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert_same_call(*dropout_call(p, lq, klen, 0.25, d_head=16, n_head=4), tol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_flex_under_activation_checkpointing(monkeypatch) -> None:
    """Each layer recomputed in the backward draws its dropout seed again from the restored generator: the same
    hashed masks, so the loss and gradients equal the run without checkpointing. (GPU only: on CPU, flex's eager
    backward traces its score_mod, and reading the checkpointed table there would trace the recomputation.)"""
    force_flex(monkeypatch)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    config = tiny_config(mem_len=12, n_head=2, d_head=16, dropout=0.1, dropatt=0.3, attn_impl="fast")
    check_activation_checkpointing(config, DEVICE)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_flex_step_close_to_sdpa_core(monkeypatch) -> None:
    """A bf16 PLM training step under autocast, compiled blocks as `xlnet pretrain` runs them: the flex core's
    loss and gradients within bf16 rounding of the SDPA core's (dropout off: the cores draw different masks)."""
    import xlnet.fast_attention as fa

    config = tiny_config(mem_len=12, n_head=2, d_head=16)
    _, fast = model_pair(XLNetLMHeadModel, config, DEVICE)
    compile_blocks(fast)
    x = {k: v.cuda() for k, v in plm_inputs(padding=True).items()}
    mems = [torch.randn(B, 5, config.d_model, device="cuda") for _ in range(config.n_layer)]
    labels = x["input_ids"][:, :P]
    runs = {}
    for core in ("sdpa", "flex"):
        monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False, core=core: core)
        fast.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fast(**x, labels=labels, mems=mems)
        out.loss.backward()
        runs[core] = out.loss.float(), flat_grads(fast)
    assert abs(runs["flex"][0] - runs["sdpa"][0]) < 2e-2 * runs["sdpa"][0]
    assert runs["flex"][1].isfinite().all()
    assert (runs["flex"][1] - runs["sdpa"][1]).norm() < 5e-2 * runs["sdpa"][1].norm()


def test_flex_core_traces_in_compiled_blocks(flex_on_cpu, monkeypatch) -> None:
    """Transformer blocks compiled as `xlnet pretrain` compiles them, with flex traced inside each (its score_mods'
    closures over the folded table, c0 and the dropout seed; backend eager: on CPU inductor lowers flex for
    inference only, and AOT autograd's CPU run of flex's backward drops the table's gradient): the reference's
    logits and gradients, and with dropatt a finite training step whose loss varies from call to call."""
    force_flex(monkeypatch)
    config = tiny_config(mem_len=12)
    ref, fast = model_pair(XLNetLMHeadModel, config, DEVICE)
    compile_blocks(fast, backend="eager")
    mems = [torch.randn(B, 5, config.d_model, device=DEVICE) for _ in range(config.n_layer)]
    x = {k: v.to(DEVICE) for k, v in plm_inputs(padding=True).items()}
    labels = x["input_ids"][:, :P]
    r, f = ref(**x, labels=labels, mems=mems), fast(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)
    for layer in fast.transformer.layer:
        layer.rel_attn.dropatt.p = 0.3
    fast.zero_grad()
    losses = [fast(**x, labels=labels, mems=mems).loss for _ in range(2)]
    losses[0].backward()
    assert losses[0] != losses[1] and flat_grads(fast).isfinite().all()
