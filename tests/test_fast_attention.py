"""attn_impl="fast" against the reference path (and HF): outputs, mems and parameter gradients in float32."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import CONFIGS as SHARED_CONFIGS, B, L, P, assert_close, assert_grads_close, flat_grads  # noqa: E402
from helpers import check_activation_checkpointing
from helpers import model_pair as pair, plm_inputs, tiny_config
from xlnet import training as T
from xlnet.errors import XLNetError
from xlnet.fast_attention import FastDropout, dropout_linear, fast_dropout, residual_dropout
from xlnet.heads import XLNetForSequenceClassification
from xlnet.model import XLNetLMHeadModel, XLNetModel


def inputs(**kw) -> dict:
    """PLM inputs with left padding by default (the fast path's masks are what is under test)."""
    return plm_inputs(**{"padding": True, **kw})


CONFIGS = SHARED_CONFIGS


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("two_stream", [True, False])
def test_fast_matches_reference_with_mems_and_grads(variant: str, two_stream: bool) -> None:
    config = tiny_config(mem_len=12, reuse_len=5, **CONFIGS[variant])
    ref, fast = pair(XLNetLMHeadModel, config)
    ref.train(), fast.train()  # dropout 0: the training code path
    # start from memory: with uni attention and no memory, the rank-0 target of the query stream sees no key
    # at all, and the reference's gradient there reaches another query's distance row (see fast_inputs)
    torch.manual_seed(3)
    mems_r = mems_f = [torch.randn(B, 4, config.d_model) for _ in range(config.n_layer)]
    for step in range(2):
        x = inputs(seed=10 + step, two_stream=two_stream)
        labels = (x["input_ids"][:, :P] if two_stream else x["input_ids"]).clone()
        labels[0, -1] = -100
        r = ref(**x, labels=labels, mems=mems_r)
        f = fast(**x, labels=labels, mems=mems_f)
        assert_close(f.logits, r.logits, f"step {step} logits")
        for mf, mr in zip(f.mems, r.mems):
            assert_close(mf, mr, f"step {step} mems")
        ref.zero_grad(), fast.zero_grad()
        r.loss.backward()
        f.loss.backward()
        if not (variant == "uni_same_length" and two_stream):  # see the test below
            assert_grads_close(ref, fast)
        mems_r, mems_f = r.mems, f.mems


def test_uni_same_length_query_stream_grads_when_every_row_sees_a_key() -> None:
    """uni + same_length + a permutation can leave a query-stream row with no visible key: both paths give it
    the uniform softmax (the same forward, checked above), but the reference's gradient then reaches masked
    scores that its rel_shift reads from the next position's row, a row the fast path never computes (README).
    Without such rows the gradients agree."""
    config = tiny_config(mem_len=12, reuse_len=5, **CONFIGS["uni_same_length"])
    ref, fast = pair(XLNetLMHeadModel, config)
    mems = [torch.randn(B, 4, config.d_model, generator=torch.Generator().manual_seed(i))
            for i in range(config.n_layer)]
    x = inputs(seed=10)
    x["perm_mask"].zero_()  # every row then sees the previous token or the memory
    labels = x["input_ids"][:, :P]
    ref(**x, labels=labels, mems=mems).loss.backward()
    fast(**x, labels=labels, mems=mems).loss.backward()
    assert_grads_close(ref, fast)


@pytest.mark.parametrize("rows", [32, 3])
@pytest.mark.parametrize("variant", ["bi", "uni", "bi_data"])
@pytest.mark.parametrize("core", ["manual", "math", "sdpa"])
def test_both_cores_match_reference(core: str, variant: str, rows: int, monkeypatch) -> None:
    """The CPU training core and the SDPA core (CUDA's; on CPU its math kernel) give the reference's numbers, with
    the content stream's distance table in one block (L = 9 rows) and in blocks of 3 rows (fast_attention.row_block)."""
    import xlnet.fast_attention as fa

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: core)
    monkeypatch.setitem(fa.ROW_BLOCK, "cpu", rows)
    config = tiny_config(mem_len=12, **CONFIGS[variant])
    ref, fast = pair(XLNetLMHeadModel, config)
    mems = [torch.randn(B, 5, config.d_model) for _ in range(config.n_layer)]
    x = inputs()
    labels = x["input_ids"][:, :P]
    r, f = ref(**x, labels=labels, mems=mems), fast(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("core", ["manual", "math", "sdpa"])
def test_cls_only_final_layer_matches_reference(core: str, variant: str, monkeypatch) -> None:
    """Heads that read only <cls> run the final layer's content stream for that row alone (its distance-table
    row read by gather): the reference's logits and gradients, with memory, padding and segments; the body's
    output is the full model's last row."""
    import xlnet.fast_attention as fa

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: core)
    config = tiny_config(mem_len=12, **CONFIGS[variant])
    ref, fast = pair(XLNetForSequenceClassification, config)
    mems = [torch.randn(B, 5, config.d_model) for _ in range(config.n_layer)]
    x = inputs(two_stream=False)
    labels = torch.tensor([0, 2, 1, 1])
    r, f = ref(**x, labels=labels, mems=mems), fast(**x, labels=labels, mems=mems)
    assert f.last_hidden_state.shape == (B, 1, config.d_model)
    full = fast.transformer(**x, mems=mems).last_hidden_state
    assert_close(f.last_hidden_state, full[:, -1:], "last row")
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


