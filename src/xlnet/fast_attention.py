"""The fast path of two-stream relative attention (`XLNetConfig.attn_impl = "fast"`).

Same function as `RelativeAttention.attend` in model.py (the reference, kept for reading and parity), computed
with one score-sized tensor per stream and no bool selects over it:

- Content and segment terms in one matrix product. The segment term (q_i + b)·s_{same/diff} equals
  e_i^diff + (e_i^same - e_i^diff)·[seg_i = seg_j], and [seg_i = seg_j] = onehot(seg_i)·onehot(seg_j). The row
  constant e_i^diff cancels in the softmax, so q gets C extra dims (e^same - e^diff)·onehot(seg_i) and k gets
  onehot(seg_j): (q + u, extra)·(k, onehot) is content + segment at once (C = number of segment ids in the batch).
- The position term is one product against the distance table, read by distance i - j through a view
  (`rel_shift`, content stream: per block of rows, each against only the K + rows table rows its distances lie
  in, `row_block`) or a per-row window (`_RowWindow`, query stream), masked in the same pass that
  makes it contiguous (the mask is an additive -1e30 term, the reference's constant and its identity gradient), and the
  content/segment product is accumulated into it in place (`baddbmm_`). One [B, n, L, K] tensor, then softmax,
  then dropout, then the product with v.
- Only what is read is computed: the query stream only for the P target slots (the rows of the mask, the
  segment ids and the distance table gathered at each slot's position; a zero row of target_mapping gives
  attention vector 0, as the reference's scatter/gather does), and in the final layer no content stream under
  a query stream (nothing reads it: mems cache layer inputs) and only the <cls> row for the heads that
  summarise by it. HF and the reference compute all of them.
- Dropout from 16-bit random lanes (`keep_mask`): on CPU `bernoulli_` dominated HF's step (23%); one 64-bit
  draw gives four 16-bit uniforms, so the keep mask costs ~1/10 of `F.dropout`. The drop probability is p
  rounded to a multiple of 1/65536 and survivors are scaled by the exact 1/(1 - p') (unbiased). The mask is a
  float 0/1 tensor applied by one product, its scale fused into a neighbour (the residual add, layer_2's
  weight, the p·v output). CUDA and torch.compile use the native dropout (fused there).

Three cores, picked once per forward (`pick_core`): "manual" (the steps above; CPU eager), "sdpa" (the position
and segment terms as one masked bias handed to `scaled_dot_product_attention`, q/k at head dim 64, where the
kernel's tiles are 30% faster than at 64 + C: on CUDA the memory-efficient kernel takes a float bias with
gradient and fused dropout; on CPU, SDPA's flash kernel takes no dropout and no bias gradient, and lost to the
manual core even for inference) and "math" (the same bias from plain traceable ops, then softmax and the
products: what torch.compile traces on CPU, inductor fusing the bias into the softmax). The non-manual cores
compare segment ids instead of one-hots, so nothing in the forward waits on the device (torch.compile takes
the whole model as one graph). Two more, for bidirectional tables and opt-in: "triton" (triton_attention.py)
fuses the position term, segments, mask, softmax and dropout in one kernel (1.2-1.4x slower than SDPA on an
H200); "flex" (flex_attention.py) folds segments and mask into the distance table and hands flex_attention a
score_mod that reads it (CUDA only; not yet timed). $XLNET_ATTN_CORE forces a core (benchmarks: A/B on one GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlnet.errors import XLNetError

NEG_INF = 1e30  # the reference's constant (model.NEG_INF)
CORES = ("manual", "math", "sdpa", "triton", "flex")
WINDOW_CORES = ("triton", "flex")  # read the bidirectional table's windows unclamped, as one block of rows
CUDA_CORES = ("sdpa", "triton", "flex")  # flash-style kernels: rows that see no key go to them as zeros
FORCED_CORE = os.environ.get("XLNET_ATTN_CORE", "")  # read once: torch.compile traces a constant


# ---------------------------------------------------------------------------------------------------------------
# dropout


def drop_lanes(p: float) -> tuple[int, float]:
    """Dropout p as 16-bit lanes: (drop, scale), a draw u in [0, 65536) is dropped iff u < drop = round(p·65536),
    and survivors are scaled by the unbiased 1 / (1 - drop / 65536)."""
    drop = min(max(round(p * 65536), 0), 65535)
    return drop, 65536.0 / (65536 - drop)


def keep_mask(like: Tensor, p: float) -> tuple[Tensor, float]:
    """A 0/1 keep mask in like's dtype with P(drop) = round(p * 65536) / 65536, and the unbiased survivor scale
    1 / (1 - p'). One 64-bit draw gives four 16-bit lanes, compared straight into a float tensor. Float, not
    bool: a product with it is one vectorized pass (torch.where on a bool mask takes about twice as long on CPU,
    forward and backward), and products fuse with what follows (`residual_dropout`, `fast_ffn`)."""
    drop, scale = drop_lanes(p)
    n = like.numel()
    # from int64's minimum with no upper bound: raw 64-bit draws (randint's bounded range costs a modulo each)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-2**63, None)
    lanes = bits.view(torch.int16)[:n].view(like.shape)
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.ge(lanes, drop - 32768, out=keep)  # compared straight into floats: one pass (convert + ge_ took 2.3x)
    return keep, scale


def draws_lanes(x: Tensor, p: float, training: bool) -> bool:
    """Whether dropout of x takes the 16-bit-lane path (training, 0 < p < 1, CPU eager); otherwise F.dropout:
    CUDA's is fused, and under torch.compile inductor draws the mask inside the fused kernel."""
    return training and 0 < p < 1 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not draws_lanes(x, p, training):
        return F.dropout(x, p, True) if training and p > 0 else x
    keep, scale = keep_mask(x, p)
    if x.dtype in (torch.float32, torch.float64):  # the scale in the mask: one pass forward and backward
        return x * keep.mul_(scale)
    return (x * keep).mul_(scale)  # bf16 would round the scale by 0.2%


def residual_dropout(x: Tensor, out: Tensor, p: float, training: bool) -> Tensor:
    """x + dropout(out) in one pass (addcmul with the mask and the survivor scale)."""
    if not draws_lanes(out, p, training):
        return x + fast_dropout(out, p, training)
    keep, scale = keep_mask(out, p)
    return torch.addcmul(x, out, keep, value=scale)


def dropout_linear(y: Tensor, linear: nn.Linear, p: float, training: bool) -> Tensor:
    """linear(dropout(y)) with the survivor scale on the (4× smaller) weight: one pass over y for the mask,
    forward and backward (as the product's alpha it would cost a pass over y's gradient)."""
    if not draws_lanes(y, p, training):
        return linear(fast_dropout(y, p, training))
    keep, scale = keep_mask(y, p)
    return F.linear(y * keep, linear.weight * scale, linear.bias)


def fast_ffn(ff: nn.Module, x: Tensor) -> Tensor:
    """FeedForward.forward with its dropouts fused: the hidden one into layer_2's product, the output one into
    the residual add."""
    p = ff.dropout.p
    y = dropout_linear(ff.activation(ff.layer_1(x)), ff.layer_2, p, ff.training)
    return ff.layer_norm(residual_dropout(x, y, p, ff.training))


class FastDropout(nn.Dropout):
    """nn.Dropout (same repr and state) drawing its mask from 16-bit random lanes on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------------------------------------------
# masks and per-forward inputs


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """bool mask (True = masked) -> the reference's -1e30 as a term added to the scores: one vectorized add that
    fuses into the pass laying out the position term (a bool select over a score-sized tensor takes about twice
    as long on CPU), and its gradient is the identity, as the reference's `score - 1e30 * mask` (where a whole
    row is masked the softmax is uniform and the gradient still reaches the scores). |score| < 1e22, so a
    masked entry is exactly -1e30 in float32, as in the reference; in bfloat16 -1e20 (`mask_value`)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, mask_value(dtype))


