"""The triton core (src/xlnet/triton_attention.py) against the reference: model outputs and gradients, and the
kernel's dropout against the same computation with the mask it drew. Without CUDA the kernels run under
Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("XLNET_TRITON_AUTOTUNE", "0")  # on a GPU: one tile per kernel, not a timed trial per shape
triton = pytest.importorskip("triton")

from helpers import (CONFIGS, B, P, assert_close, assert_grads_close, check_core_matches_reference,  # noqa: E402
                     check_rows_that_see_no_key, flat_grads, model_pair, plm_inputs, tiny_config)
from xlnet.model import XLNetLMHeadModel  # noqa: E402
from xlnet.triton_attention import TILES, triton_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch) -> None:
    """Every buffer the kernels fill (output, row statistics, each gradient, the whole table gradient with the
    columns outside the windows) starts as NaN: an entry a kernel leaves unwritten fails the comparisons."""
    import xlnet.triton_attention as ta

    real = ta._new_output
    monkeypatch.setattr(ta, "_new_output", lambda *args: real(*args).fill_(float("nan")))


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("head", ["lm", "classification"])
def test_triton_core_matches_reference(variant: str, head: str, monkeypatch) -> None:
    check_core_matches_reference("triton", variant, head, DEVICE, monkeypatch)


def test_triton_core_without_memory_fully_masked_rows(monkeypatch) -> None:
    check_rows_that_see_no_key("triton", DEVICE, monkeypatch)


@pytest.mark.parametrize("with_seg", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_kernel_dropout_and_gradients_against_torch(with_seg: bool, with_mask: bool) -> None:
    """With attention dropout: v = identity reads back the kernel's dropped, rescaled probabilities (so its keep
    mask); under the same seed the kernel's output and the gradients of q, k, v, the table and the segment
    coefficient equal plain PyTorch with that mask. Table rows read windows at arbitrary offsets c0. Partial
    tiles, a partial dropout group (20 keys) and a head dim below the kernel's BLOCK_D."""
    check_kernel_against_torch(lq=12, klen=20, with_seg=with_seg, with_mask=with_mask)


@pytest.mark.parametrize("tile", range(max(map(len, TILES.values()))))
def test_every_autotune_tile_against_torch(tile: int, monkeypatch) -> None:
    """The other tests run each kernel's first tile (XLNET_TRITON_AUTOTUNE=0; the interpreter's own small ones
    on CPU); here tile number `tile` of every kernel's GPU list is forced, at a shape with several row and key
    blocks, so whatever the autotuner picks was checked: compiled on a GPU, under the interpreter on CPU (the
    same block shapes and layouts; warps and stages only matter to the compiler)."""
    for kernel, tiles in TILES.items():
        force_tile(monkeypatch, kernel, tiles[tile % len(tiles)])
    check_kernel_against_torch(lq=100, klen=64, with_seg=True, with_mask=True)


@pytest.mark.parametrize("keys_down", [True, False])
def test_dk_dv_kernel_in_both_layouts(keys_down: bool, monkeypatch) -> None:
    """The dk/dv kernel's tile computed [rows, keys] or transposed [keys, rows] (the autotuner tries both on a
    GPU): the same output, gradients and dropout mask as PyTorch."""
    import xlnet.triton_attention as ta

    first = (ta.INTERPRETER_TILES if ta.INTERPRETED else TILES)["backward_kv"][0]
    force_tile(monkeypatch, "backward_kv", (*first[:4], keys_down))
    check_kernel_against_torch(lq=12, klen=20, with_seg=True, with_mask=True)


def force_tile(monkeypatch, kernel: str, tile: tuple) -> None:
    """Only `tile` for this kernel (its autotuner's list and cache replaced for the test)."""
    import xlnet.triton_attention as ta

    tuner = getattr(ta, "_" + kernel)
    monkeypatch.setattr(tuner, "configs", [ta.tile_config(kernel, tile)])
    monkeypatch.setattr(tuner, "cache", {})