def test_compiles_as_one_graph_and_matches_reference() -> None:
    """torch.compile(fullgraph=True) traces the whole PLM forward and backward (no host sync for the segment
    count, no untraceable strided views: the math core on CPU) and gives the reference's numbers. aot_eager runs
    dynamo and AOT autograd without inductor's C++ build, which takes most of a minute here."""
    config = tiny_config(mem_len=12)
    ref, fast = pair(XLNetLMHeadModel, config)
    mems = [torch.randn(B, 5, config.d_model) for _ in range(config.n_layer)]
    x = inputs()
    labels = x["input_ids"][:, :P]
    f = torch.compile(fast, fullgraph=True, backend="aot_eager")(**x, labels=labels, mems=mems)
    r = ref(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_compiled_blocks_share_one_graph_and_match_reference(variant: str, monkeypatch) -> None:
    """Regional compilation (training.compile_blocks, what `--compile` does): every block is compiled in place,
    the blocks share their graphs (one for the inner blocks, one for the final block, which computes only the
    query stream), the core is the traceable one, and numbers and gradients are the reference's (the distance
    table in blocks of 3 rows)."""
    from torch._dynamo.utils import counters

    import xlnet.fast_attention as fa

    monkeypatch.setitem(fa.ROW_BLOCK, "cpu", 3)
    config = tiny_config(mem_len=12, n_layer=4, **CONFIGS[variant])
    ref, fast = pair(XLNetLMHeadModel, config)
    torch._dynamo.reset()
    T.compile_blocks(fast, backend="aot_eager")
    mems = [torch.randn(B, 5, config.d_model) for _ in range(config.n_layer)]
    x = inputs()
    if variant == "uni_same_length":  # rows that see no key: see test_uni_same_length_query_stream_grads_when_...
        x["perm_mask"].zero_()
    labels = x["input_ids"][:, :P]
    counters.clear()
    f, r = fast(**x, labels=labels, mems=mems), ref(**x, labels=labels, mems=mems)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert fast.transformer.blocks_compiled and set(fast.state_dict()) == set(ref.state_dict())
    assert_close(f.logits, r.logits, "logits")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


def test_row_block(monkeypatch) -> None:
    """The largest divisor of L from half the device's target to the target; one block when there is none."""
    from xlnet.fast_attention import row_block

    import xlnet.fast_attention as fa

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [row_block(n, cpu) for n in (256, 512, 9, 100, 48, 254, 1)] == [32, 32, 9, 25, 24, 254, 1]
    assert row_block(512, cuda) == 512  # no target: one block
    monkeypatch.setitem(fa.ROW_BLOCK, "cuda", 64)
    assert [row_block(n, cuda) for n in (512, 384, 96)] == [64, 64, 48]


@pytest.mark.parametrize("bi_data", [False, True])
@pytest.mark.parametrize("rows", [12, 6, 4, 1])
@pytest.mark.parametrize("kind", ["scores", "bias"])
def test_blocked_position_term_matches_rel_shift(kind: str, rows: int, bi_data: bool) -> None:
    """distance_scores in blocks of rows + _ShiftMaskQK (the manual core's scores; the SDPA core's bias with the
    segment term) equal the reference's rel_shift of the whole table plus mask (and q·k or segment term), forward
    and every gradient (float64)."""
    import xlnet.fast_attention as fa
    from xlnet.model import rel_shift

    g = torch.Generator().manual_seed(rows)
    bsz, n, dh, qlen, mlen, scale = 2, 3, 5, 12, 7, 0.25
    klen, rlen = qlen + mlen, 2 * qlen + mlen

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    q_r, k_r = rand(bsz, qlen, n, dh), rand(bsz if bi_data else 1, rlen, n, dh)
    qc, kc, coef = rand(bsz, n, qlen, dh), rand(bsz, n, klen, dh), rand(bsz, n, qlen)
    same = (torch.rand(bsz, 1, qlen, klen, generator=g) < 0.5).double()
    mask = torch.where(torch.rand(bsz, 1, qlen, klen, generator=g) < 0.3, fa.mask_value(torch.float64), 0.0)
    table, strides = fa.distance_scores(q_r, k_r, rows)
    geom = (bsz, n, qlen // rows, *strides, klen)
    flat = table.view(-1, rows, table.shape[-1])
    ref = rel_shift(torch.einsum("bind,bjnd->bnij", q_r, k_r.expand(bsz, -1, -1, -1)), klen) + mask
    if kind == "scores":
        out = fa._ShiftMaskQK.apply(flat, mask, fa.flat3(qc), fa.flat3(kc), scale, geom)
        ref = ref + scale * qc @ kc.transpose(-1, -2)
    else:
        out = fa._ShiftMaskQK.apply(flat, mask, None, None, scale, geom, coef, same)
        ref = ref + coef[..., None] * same
    assert out.shape == (bsz, n, qlen, klen) and out.is_contiguous()
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    leaves = [q_r, k_r, *((qc, kc) if kind == "scores" else (coef,))]
    got = torch.autograd.grad((out * weight).sum(), leaves)
    want = torch.autograd.grad((ref * weight).sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_inference_no_grad_matches_reference() -> None:
    config = tiny_config(num_labels=3)
    ref, fast = pair(XLNetForSequenceClassification, config)
    ref.eval(), fast.eval()
    x = inputs(two_stream=False)
    with torch.inference_mode():
        assert_close(fast(**x).logits, ref(**x).logits, "logits")
        assert_close(fast.transformer(**x).last_hidden_state, ref.transformer(**x).last_hidden_state, "hidden")


def test_fine_tuning_head_grads_match_reference() -> None:
    config = tiny_config()
    ref, fast = pair(XLNetForSequenceClassification, config)
    x = inputs(two_stream=False)
    labels = torch.tensor([0, 2, 1, 1])
    r, f = ref(**x, labels=labels), fast(**x, labels=labels)
    assert_close(f.loss, r.loss, "loss")
    r.loss.backward(), f.loss.backward()
    assert_grads_close(ref, fast)


def test_no_segments_no_mask() -> None:
    ref, fast = pair(XLNetModel, tiny_config())
    x = inputs(padding=False, segments=False, two_stream=False)
    assert_close(fast(**x).last_hidden_state, ref(**x).last_hidden_state, "hidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_value_keeps_a_fully_masked_row_uniform(dtype: torch.dtype) -> None:
    """The masked score swallows the score it is added to, so a row with every key masked is the reference's
    uniform softmax; finite in bf16 (the reference's -1e30 in float32, -1e20 below it: SDPA's NaN, see
    fast_attention.mask_value)."""
    from xlnet.fast_attention import mask_value

    scores = (torch.randn(3, 7, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    masked = scores + mask_value(dtype)
    assert masked.isfinite().all() and (masked == mask_value(dtype)).all()
    assert mask_value(torch.float32) == -1e30


def test_zero_target_row_gives_zero_attention() -> None:
    """A padded slot (zero row of target_mapping): the attention vector is 0, so g = LN(w) after layer 1 etc."""
    ref, fast = pair(XLNetModel, tiny_config(n_layer=1))
    x = inputs()
    x["target_mapping"][1] = 0
    r, f = ref(**x).last_hidden_state, fast(**x).last_hidden_state
    assert_close(f, r, "query stream")
    assert_close(f[1], f[1, :1].expand_as(f[1]), "all-zero rows identical")


def test_fast_matches_hf() -> None:
    transformers = pytest.importorskip("transformers")
    config = tiny_config(mem_len=12)
    torch.manual_seed(0)
    fast = XLNetLMHeadModel(dataclasses.replace(config, attn_impl="fast"))
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**config.to_hf_dict()))
    hf.load_state_dict(fast.state_dict(), strict=False)
    x = inputs()
    labels = x["input_ids"][:, :P].clone()
    labels[0, -1] = -100
    f, h = fast(**x, labels=labels), hf(**x, labels=labels)
    assert_close(f.logits, h.logits, "logits")
    assert_close(f.loss, h.loss, "loss")
    f.loss.backward(), h.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in fast.named_parameters():
        assert_close(p.grad, hf_grads[name].grad, f"grad {name}")


def test_activation_checkpointing() -> None:
    check_activation_checkpointing(tiny_config(mem_len=12, dropout=0.1, dropatt=0.1, attn_impl="fast"))


def test_fast_dropout_rate_and_scale() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = fast_dropout(x, 0.1, True)
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.9) < 3e-3
    assert abs(y.mean().item() - 1.0) < 5e-3  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask * scale
    assert fast_dropout(x, 0.1, False) is x
    half = fast_dropout(torch.ones(1000, 1000, dtype=torch.bfloat16), 0.1, True)
    assert set(half.unique().tolist()) == {0.0, torch.tensor(1 / 0.9, dtype=torch.bfloat16).item()}
    module = FastDropout(0.25)
    assert module(torch.ones(3)).shape == (3,) and "p=0.25" in repr(module)


def test_fused_dropouts_are_unbiased() -> None:
    """The residual add and layer_2's product carry the survivor scale: both equal their dropout-free value
    in expectation (a missing or doubled scale is off by 11% at p = 0.1)."""
    torch.manual_seed(0)
    x, out = torch.zeros(500, 400), torch.ones(500, 400)
    y = residual_dropout(x, out, 0.1, True)
    assert y.unique().tolist() == [0.0, pytest.approx(65536 / (65536 - 6554))]
    assert abs(y.mean().item() - 1.0) < 3e-3
    linear = torch.nn.Linear(400, 3)
    torch.nn.init.constant_(linear.weight, 1.0)
    z = dropout_linear(torch.ones(2, 500, 400), linear, 0.1, True)
    assert z.shape == (2, 500, 3)
    assert abs((z - linear.bias).mean().item() / 400 - 1.0) < 3e-3
    assert torch.equal(dropout_linear(out, linear, 0.1, False), linear(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [0, 3])
def test_cuda_bf16_fast_close_to_reference(rows: int, monkeypatch) -> None:
    """bf16 autocast on the CUDA core against the float32 reference: logits, and every parameter gradient finite
    and within bf16 rounding. The inputs have query rows with every key masked (rank 0 in the order, no mems):
    with the reference's -1e30 as a bf16 bias, the memory-efficient kernel's backward gave NaN there. The
    content stream's distance table in one product (CUDA's default) and in blocks of 3 rows."""
    import xlnet.fast_attention as fa

    monkeypatch.setitem(fa.ROW_BLOCK, "cuda", rows)
    config = tiny_config(mem_len=12)
    ref, fast = pair(XLNetLMHeadModel, config)
    ref, fast = ref.cuda(), fast.cuda()
    x = {k: v.cuda() for k, v in inputs().items()}
    labels = x["input_ids"][:, :P]
    r = ref(**x, labels=labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f = fast(**x, labels=labels)
    rel = (f.logits.float() - r.logits).norm() / r.logits.norm()
    assert rel < 2e-2, rel
    r.loss.backward(), f.loss.backward()
    grads = dict(fast.named_parameters())
    pairs = [(grads[name].grad, p.grad) for name, p in ref.named_parameters() if p.grad is not None]
    assert all(g_f.isfinite().all() for g_f, _ in pairs)
    g_f, g_r = (torch.cat([g.flatten() for g in gs]) for gs in zip(*pairs))
    assert (g_f - g_r).norm() < 5e-2 * g_r.norm()
    f32 = fast(**x, labels=labels)
    assert_close(f32.logits, r.logits, "fp32 logits", tol=1e-4)  # TF32 may be on


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [0, 3])
@pytest.mark.parametrize("head", ["lm", "classification"])
@pytest.mark.parametrize("variant", ["bi", "uni", "bi_data"])
def test_cuda_fast_training_matches_reference_fp32(variant: str, head: str, rows: int, monkeypatch) -> None:
    """The CUDA core (SDPA with the masked position bias, its gradient through the bias) in float32 against the
    reference on the same GPU: logits, mems and every parameter gradient, with memory, padding, segments; the
    PLM head (final layer without content stream) and a classification head (final layer at <cls> only); the
    content stream's distance table in one product (CUDA's default) and in blocks of 3 rows."""
    import xlnet.fast_attention as fa

    monkeypatch.setitem(fa.ROW_BLOCK, "cuda", rows)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = tiny_config(mem_len=12, **CONFIGS[variant])
    lm = head == "lm"
    ref, fast = pair(XLNetLMHeadModel if lm else XLNetForSequenceClassification, config)
    ref, fast = ref.cuda().train(), fast.cuda().train()
    torch.manual_seed(3)
    mems = [torch.randn(B, 4, config.d_model, device="cuda") for _ in range(config.n_layer)]
    x = {k: v.cuda() for k, v in inputs(two_stream=lm).items()}
    labels = x["input_ids"][:, :P] if lm else torch.tensor([0, 2, 1, 1], device="cuda")
    r, f = ref(**x, labels=labels, mems=mems), fast(**x, labels=labels, mems=mems)
    assert_close(f.logits, r.logits, "logits", tol=1e-4)
    for mf, mr in zip(f.mems, r.mems):
        assert_close(mf, mr, "mems", tol=1e-4)
    r.loss.backward(), f.loss.backward()
    grads = dict(fast.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert_close(grads[name].grad, p.grad, f"grad {name}", tol=1e-4)


@pytest.mark.parametrize("kind", ["dropatt", "dropout"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_dropout_matches_reference_in_distribution(device: str, kind: str) -> None:
    """dropatt, and dropout (embeddings, residual branches, FFN hidden with its scale in layer_2's alpha), on the
    fast path (CPU: 16-bit lanes; CUDA: the native fused kernels): outputs vary from call to call, eval mode is
    deterministic, and over 300 draws the fast path's noise and mean agree with the reference path's (the same
    post-LN bias on both sides, so a wrong keep rate or survivor scale shows)."""
    config = tiny_config(n_layer=1, **{kind: 0.3})
    ref, fast = pair(XLNetModel, config)
    ref, fast = ref.to(device), fast.to(device)
    x = {k: v.to(device) for k, v in inputs(two_stream=False).items()}
    with torch.no_grad():
        fast.eval()
        clean = fast(**x).last_hidden_state
        assert torch.equal(fast(**x).last_hidden_state, clean)
        fast.train(), ref.train()
        runs_f = torch.stack([fast(**x).last_hidden_state for _ in range(300)])
        runs_r = torch.stack([ref(**x).last_hidden_state for _ in range(300)])
    assert not torch.equal(runs_f[0], runs_f[1])
    spread = (runs_r - clean).abs().mean()
    assert abs((runs_f - clean).abs().mean() / spread - 1) < 0.05  # the same amount of noise
    assert (runs_f.mean(0) - runs_r.mean(0)).abs().mean() < 0.25 * spread


def test_relative_attention_module_fast_forward() -> None:
    """RelativeAttention.forward itself (outside Layer's fused path) on the fast path equals the reference."""
    from xlnet.model import attention_masks, relative_positions, segment_matrix
    from xlnet.fast_attention import fast_inputs

    config = tiny_config()
    ref, fast = pair(XLNetModel, config)
    x = inputs()
    bsz = x["input_ids"].shape[0]
    torch.manual_seed(2)
    h, g = torch.randn(bsz, L, config.d_model), torch.randn(bsz, P, config.d_model)
    mem = torch.randn(bsz, 4, config.d_model)
    mask_h, mask_g = attention_masks(config, L, 4, x["attention_mask"], x["perm_mask"], h.device)
    pos = relative_positions(config, L, 4 + L, bsz, h.device)
    tm = x["target_mapping"]
    r = ref.layer[0].rel_attn(h, g, pos, mem, seg=segment_matrix(x["token_type_ids"], 4), mask_h=mask_h,
                              mask_g=mask_g, target_mapping=tm)
    f = fast.layer[0].rel_attn(h, g, pos, mem, fast=fast_inputs(L, 4, pos.shape[1], mask_h, mask_g,
                                                                x["token_type_ids"], tm, h.dtype, h.device))
    assert_close(f[0], r[0], "h")
    assert_close(f[1], r[1], "g")


@pytest.mark.parametrize("two_stream", [True, False])
def test_manual_core_under_cpu_bf16_autocast(two_stream: bool, monkeypatch) -> None:
    """`--precision bf16` on CPU: the manual core's in-place product takes bf16 q/k (the r_w_bias and segment
    terms come out float32 under autocast) and gives the reference's loss to bf16 accuracy (the distance table in
    blocks of 3 rows)."""
    import xlnet.fast_attention as fa

    monkeypatch.setitem(fa.ROW_BLOCK, "cpu", 3)
    config = tiny_config(mem_len=12)
    ref, fast = pair(XLNetLMHeadModel, config)
    x = inputs(two_stream=two_stream)
    labels = (x["input_ids"][:, :P] if two_stream else x["input_ids"]).clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, f = ref(**x, labels=labels), fast(**x, labels=labels)
    f.loss.backward()
    assert abs(f.loss.item() - r.loss.item()) < 2e-2 * abs(r.loss.item())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fast.parameters())


def test_sdpa_core_bias_in_autocast_dtype_and_head_dim(monkeypatch) -> None:
    """Under autocast the SDPA core builds its bias in bf16 (a float32 one doubles the largest tensor of the step
    and adds a cast) and hands the kernel q/k at the model's head dim (the segment term is in the bias)."""
    import xlnet.fast_attention as fa

    biases, heads = [], []

    def spied(fn, out):
        def call(*args, **kw):
            result = fn(*args, **kw)
            out.append(result.dtype if out is biases else (args[0].shape[-1], args[1].shape[-1]))
            return result
        return call

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: "sdpa")
    monkeypatch.setitem(fa.ROW_BLOCK, "cpu", 3)  # the content stream's table in blocks of 3 rows
    monkeypatch.setattr(fa, "masked_bias", spied(fa.masked_bias, biases))  # query stream
    monkeypatch.setattr(fa._ShiftMaskQK, "apply", spied(fa._ShiftMaskQK.apply, biases))  # content stream
    monkeypatch.setattr(fa.F, "scaled_dot_product_attention", spied(F.scaled_dot_product_attention, heads))
    config = tiny_config(mem_len=12, attn_impl="fast")
    x = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        XLNetLMHeadModel(config)(**x, labels=x["input_ids"][:, :P]).loss.backward()
    assert biases == [torch.bfloat16] * (2 * config.n_layer - 1)  # both streams; the final layer's query stream
    assert set(heads) == {(config.d_head, config.d_head)}


class _LogSumExpKernel(torch.autograd.Function):
    """Attention as CUDA's flash-style kernels compute it: the forward keeps each row's float32 log-sum-exp, the
    backward recomputes the probabilities from it (no dropout)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        s = q @ k.transpose(-1, -2) * scale + bias
        top = s.amax(-1, keepdim=True)
        e = (s - top).exp()
        total = e.sum(-1, keepdim=True)
        out = e / total @ v
        ctx.save_for_backward(q, k, v, bias, out, top + total.log())
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        p = (q @ k.transpose(-1, -2) * ctx.scale + bias - lse).exp()
        ds = p * (d_out @ v.transpose(-1, -2) - (d_out * out).sum(-1, keepdim=True))
        return ds @ k * ctx.scale, ds.transpose(-1, -2) @ q * ctx.scale, p.transpose(-1, -2) @ d_out, ds, None


def test_sdpa_core_rows_that_see_no_key_do_not_depend_on_the_kernel(monkeypatch) -> None:
    """Without memory a query-stream row of rank 0 sees no key. A kernel that keeps a float32 log-sum-exp loses
    log K next to -1e30 and recomputes that row's probabilities as 1 instead of 1/K: on an H200 (torch 2.11)
    the SDPA core's gradients differed from the reference's by 7e-3 to 1e-1 (relative norm) on these inputs,
    and `_LogSumExpKernel` reproduced those numbers on CPU to three digits. Such rows now reach the kernel as
    zeros: every row it gets sees a key, the kernel gives torch's own numbers, the logits are the reference's,
    and the gradients differ from the reference's by those rows' score gradients alone (the reference's come
    from -1e30's rounding: the softmax it differentiates is uniform)."""
    import xlnet.fast_attention as fa

    def emulated(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
        assert dropout_p == 0.0 and (attn_mask.amax(-1) > fa.mask_value(attn_mask.dtype) / 2).all()
        return _LogSumExpKernel.apply(q, k, v, attn_mask, scale)

    monkeypatch.setattr(fa, "pick_core", lambda device, compiled=False: "sdpa")
    config = tiny_config(mem_len=12, d_model=128, n_head=2, d_head=64, d_inner=256)
    ref, fast = pair(XLNetLMHeadModel, config)
    x = inputs()
    labels = x["input_ids"][:, :P]
    ref(**x, labels=labels).loss.backward()
    runs = []
    for kernel in (F.scaled_dot_product_attention, emulated):
        monkeypatch.setattr(fa.F, "scaled_dot_product_attention", kernel)
        fast.zero_grad()
        out = fast(**x, labels=labels)
        assert_close(out.logits, ref(**x, labels=labels).logits, "logits")
        out.loss.backward()
        runs.append(flat_grads(fast))
    assert_close(runs[1], runs[0], "gradients, log-sum-exp kernel against torch's SDPA", tol=1e-6)
    expected = flat_grads(ref)
    assert 0 < (runs[0] - expected).norm() < 1e-3 * expected.norm()


def test_forced_core(monkeypatch) -> None:
    """$XLNET_ATTN_CORE (benchmarks' A/B knob) overrides the device's choice; a typo is a one-line error."""
    import xlnet.fast_attention as fa

    monkeypatch.setattr(fa, "FORCED_CORE", "math")
    assert fa.pick_core(torch.device("cuda")) == "math" and fa.pick_core(torch.device("cpu")) == "math"
    monkeypatch.setattr(fa, "FORCED_CORE", "flash")
    with pytest.raises(XLNetError, match="XLNET_ATTN_CORE must be one of manual, math, sdpa, triton"):
        fa.pick_core(torch.device("cpu"))
    monkeypatch.setattr(fa, "FORCED_CORE", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(XLNetError, match="needs the triton package and a CUDA device"):
        fa.pick_core(torch.device("cpu"))
    monkeypatch.setattr(fa, "FORCED_CORE", "")
    assert fa.pick_core(torch.device("cuda")) == "sdpa" and fa.pick_core(torch.device("cpu")) == "manual"
    assert fa.pick_core(torch.device("cpu"), compiled=True) == "math"  # traceable ops for compiled blocks