def mask_value(dtype: torch.dtype) -> float:
    """What a masked score becomes. In bfloat16 -1e20, not -1e30: CUDA's memory-efficient SDPA kernel returned NaN
    gradients for rows whose every key was masked with bf16(-1e30) (the query stream's rank-0 rows; H200, torch
    2.11; such rows no longer reach it, FastInputs.dead_g). A whole masked row is still uniform on the other
    cores: bf16's spacing at 1e20 is 2^59, so -1e20 + score rounds to -1e20."""
    return -NEG_INF if dtype in (torch.float32, torch.float64) else -1e20


class _ShiftMaskQK(torch.autograd.Function):
    """The whole pre-softmax score in one fresh tensor, for the bidirectional table (where the shifted view does
    not overlap itself): rel_shift(table) plus the additive mask, plus scale · qc·kcᵀ accumulated in place
    (qc = kc = None: the bias handed to SDPA, the masked position term plus, given seg = (coef [.., Lq],
    same [B, 1, Lq, K]), the segment term coef_i·[seg_i = seg_j] added in the same pass).

    table [.., c, W] holds, for each (b, n) pair and block m of c query rows, that block's distance rows
    (`distance_scores`; W = K + c) at strides (sb, sn, sm): score entry (m·c + r, j) reads block column
    c - r + j (flat offset c + r·(W - 1) + j within the block, exactly rel_shift of a c-row table). Backward:
    the mask is a constant term, the table's gradient is written through the same strided view into a fresh
    buffer whose c - 1 uncovered entries per row are zeroed, and the q/k gradients are two batched products.
    (Autograd's own view backward zero-fills the whole table, copies, and re-lays it out; an in-place baddbmm_ on
    a view adds two more copies.)"""

    @staticmethod
    def forward(ctx, table: Tensor, mask: Tensor | None, qc: Tensor | None, kc: Tensor | None, scale: float,
                geom: tuple[int, ...], coef: Tensor | None = None, same: Tensor | None = None) -> Tensor:
        bsz, n_head, n_blk, sb, sn, sm, klen = geom
        rows, width = table.shape[-2:]
        qlen = n_blk * rows
        ctx.geom, ctx.scale, ctx.table_shape = geom, scale, table.shape
        ctx.with_qk, ctx.with_seg = qc is not None, coef is not None  # the manual core's, or SDPA's bias
        view = table.as_strided((bsz, n_head, n_blk, rows, klen), (sb, sn, sm, width - 1, 1),
                                table.storage_offset() + rows)
        score = torch.empty((bsz, n_head, qlen, klen), dtype=table.dtype, device=table.device)
        blocks = score.view(bsz, n_head, n_blk, rows, klen)
        if ctx.with_seg:  # the segment term in the pass over the strided view, then the mask in place
            torch.addcmul(view, coef.unflatten(-1, (n_blk, rows))[..., None], same.unflatten(2, (n_blk, rows)),
                          out=blocks)
            if mask is not None:
                blocks.add_(mask.unflatten(2, (n_blk, rows)))
        else:
            if mask is not None:
                torch.add(view, mask.unflatten(2, (n_blk, rows)), out=blocks)  # one pass over the strided view
            else:
                blocks.copy_(view)
        if ctx.with_qk:
            score.view(-1, qlen, klen).baddbmm_(qc, kc.transpose(1, 2), alpha=scale)
            ctx.save_for_backward(qc, kc)
        elif ctx.with_seg:
            ctx.save_for_backward(same)
        return score

    @staticmethod
    def backward(ctx, grad: Tensor):
        bsz, n_head, n_blk, sb, sn, sm, klen = ctx.geom
        rows, width = ctx.table_shape[-2:]
        saved = ctx.saved_tensors  # read once (activation checkpointing allows one unpack)
        qc, kc = saved if ctx.with_qk else (None, None)
        g_table = g_q = g_k = g_coef = None
        if ctx.with_seg and ctx.needs_input_grad[6]:
            g_coef = (grad * saved[0]).sum(-1)
        if ctx.needs_input_grad[0]:
            g_table = grad.new_empty(ctx.table_shape)
            g_table.as_strided((bsz, n_head, n_blk, rows, klen), (sb, sn, sm, width - 1, 1), rows).copy_(
                grad.unflatten(2, (n_blk, rows)))
            blocks = g_table.view(-1, rows * width)
            blocks[:, :rows].zero_()  # before row 0's first key
            gap = width - 1 - klen  # = rows - 1 entries after each row's last key
            if gap > 0:
                blocks.as_strided((blocks.shape[0], rows, gap), (rows * width, width - 1, 1), rows + klen).zero_()
        grad3 = grad.reshape(-1, n_blk * rows, klen)
        if ctx.needs_input_grad[2]:
            g_q = torch.bmm(grad3, kc).mul_(ctx.scale)
        if ctx.needs_input_grad[3]:
            g_k = torch.bmm(grad3.transpose(1, 2), qc).mul_(ctx.scale)
        return g_table, None, g_q, g_k, None, None, g_coef, None