def check_kernel_against_torch(lq: int, klen: int, with_seg: bool, with_mask: bool) -> None:
    """The kernel (dropout 0.3) against PyTorch with the mask it drew: output and every gradient."""
    g = torch.Generator().manual_seed(0)
    bsz, n, dh, p, scale = 2, 2, klen, 0.3, 0.25  # dh = klen: v = identity reads the probabilities back
    rlen = klen + lq

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    qc, k, v, table, coef = rand(bsz, n, lq, dh), rand(bsz, n, klen, dh), rand(bsz, n, klen, dh), \
        rand(bsz, n, lq, rlen), rand(bsz, n, lq)
    c0 = torch.randint(0, lq + 1, (bsz, lq), generator=g).to(DEVICE)
    seg_q, seg_k = (torch.randint(0, 2, shape, generator=g).to(DEVICE) for shape in ((bsz, lq), (bsz, klen)))
    mask = torch.where(torch.rand(bsz, 1, lq, klen, generator=g) < 0.2, -1e30, 0.0).to(DEVICE)
    mask[..., 0] = 0.0  # every row sees a key
    if not with_mask:
        mask = None
    strides = (n * lq * rlen, lq * rlen)

    def kernel(vv, *tensors):
        torch.manual_seed(7)  # the kernel's seed comes from the default generator
        seg = (tensors[3], seg_q, seg_k) if with_seg else (None, None, None)
        return triton_attention(tensors[0], tensors[1], vv, tensors[2], strides, c0, *seg, mask, p, scale)

    eye = torch.eye(klen, device=DEVICE).expand(bsz, n, klen, dh)
    dropped = kernel(eye, qc, k, table, coef)
    keep = dropped != 0
    visible = keep if mask is None else keep[(mask == 0).expand_as(keep)]
    assert 0.6 < visible.float().mean() < 0.8  # p = 0.3 of the visible entries dropped
    leaves = [t.clone().requires_grad_() for t in (v, qc, k, table, coef)]
    out = kernel(*leaves[:1], *leaves[1:])
    cols = (c0[:, None, :, None] + torch.arange(klen, device=DEVICE)).expand(bsz, n, lq, klen)
    vv, qq, kk, tt, cc = (t.detach().clone().requires_grad_() for t in leaves)
    score = scale * qq @ kk.transpose(-1, -2) + tt.gather(-1, cols) + (0 if mask is None else mask)
    if with_seg:
        score = score + cc[..., None] * (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    p_drawn = round(p * 65536) / 65536  # the kernel's p: a multiple of 1/65536 (16-bit lanes)
    expected = (torch.softmax(score, -1) * keep / (1 - p_drawn)) @ vv
    assert_close(out, expected, "output")
    grad = rand(*out.shape)
    out.backward(grad), expected.backward(grad)
    for name, a, b in zip(("v", "q", "k", "table", "coef"), leaves, (vv, qq, kk, tt, cc)):
        if name != "coef" or with_seg:
            assert_close(a.grad, b.grad, f"grad {name}")
    assert torch.equal(kernel(eye, qc, k, table, coef) != 0, keep)  # the same seed, the same mask
    torch.manual_seed(8)
    other = triton_attention(qc, k, eye, table, strides, c0, None, None, None, mask, p, scale)
    assert not torch.equal(other != 0, keep)  # another seed, another mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step_close_to_sdpa_core(monkeypatch) -> None:
    """Under bf16 autocast (tensor-core products, bf16 table and gradients) the triton core's loss and parameter
    gradients stay within bf16 rounding of the SDPA core's, dropout off."""
    import xlnet.fast_attention as fa

    config = tiny_config(mem_len=12, d_model=128, n_head=2, d_head=64, d_inner=256, **CONFIGS["bi"])
    runs = []
    for core in ("sdpa", "triton"):
        monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False, core=core: core)
        torch.manual_seed(0)
        model = XLNetLMHeadModel(dataclasses.replace(config, attn_impl="fast")).cuda().train()
        x = {k: v.cuda() for k, v in plm_inputs(padding=True).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**x, labels=x["input_ids"][:, :P]).loss
        loss.backward()
        runs.append((loss.item(), flat_grads(model)))
    (loss_s, grad_s), (loss_t, grad_t) = runs
    assert abs(loss_t - loss_s) < 1e-2 * abs(loss_s)
    assert (grad_t - grad_s).norm() < 5e-2 * grad_s.norm()


def test_custom_ops_pass_opcheck_and_compile_as_one_graph(monkeypatch) -> None:
    """The kernels are registered operators: torch.library.opcheck (schema, fake tensors, autograd
    registration), and torch.compile(fullgraph=True) takes a whole PLM step with the triton core."""
    import xlnet.fast_attention as fa
    from xlnet.triton_attention import rel_attention

    g = torch.Generator().manual_seed(0)
    bsz, n, lq, klen, dh = 2, 2, 4, 8, 16
    qc, k, v = (torch.randn(bsz, n, rows, dh, generator=g, device="cpu").to(DEVICE).requires_grad_()
                for rows in (lq, klen, klen))
    table = torch.randn(bsz, n, lq, klen + lq, generator=g).to(DEVICE).requires_grad_()
    coef = torch.randn(bsz, n, lq, generator=g).to(DEVICE).requires_grad_()
    c0 = (lq - torch.arange(lq, device=DEVICE, dtype=torch.int32))[None]
    seg_q, seg_k = torch.zeros(bsz, lq, dtype=torch.int32, device=DEVICE), torch.ones(bsz, klen, dtype=torch.int32,
                                                                                       device=DEVICE)
    seed = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    args = (qc, k, v, table, c0, coef, seg_q, seg_k, None, seed, n * lq * (klen + lq), lq * (klen + lq), 0.0, 0.5)
    torch.library.opcheck(rel_attention, args, test_utils=("test_schema", "test_faketensor",
                                                           "test_autograd_registration"))

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: "triton")
    config = tiny_config(mem_len=12)
    ref, fast = model_pair(XLNetLMHeadModel, config, DEVICE)
    x = {k_: t.to(DEVICE) for k_, t in plm_inputs(padding=True).items()}
    labels = x["input_ids"][:, :P]
    # with memory every row sees a key (rows that see none: test_triton_core_without_memory_fully_masked_rows)
    mems = [torch.randn(B, 5, config.d_model, generator=g).to(DEVICE) for _ in range(config.n_layer)]
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    r, f = ref(**x, labels=labels, mems=mems), compiled(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "cuobjdump")), reason="this Triton build ships no CUDA tools")
def test_autotune_tiles_compile_for_hopper_without_register_spills() -> None:
    """Every tile the autotuner may pick, compiled ahead of time for sm_90a at the base model's shapes (content
    and query streams, fine-tuning, no dropout) with the installed Triton: no register spills (no local memory),
    shared memory within 227 KiB. Compiling needs no GPU, so this runs on CPU (benchmarks/kernel_resources.py;
    the interpreter is switched off for it)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--check", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    assert len(rows) == 4 * sum(map(len, TILES.values()))  # 4 scenarios × every kernel's tiles
    assert all(r["stack_bytes"] == 0 and r["shared_kib"] <= 227 for r in rows)
    # keys down, every product of the dk/dv kernel is a Hopper wgmma (HGMMA), none the older mma.sync (HMMA)
    assert all(r["hgmma"] > 0 and r["hmma"] == 0 for r in rows if r["keys_down"])