class _RowWindow(torch.autograd.Function):
    """out[.., p, j] = table[.., p, cols[p, 0] + j]: each row of the bidirectional distance table [.., P, R] read
    as a window of K consecutive columns (cols [B, 1, P, K] from distance_columns; a window never runs off that
    table, so each entry is read at most once). Autograd's backward of the gather is a scatter-add (atomics on
    CUDA, a split reduction under inductor: 19% of the compiled PLM step's GPU time on an H200); the window's
    backward is the reverse window, a gather of the gradient, zero outside it."""

    @staticmethod
    def forward(ctx, table: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(cols[..., :1])
        ctx.rlen = table.shape[-1]
        return table.gather(-1, cols.expand(-1, table.shape[1], -1, -1))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (first,) = ctx.saved_tensors  # [B, 1, P, 1]
        klen = grad.shape[-1]
        rel = torch.arange(ctx.rlen, device=grad.device) - first  # key j that table column r serves, per row
        picked = grad.gather(-1, rel.clamp(0, klen - 1).expand(*grad.shape[:-1], -1))
        return torch.where((rel >= 0) & (rel < klen), picked, 0), None


class _Windows(torch.autograd.Function):
    """x [.., R] -> [.., M, W]: copies of the W columns from each start, stacked before x's last two dims (laid
    out for the product). Backward adds each window's gradient into one zeroed buffer (autograd's slices would
    zero-fill and add up a whole x per window)."""

    @staticmethod
    def forward(ctx, x: Tensor, starts: range, width: int) -> Tensor:
        ctx.starts, ctx.width, ctx.shape = starts, width, x.shape
        return torch.stack([x[..., s:s + width] for s in starts], dim=-3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.new_zeros(ctx.shape)
        for m, s in enumerate(ctx.starts):
            g[..., s:s + ctx.width] += grad[..., m, :, :]
        return g, None, None


def masked_bias(x: Tensor, mask: Tensor | None) -> Tensor:
    return x.contiguous() if mask is None else x + mask


@dataclass
class FastInputs:
    """What every layer's fast attention shares within one forward (built once by `fast_inputs`)."""

    klen: int
    core: str  # one of CORES (pick_core)
    rows: int  # query rows per block of the content stream's distance table (row_block; L: one block)
    windows: bool = True  # bidirectional table (R = K + L): every row's K distances lie inside it, unclamped
    mask_h: Tensor | None = None  # [B|1, 1, L, K] additive: mask_value where masked, else 0 (the scores' dtype)
    mask_g: Tensor | None = None  # [B|1, 1, P, K] the same for the query stream
    # segments: one-hots [B, 1, Lq|K, C] (float) for the manual core, which folds them into q·k; ids [B, 1, Lq, 1]
    # and [B, 1, 1, K] for the others, which add the segment term to the bias
    seg_q: Tensor | None = None  # each query position
    seg_qg: Tensor | None = None  # the target slots' positions
    seg_k: Tensor | None = None  # each key (memory = segment 0)
    shift_g: Tensor | None = None  # [B, 1, P, K] column of the distance table holding distance pos_p - j
    valid: Tensor | None = None  # [B, P, 1, 1] 1 for a real slot, 0 for a zero (padded) row of target_mapping
    # [B, 1, P, 1] True for a target slot that sees no key (the CUDA cores, sdpa and triton; a content row always
    # sees itself): CUDA's flash-style kernels save each row's float32 log-sum-exp, which loses log K next to
    # -1e30, so their backward recomputed such a row's probabilities as 1 instead of 1/K (K times the gradients,
    # H200, torch 2.11). The row goes to the kernel as zeros (q, segment coefficient, mask): the same uniform
    # softmax, computed exactly; its scores then get no gradient (the reference's comes from -1e30's rounding,
    # README), the same on both CUDA cores
    dead_g: Tensor | None = None


def distance_columns(pos: Tensor, qlen: int, klen: int, rlen: int) -> Tensor:
    """[B, 1, P, K]: the column of the distance table that query position pos [B, P] reads for each key. Column r
    holds distance klen - r. uni: the table stops at distance 0, and the future keys beyond it (masked) are
    clamped to the last column (the reference's rel_shift reads the next query's row there: the same forward,
    and the same gradient unless a row sees no key at all)."""
    cols = torch.arange(klen, device=pos.device)
    return ((qlen - pos)[:, None, :, None] + cols).clamp(max=rlen - 1)


def fast_inputs(qlen: int, mlen: int, rlen: int, mask_h: Tensor | None, mask_g: Tensor | None,
                token_type_ids: Tensor | None, target_mapping: Tensor | None, dtype: torch.dtype,
                device: torch.device, compiled: bool = False) -> FastInputs:
    """Masks (from model.attention_masks, bool [B|1, L, K]) and segment/target gathers for the fast path; rlen
    is the length of the distance table (klen + qlen for bi, klen + 1 for uni); dtype that of the model's inputs;
    compiled: the layers run under torch.compile."""
    klen = mlen + qlen
    score_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    windows = rlen == klen + qlen
    core = pick_core(device, compiled)
    if core in WINDOW_CORES and not windows:
        core = "sdpa" if device.type == "cuda" else "math"
    # picked here, outside the compiled blocks, which read it as a constant (as the core)
    rows = row_block(qlen, device) if windows and core not in WINDOW_CORES else qlen
    out = FastInputs(klen=klen, core=core, rows=rows, windows=windows,
                     mask_h=None if mask_h is None else additive_mask(mask_h[:, None], score_dtype))
    pos = None
    if target_mapping is not None:
        bsz, n_pred, _ = target_mapping.shape
        pos = target_mapping.argmax(-1)  # [B, P]; a zero row gives 0, zeroed by `valid`
        out.valid = target_mapping.sum(-1).to(dtype)[:, :, None, None]
        out.shift_g = distance_columns(pos, qlen, klen, rlen)
        if mask_g is not None:
            rows = pos[:, :, None].expand(-1, -1, klen)
            mask_g = mask_g.expand(bsz, -1, -1).gather(1, rows)[:, None]
            out.mask_g = additive_mask(mask_g, score_dtype)
            out.dead_g = mask_g.all(-1, keepdim=True) if core in CUDA_CORES else None
    if token_type_ids is not None:
        keys = F.pad(token_type_ids, (mlen, 0), value=0)
        seg_g = None if pos is None else token_type_ids.gather(1, pos)
        if out.core == "manual":
            n_seg = int(token_type_ids.max().clamp(min=0)) + 1  # one host sync per forward
            out.seg_k = F.one_hot(keys, n_seg).to(dtype)[:, None]
            out.seg_q = out.seg_k[:, :, mlen:]
            if pos is not None:
                out.seg_qg = F.one_hot(seg_g, n_seg).to(dtype)[:, None]
        else:
            out.seg_k, out.seg_q = keys[:, None, None, :], token_type_ids[:, None, :, None]
            out.seg_qg = None if pos is None else seg_g[:, None, :, None]
    return out


# ---------------------------------------------------------------------------------------------------------------
# the attention core


def triton_usable(device: torch.device) -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def pick_core(device: torch.device, compiled: bool = False) -> str:
    """sdpa on CUDA (memory-efficient kernel: float bias with gradient, fused dropout); on CPU the manual core,
    where SDPA's flash kernel takes neither dropout nor a bias that needs a gradient, and was slower than the
    manual core even for inference (measured at the benchmark shape, torch 2.13); under torch.compile on CPU
    the math core, plain ops that inductor fuses from the position bias to the dropout."""
    if FORCED_CORE:
        if FORCED_CORE not in CORES:
            raise XLNetError(f"XLNET_ATTN_CORE must be one of {', '.join(CORES)}, not {FORCED_CORE!r}")
        if FORCED_CORE == "triton" and not triton_usable(device):
            raise XLNetError("XLNET_ATTN_CORE=triton needs the triton package and a CUDA device "
                             "(or TRITON_INTERPRET=1)")
        if FORCED_CORE == "flex" and device.type != "cuda":
            raise XLNetError(f"XLNET_ATTN_CORE=flex needs a CUDA device (flex_attention has no backward on "
                             f"{device.type} in torch {torch.__version__.split('+')[0]})")
        return FORCED_CORE
    if device.type == "cuda":
        return "sdpa"
    return "math" if compiled else "manual"


# target rows per block of the content stream's distance table (row_block); a device not listed takes one block:
# on CUDA blocks of 64 and 128 rows gained at most 4-6% (H200, within the run's spread; `gpu_session.sh rows`)
ROW_BLOCK = {"cpu": 32}


def row_block(qlen: int, device: torch.device) -> int:
    """Query rows per block of the content stream's distance table: the largest divisor of qlen between half the
    device's target and the target (qlen, one block, when there is none or no target). The rows i of a block of
    c read distances i - j from a window of K + c of the K + L table rows, so blocks cut the position term's
    product from L·(K + L) to L·(K + c) dot products (44% fewer at L = K = 256, c = 32: the product alone, forward
    and backward, took 4.0 ms per layer instead of 8.1 on 2 CPU cores)."""
    target = ROW_BLOCK.get(device.type, 0)
    for rows in range(min(target, qlen), max(target // 2, 1) - 1, -1):
        if qlen % rows == 0:
            return rows
    return qlen


def distance_scores(q_r: Tensor, k_r: Tensor, rows: int) -> tuple[Tensor, tuple[int, int, int]]:
    """q_r [B, Lq, n, dh] (q + v, pre-scaled) against distance rows k_r [B|1, R, n, dh], in blocks of `rows` query
    rows (Lq = one block: the whole table), block m against the K + rows table rows its distances lie in:
    [n, M, B·rows, W] when k_r is shared by the batch (one product per head and block, no per-sample copies of
    the table), else [B, n, M, rows, W] (bi_data); and the strides (sb, sn, sm) of each (b, n, m) block."""
    bsz, qlen, n_head, d_head = q_r.shape
    n_blk = qlen // rows
    width = k_r.shape[1] - qlen + rows
    block = rows * width
    q_r = q_r.view(bsz, n_blk, rows, n_head, d_head)
    shared = k_r.shape[0] == 1
    # [n, dh, R] or [B, n, dh, R] (squeeze, not [0]: a select's backward zero-fills and copies)
    k_r = k_r.squeeze(0).permute(1, 2, 0) if shared else k_r.permute(0, 2, 3, 1)
    # block m (query rows from m·rows) reads table rows from qlen - (m + 1)·rows: descending, so copied (small)
    k_r = k_r[..., None, :, :] if n_blk == 1 else _Windows.apply(k_r, range(qlen - rows, -1, -rows), width)
    if shared:  # k_r [n, M, dh, W]
        q_r = q_r.permute(3, 1, 0, 2, 4).reshape(n_head, n_blk, -1, d_head)
        return torch.matmul(q_r, k_r), (block, n_blk * bsz * block, bsz * block)
    table = torch.matmul(q_r.permute(0, 3, 1, 2, 4), k_r)  # [B, n, M, rows, dh] x [B, n, M, dh, W]
    return table, (n_head * n_blk * block, n_blk * block, block)


def position_bias(table: Tensor, geom: tuple[int, ...], qlen: int, shift: Tensor | None, seg: tuple[Tensor, ...],
                  mask: Tensor | None, scale: float, windows: bool) -> Tensor:
    """The masked pre-softmax bias [B, n, Lq, K]: the position term read by distance i - j (content stream:
    rel_shift of each block of the table, geom as in `_ShiftMaskQK`; query stream: the gather columns `shift`)
    plus, given seg = (coef [B, n, Lq], same [B, 1, Lq, K]), the segment term coef_i·[seg_i = seg_j]."""
    from xlnet.model import rel_shift  # the reference's view (model.py imports this module)

    bsz, n_head, n_blk, _, _, _, klen = geom
    rows, width = qlen // n_blk, table.shape[-1]
    if shift is None and windows and not torch.compiler.is_compiling():  # one strided pass
        return _ShiftMaskQK.apply(table.view(-1, rows, width), mask, None, None, scale, geom, *seg)
    if table.dim() == 4:  # [n, M, B·rows, W] -> [B, n, M, rows, W]
        table = table.view(n_head, n_blk, bsz, rows, width).permute(2, 0, 1, 3, 4)
    if shift is None:
        bd = rel_shift(table, klen).reshape(bsz, n_head, qlen, klen)
    elif windows:
        bd = _RowWindow.apply(table[:, :, 0], shift)
    else:  # uni (R = K + 1): the columns past distance 0 are clamped and read more than once
        bd = table[:, :, 0].gather(-1, shift.expand(-1, n_head, -1, -1))
    if seg:
        bd = torch.addcmul(bd, seg[0][..., None], seg[1])
    return masked_bias(bd, mask)


def segment_operands(qc: Tensor, k: Tensor, coef: Tensor | None, seg_q: Tensor | None, seg_k: Tensor | None,
                     core: str, scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Where each core takes the segment term: (qc, kc, seg). "manual": one-hot columns appended to q and k, so
    q·k carries it (FastInputs); "sdpa": seg = (coef·scale [B, n, Lq], same = [seg_i = seg_j] [B, 1, Lq, K]) for
    the bias; "triton": seg = (coef·scale,), the kernel compares the ids itself. No segments: seg = ()."""
    if coef is None:
        return qc, k, ()
    if core == "manual":
        n_head = k.shape[1]
        return (torch.cat([qc, coef.transpose(1, 2)[..., None] * seg_q], dim=-1),
                torch.cat([k, seg_k.expand(-1, n_head, -1, -1)], dim=-1), ())
    # coef is float32 under autocast (r_s_bias is added in float32): cast, or the bias becomes float32
    coef_s = (coef.transpose(1, 2) * scale).to(dtype)
    return qc, k, (coef_s,) if core == "triton" else (coef_s, (seg_q == seg_k).to(dtype))


def fast_attend(attn: nn.Module, q: Tensor, coef: Tensor | None, k: Tensor, v: Tensor, k_r: Tensor,
                seg_q: Tensor | None, seg_k: Tensor | None, mask: Tensor | None, shift: Tensor | None, klen: int,
                core: str, windows: bool, rows: int | None = None, dead: Tensor | None = None) -> Tensor:
    """q [B, Lq, n, dh] (Lq = L for the content stream, P target slots for the query stream); coef [B, Lq, n]
    the segment coefficient (q + b)·(s_same - s_diff) (None without segments); k, v [B, n, K, dh]; k_r
    [B|1, R, n, dh]; seg_q, seg_k, mask as in FastInputs; shift None (content: row i reads
    distance i - j through rel_shift, with the table in blocks of `rows` rows; None: one block) or [B, 1, Lq, K]
    gather columns; dead FastInputs.dead_g. -> [B, Lq, n, dh]."""
    bsz, qlen, n_head, d_head = q.shape
    scale = attn.scale
    q_r = (q + attn.r_r_bias) * scale
    qc = (q + attn.r_w_bias).transpose(1, 2)  # [B, n, Lq, dh]
    if dead is not None:  # zero scores, so an exact uniform softmax with no gradient (FastInputs.dead_g)
        q_r, qc = q_r.masked_fill(dead.transpose(1, 2), 0), qc.masked_fill(dead, 0)
        coef = None if coef is None else coef.masked_fill(dead[:, 0], 0)
        mask = mask.masked_fill(dead, 0)
    qc, kc, seg = segment_operands(qc, k, coef, seg_q, seg_k, core, scale, q.dtype)
    p = attn.dropatt.p if attn.training else 0.0
    rows = qlen if rows is None else rows
    table, strides = distance_scores(q_r, k_r, rows)
    geom = (bsz, n_head, qlen // rows, *strides, klen)
    blocks = table.view(-1, rows, table.shape[-1])  # each (b, n, block)'s distance rows, in order
    qc, kc = qc.to(table.dtype), kc.to(table.dtype)  # under autocast the biases made them float32
    if core in WINDOW_CORES:  # (only given the bidirectional table: fast_inputs)
        # c0 [B|1, Lq]: the table column of key 0 for each row (key j at c0 + j)
        c0 = (qlen - torch.arange(qlen, device=q.device))[None] if shift is None else shift[:, 0, :, 0]
    if core == "flex":
        from xlnet.flex_attention import flex_attend

        return flex_attend(qc, kc, v, table, c0, seg, mask, p, scale).transpose(1, 2)
    if core == "triton":
        from xlnet.triton_attention import triton_attention

        ids = (seg_q[:, 0, :, 0], seg_k[:, 0, 0, :]) if seg else (None, None)
        out = triton_attention(qc, kc, v.to(table.dtype), blocks, strides[:2], c0, seg[0] if seg else None, *ids,
                               mask, p, scale)  # (one block: rows = qlen)
        return out.transpose(1, 2)
    if core == "manual" and shift is None and windows:
        # the position term read by distance i - j, masked, plus the content/segment product: one fresh tensor
        score = _ShiftMaskQK.apply(blocks, mask, flat3(qc), flat3(kc), scale, geom)
    else:
        bias = position_bias(table, geom, qlen, shift, seg, mask, scale, windows)
        if core == "sdpa":
            out = F.scaled_dot_product_attention(qc, kc, v, attn_mask=bias.to(q.dtype), dropout_p=p, scale=scale)
            return out.transpose(1, 2)
        score = torch.baddbmm(bias.reshape(-1, qlen, klen), flat3(qc), flat3(kc).transpose(1, 2), alpha=scale)
    return probs_times_v(score.view(bsz, n_head, qlen, klen), v, p).transpose(1, 2)


def flat3(x: Tensor) -> Tensor:
    """[B, n, L, d] -> [B·n, L, d] for the batched products."""
    return x.reshape(-1, *x.shape[-2:])


def probs_times_v(score: Tensor, v: Tensor, p: float) -> Tensor:
    """softmax(score) with attention dropout p, times v: [B, n, Lq, K] x [B, n, K, dh] -> [B, n, Lq, dh]."""
    prob = torch.softmax(score, dim=-1)
    if draws_lanes(prob, p, True):  # p is 0 outside training
        keep, drop_scale = keep_mask(prob, p)  # the survivor scale on the [.., dh] output, not the probabilities
        return torch.matmul(prob * keep, v).mul_(drop_scale)
    return torch.matmul(fast_dropout(prob, p, True), v)


def fast_forward(attn: nn.Module, h: Tensor, g: Tensor | None, pos_emb: Tensor, fast: FastInputs,
                 mem: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """RelativeAttention.forward on the fast path (same parameters, same results as the reference)."""
    return _split(attend_flat(attn, h, g, pos_emb, fast, mem), h.shape[0], h.shape[1], g)


def fast_layer(layer: nn.Module, h: Tensor, g: Tensor | None, pos_emb: Tensor, fast: FastInputs,
               mem: Tensor | None, h_keep: int | None = None, **_: object) -> tuple[Tensor | None, Tensor | None]:
    """Layer.forward on the fast path: both streams share one [B·L + B·P, d] tensor from the query projection to
    the end of the FFN (one call of each position-wise op instead of two). h_keep: the content stream's output
    only at the last h_keep positions (None: all; 0: none, h comes back None); every position is still a key."""
    rows = h.shape[1] if h_keep is None else h_keep
    return _split(fast_ffn(layer.ff, attend_flat(layer.rel_attn, h, g, pos_emb, fast, mem, h_keep)), h.shape[0],
                  rows, g)


def _split(x: Tensor, bsz: int, rows: int, g: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    n_h = bsz * rows
    if g is None:
        return x.view(bsz, rows, -1), None
    if not rows:
        return None, x.view(g.shape)
    h, g_out = x.split([n_h, x.shape[0] - n_h])  # split, not slices: its backward is one cat
    return h.view(bsz, rows, -1), g_out.view(g.shape)


def projections(attn: nn.Module, x: Tensor, cat: Tensor, pos_emb: Tensor, segments: bool
                ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Queries of the stacked rows x [N, d] -> q [N, n, dh] and, with segments, the segment coefficient
    (q + b)·(s_same - s_diff) [N, n] as n extra columns of the same product; keys and values of cat [B, K, d] ->
    k, v [B, n, K, dh] (one product); the distance table's keys k_r [B|1, R, n, dh]."""
    bsz, klen, d = cat.shape
    n, dh = attn.n_head, attn.d_head
    w_kv = torch.cat([attn.k, attn.v], dim=1).reshape(d, 2 * n * dh)
    kv = torch.matmul(cat, w_kv).view(bsz, klen, 2, n, dh)
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # unbind's backward is one stack
    k_r = torch.matmul(pos_emb, attn.r.reshape(d, n * dh)).view(pos_emb.shape[0], -1, n, dh)
    w_q = attn.q.reshape(d, n * dh)
    if not segments:
        return torch.matmul(x, w_q).view(-1, n, dh), None, k, v, k_r
    diff = attn.seg_embed[0] - attn.seg_embed[1]
    w_q = torch.cat([w_q, torch.einsum("hnd,nd->hn", attn.q, diff)], dim=1)
    q, coef = torch.matmul(x, w_q).split([n * dh, n], dim=1)
    return q.reshape(-1, n, dh), coef + (attn.r_s_bias * diff).sum(-1), k, v, k_r


def attend_flat(attn: nn.Module, h: Tensor, g: Tensor | None, pos_emb: Tensor, fast: FastInputs,
                mem: Tensor | None, h_keep: int | None = None) -> Tensor:
    """Post-LN attention output of both streams, stacked: [B·L (+ B·P), d]; with h_keep (fast_layer) the content
    stream's rows are only the last h_keep positions."""
    bsz, qlen, d = h.shape
    n, dh = attn.n_head, attn.d_head
    start = 0 if h_keep is None else qlen - h_keep  # first content-stream query position
    x = h[:, start:].reshape(-1, d)
    if g is not None:
        x = torch.cat([x, g.reshape(-1, d)])
    n_h = bsz * (qlen - start)
    if start == 0:
        h = (x if g is None else x.split([n_h, x.shape[0] - n_h])[0]).view(bsz, qlen, d)  # one gradient buffer
    cat = h if mem is None else torch.cat([mem, h], dim=1)
    klen = cat.shape[1]
    q, coef, k, v, k_r = projections(attn, x, cat, pos_emb, fast.seg_k is not None)
    vec = torch.empty(x.shape[0], n, dh, dtype=q.dtype, device=q.device)  # attention vectors of both streams
    if n_h:
        rows = qlen - start
        q_h = q[:n_h].view(bsz, rows, n, dh)
        coef_h = None if coef is None else coef[:n_h].view(bsz, rows, n)
        mask, seg_q, shift = fast.mask_h, fast.seg_q, None
        if start:  # the last rows only: read the distance table by gather, as the query stream does
            mask = None if mask is None else mask[:, :, start:]
            seg_q = None if seg_q is None else seg_q[:, :, start:]
            shift = distance_columns(torch.arange(start, qlen, device=x.device)[None], qlen, klen, k_r.shape[1])
            shift = shift.expand(bsz, -1, -1, -1)
        attn_h = fast_attend(attn, q_h, coef_h, k, v, k_r, seg_q, fast.seg_k, mask, shift, klen, fast.core,
                             fast.windows, None if start else fast.rows)
        vec[:n_h].view(bsz, rows, n, dh).copy_(attn_h)
    if g is not None:
        n_pred = g.shape[1]
        q_g = q[n_h:].view(bsz, n_pred, n, dh)
        coef_g = None if coef is None else coef[n_h:].view(bsz, n_pred, n)
        attn_g = fast_attend(attn, q_g, coef_g, k, v, k_r, fast.seg_qg, fast.seg_k, fast.mask_g, fast.shift_g, klen,
                             fast.core, fast.windows, dead=fast.dead_g)
        vec[n_h:].view(bsz, n_pred, n, dh).copy_(attn_g * fast.valid)
    out = torch.matmul(vec.view(-1, n * dh), attn.o.reshape(d, n * dh).t())
    return attn.layer_norm(residual_dropout(x, out, attn.dropout.p, attn.training))
