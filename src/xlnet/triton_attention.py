"""Fused two-stream relative attention in Triton (the "triton" core; opt-in: XLNET_ATTN_CORE=triton).

One kernel reads everything the pre-softmax score is made of, tile by tile, without a [B, n, Lq, K] bias:

    S[i, j] = scale·qc_i·k_j + T[i, c0_i + j] + coef_i·[seg_i = seg_j] + mask[i, j]

T [.., Lq, R] is the position term against the distance table (one matrix product outside, q_r·Rᵀ, already
scaled), c0_i the column holding key 0's distance for query row i (content stream: Lq - i; query stream: the
target's position, `distance_columns`); each row reads K consecutive columns, so for the bidirectional table
(R = K + Lq) a column is read at most once per row and its gradient is a plain copy. Softmax is online
(flash-attention style), attention dropout is drawn in the tile from a counter-based generator (philox, one
call per 8 keys: the backward regenerates the same mask), and the backward recomputes the scores once, in a
kernel over key blocks that accumulates dk and dv and stores dS as dense [Lq, K] rows. The table's gradient is
made of dS, so dS is in memory anyway: dq = scale·dS·k is then one matrix product, and `_window_grad` lays dS
into the table's windows (writing the zeros outside them too: no zero-filled buffer first) and sums the
segment coefficient's gradient. No atomics. (Until 2026-11-28 a second kernel over query blocks recomputed
every tile a second time for dq, dS and the coefficient: on an H200 it took 1.0 ms of the content stream's
3.6 ms core.) Loads clamp rows and keys past the end instead of masking them (their scores are discarded): a
masked gather of the [BLOCK_M, BLOCK_N] table window kept its predicates and pointers live and spilled
registers.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before this module is
imported): that is how the tests check them against the reference on CPU. Their register use on a GPU can be
read without one too: benchmarks/kernel_resources.py compiles them for sm_90a.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Tile shapes (BLOCK_M query rows, BLOCK_N keys), warps and pipeline stages tried per shape by the autotuner on
# a GPU: per kernel, the ones that compile for sm_90a without register spills at the base model's shapes under
# Triton 3.6 to 3.9 (torch 2.11 pins 3.6, torch 2.13 3.7; benchmarks/kernel_resources.py lists registers, local
# memory and matrix instructions, test_triton_attention.py holds them for the installed Triton). Each thread
# holds at most 16 of the forward's scores (Triton >= 3.7 lays the distance-window gather out across threads
# and spilled at 32); the backward kernel keeps the dimension it iterates over (query rows) narrow, as its
# accumulators stay in registers. Its first three entries (keys_down) compute the tile transposed
# ([keys, rows]): then all four of its products have the keys (64 or more) as their M, which
# Hopper's wgmma needs, and P and dS enter dv and dk from registers; rows-down, the two products that
# recompute S and dP have 16-32 rows as M and compile to the older mma.sync (the autotuner keeps both kinds
# until a GPU says which wins). Under the interpreter: small tiles that differ between the two kernels, so the
# tests run several blocks per loop and check that kernels with different tiles draw the same dropout mask.
TILES = {
    "forward": ((64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)),
    "backward_kv": ((32, 64, 8, 2, True), (16, 128, 8, 2, True), (16, 64, 4, 2, True), (32, 64, 8, 2),
                    (64, 32, 4, 2)),
}
INTERPRETER_TILES = {"forward": ((16, 32, 4, 1),), "backward_kv": ((32, 16, 4, 1, True),)}


# XLNET_TRITON_AUTOTUNE=0: each kernel's first tile only, no timed trials (the GPU tests, whose many small
# shapes would each be autotuned)
AUTOTUNE = os.environ.get("XLNET_TRITON_AUTOTUNE", "1") != "0"
WINDOW_BLOCK = 64 if INTERPRETED else 1024  # _window_grad's table columns per step (the tests loop over several)


def tile_meta(kernel: str, tile: tuple) -> dict:
    """The compile-time block sizes of one tile (m, n, warps, stages[, keys_down]); the dk/dv kernel also takes
    KEYS_DOWN (its tile transposed, False where the tile does not say)."""
    meta = {"BLOCK_M": tile[0], "BLOCK_N": tile[1]}
    if kernel == "backward_kv":
        meta["KEYS_DOWN"] = len(tile) > 4 and bool(tile[4])
    return meta


def tile_config(kernel: str, tile: tuple) -> triton.Config:
    return triton.Config(tile_meta(kernel, tile), num_warps=tile[2], num_stages=tile[3])


def configs(kernel: str) -> list[triton.Config]:
    if INTERPRETED:
        tiles = INTERPRETER_TILES[kernel]
    else:
        tiles = TILES[kernel] if AUTOTUNE else TILES[kernel][:1]
    return [tile_config(kernel, tile) for tile in tiles]


def tuned(kernel: str):
    return triton.autotune(configs=configs(kernel), key=["Lq", "K", "D", "DROPOUT", "HAS_SEG", "HAS_MASK"])


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b accumulated in float32; exact float32 products for float32 inputs (the parity tests), else tensor
    cores."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _row_stats(STATS, DELTA, bh, offs_m, Lq):
    """The forward's row max and row sum, and delta = rowsum(dO ∘ O), for a block of query rows."""
    ok = offs_m < Lq
    m = tl.load(STATS + bh * 2 * Lq + offs_m, mask=ok, other=0.0)
    l = tl.load(STATS + bh * 2 * Lq + Lq + offs_m, mask=ok, other=1.0)
    return m, l, tl.load(DELTA + bh * Lq + offs_m, mask=ok, other=0.0)


@triton.jit
def _query_block(Q, DO, STATS, DELTA, bh, offs_m, Lq, offs_d, D, BLOCK_D):
    """What the backward reads per block of query rows: q, dO, and the forward's row statistics with delta."""
    q = _load_rows(Q + bh * Lq * D, offs_m, Lq, offs_d, D, BLOCK_D)
    do = _load_rows(DO + bh * Lq * D, offs_m, Lq, offs_d, D, BLOCK_D)
    m, l, delta = _row_stats(STATS, DELTA, bh, offs_m, Lq)
    return q, do, m, l, delta


@triton.jit
def _by_row(x, KEYS_DOWN: tl.constexpr):
    """A vector over the tile's query rows, broadcast along its keys (KEYS_DOWN: the tile is [keys, rows])."""
    if KEYS_DOWN:
        out = x[None, :]
    else:
        out = x[:, None]
    return out


@triton.jit
def _by_key(x, KEYS_DOWN: tl.constexpr):
    """A vector over the tile's keys, broadcast along its query rows."""
    if KEYS_DOWN:
        out = x[:, None]
    else:
        out = x[None, :]
    return out


@triton.jit
def _score_tile(q, k, T, C0, COEF, SEGQ, SEGK, MASK, b, h, offs_m, offs_n, Lq, K, n_head, scale,
                stride_tb, stride_th, R, stride_cb, stride_mb, stride_mi,
                HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, KEYS_DOWN: tl.constexpr):
    """S for one tile in float32 (-inf past the last key). The tile is [BLOCK_M, BLOCK_N], or with KEYS_DOWN its transpose [BLOCK_N, BLOCK_M] (the
    dk/dv kernel: every product there then has the keys as its M, the side Hopper's wgmma needs >= 64)."""
    # rows and keys past the end clamped (their scores are discarded): every load in bounds, none masked
    rows, keys = tl.minimum(offs_m, Lq - 1), tl.minimum(offs_n, K - 1)
    if KEYS_DOWN:
        s = _dot(k, tl.trans(q), IEEE) * scale
    else:
        s = _dot(q, tl.trans(k), IEEE) * scale
    c0 = tl.load(C0 + b * stride_cb + rows)
    # T[i, c0_i + j] in this (b, h)'s table
    s += tl.load(T + b * stride_tb + h * stride_th + _by_row(rows * R + c0, KEYS_DOWN) + _by_key(keys, KEYS_DOWN)
                 ).to(tl.float32)
    if HAS_SEG:
        coef = tl.load(COEF + (b * n_head + h) * Lq + rows).to(tl.float32)
        sq = tl.load(SEGQ + b * Lq + rows)
        sk = tl.load(SEGK + b * K + keys)
        s += tl.where(_by_row(sq, KEYS_DOWN) == _by_key(sk, KEYS_DOWN), _by_row(coef, KEYS_DOWN), 0.0)
    if HAS_MASK:
        s += tl.load(MASK + b * stride_mb + _by_row(rows * stride_mi, KEYS_DOWN) + _by_key(keys, KEYS_DOWN)
                     ).to(tl.float32)
    return tl.where(_by_key(offs_n < K, KEYS_DOWN), s, float("-inf"))


@triton.jit
def _keep(SEED, bh, offs_m, start_n, K: tl.constexpr, p_drop, BLOCK_N: tl.constexpr):
    """The dropout keep mask of a tile. Philox keyed by the call's seed; the 64-bit counter is (batch·head) in
    the high word and i·⌈K/8⌉ + j // 8 in the low one, so no two entries of a call share a counter (a seed per
    head, seed + bh, would let two calls' heads coincide). One call per row and group of 8 keys gives four
    32-bit words, i.e. eight 16-bit lanes, one per key: a key is dropped iff its lane < p·65536 (p a multiple
    of 1/65536). The lane order inside a group does not depend on the tile shape, so kernels with different
    tiles draw the same mask."""
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    counter = (bh.to(tl.int64) << 32) + (offs_m[:, None] * ((K + 7) // 8) + groups[None, :])
    r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), counter)
    words = tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3))
    lanes = tl.interleave(words & 0xFFFF, words >> 16)
    return lanes.to(tl.float32) >= p_drop * 65536.0


@triton.jit
def _load_rows(ptr, offs, n_rows, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows offs of a [n_rows, D] matrix; rows past the end read the last one (callers discard what they give:
    a load without a mask needs no predicate registers), columns past D read 0."""
    ptrs = ptr + tl.minimum(offs, n_rows - 1)[:, None] * D + offs_d[None, :]
    if D == BLOCK_D:
        rows = tl.load(ptrs)
    else:
        rows = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return rows


@tuned("forward")
@triton.jit
def _forward(Q, Kt, V, T, C0, COEF, SEGQ, SEGK, MASK, O, STATS, Lq: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
             n_head, scale, p_drop, SEED,
             stride_tb, stride_th, R: tl.constexpr, stride_cb, stride_mb, stride_mi,
             HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + bh * Lq * D, offs_m, Lq, offs_d, D, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(Kt + bh * K * D, offs_n, K, offs_d, D, BLOCK_D)
        v = _load_rows(V + bh * K * D, offs_n, K, offs_d, D, BLOCK_D)
        s = _score_tile(q, k, T, C0, COEF, SEGQ, SEGK, MASK, b, h, offs_m, offs_n, Lq, K, n_head, scale,
                        stride_tb, stride_th, R, stride_cb, stride_mb, stride_mi, HAS_SEG, HAS_MASK, IEEE, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(SEED, bh, offs_m, start_n, K, p_drop, BLOCK_N), p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    row_ok = offs_m < Lq
    tl.store(O + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < D)[None, :])
    # the running max and the sum apart, not m + log(l): a fully masked row (every score -1e30, the reference's
    # uniform softmax) has m = -1e30, which would swallow log(l) in float32
    tl.store(STATS + bh * 2 * Lq + offs_m, m_i, mask=row_ok)
    tl.store(STATS + bh * 2 * Lq + Lq + offs_m, l_i, mask=row_ok)


@triton.jit
def _probs_and_grad(q, k, v, do, m, l, delta, T, C0, COEF, SEGQ, SEGK, MASK, b, h, bh, offs_m, start_n, Lq,
                    K: tl.constexpr, n_head, scale, p_drop, SEED, stride_tb, stride_th, R, stride_cb,
                    stride_mb, stride_mi, HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                    IEEE: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_DOWN: tl.constexpr):
    """Recomputed tile (transposed with KEYS_DOWN, as in _score_tile): the probabilities after dropout (what
    multiplied v) and dS (the scores' gradient)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = _score_tile(q, k, T, C0, COEF, SEGQ, SEGK, MASK, b, h, offs_m, offs_n, Lq, K, n_head, scale,
                    stride_tb, stride_th, R, stride_cb, stride_mb, stride_mi, HAS_SEG, HAS_MASK, IEEE, KEYS_DOWN)
    p = tl.where(_by_row(offs_m < Lq, KEYS_DOWN), tl.exp(s - _by_row(m, KEYS_DOWN)) / _by_row(l, KEYS_DOWN), 0.0)
    if KEYS_DOWN:
        dp = _dot(v, tl.trans(do), IEEE)
    else:
        dp = _dot(do, tl.trans(v), IEEE)
    p_kept = p
    if DROPOUT:
        keep = _keep(SEED, bh, offs_m, start_n, K, p_drop, BLOCK_N)
        if KEYS_DOWN:
            keep = tl.trans(keep)
        p_kept = tl.where(keep, p / (1.0 - p_drop), 0.0)
        dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
    return p_kept, p * (dp - _by_row(delta, KEYS_DOWN))


@tuned("backward_kv")
@triton.jit
def _backward_kv(Q, Kt, V, T, C0, COEF, SEGQ, SEGK, MASK, DO, STATS, DELTA, DK, DV, DS, Lq: tl.constexpr,
                 K: tl.constexpr, D: tl.constexpr, n_head, scale, p_drop, SEED, stride_tb, stride_th, R: tl.constexpr,
                 stride_cb, stride_mb, stride_mi,
                 HAS_SEG: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEYS_DOWN: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(Kt + bh * K * D, offs_n, K, offs_d, D, BLOCK_D)
    v = _load_rows(V + bh * K * D, offs_n, K, offs_d, D, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, m, l, delta = _query_block(Q, DO, STATS, DELTA, bh, offs_m, Lq, offs_d, D, BLOCK_D)
        p_kept, ds = _probs_and_grad(q, k, v, do, m, l, delta, T, C0, COEF, SEGQ, SEGK, MASK, b, h, bh, offs_m,
                                     start_n, Lq, K, n_head, scale, p_drop, SEED, stride_tb, stride_th, R, stride_cb,
                                     stride_mb, stride_mi, HAS_SEG, HAS_MASK, DROPOUT, IEEE, BLOCK_N, KEYS_DOWN)
        if KEYS_DOWN:  # P and dS as they are: the products' A operand straight from registers
            dv += _dot(p_kept.to(do.dtype), do, IEEE)
            dk += _dot(ds.to(q.dtype), q, IEEE)
        else:
            dv += _dot(tl.trans(p_kept.to(do.dtype)), do, IEEE)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        # dS as it is, [Lq, K] rows per (batch, head) (int64: B·n·Lq·K may pass 2**31): dq is one matrix product
        # over it, and _window_grad lays it into the table
        tl.store(DS + (bh.to(tl.int64) * Lq + _by_row(offs_m, KEYS_DOWN)) * K + _by_key(offs_n, KEYS_DOWN),
                 ds.to(DS.dtype.element_ty), mask=_by_row(offs_m < Lq, KEYS_DOWN) & _by_key(offs_n < K, KEYS_DOWN))
    ok = (offs_n < K)[:, None] & (offs_d < D)[None, :]
    ptrs = bh * K * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + ptrs, (dk * scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _window_grad(DS, C0, DT, SEGQ, SEGK, DCOEF, Lq: tl.constexpr, K: tl.constexpr, R: tl.constexpr, n_head,
                 stride_tb, stride_th, stride_cb, HAS_SEG: tl.constexpr, BLOCK: tl.constexpr):
    """The table's gradient from dS, one table row per program: column r of row i gets dS[i, r - c0_i] inside
    the row's window [c0_i, c0_i + K), zero outside; every column written (no zero-filled buffer first). With
    segments, the row's segment coefficient gradient too: the sum of its dS over the keys in its segment."""
    i, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // n_head, bh % n_head
    c0 = tl.load(C0 + b * stride_cb + i)
    row = DS + (bh.to(tl.int64) * Lq + i) * K
    dcoef = tl.zeros([BLOCK], tl.float32)
    if HAS_SEG:
        sq = tl.load(SEGQ + b * Lq + i)
    for start in range(0, R, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        j = cols - c0
        inside = (j >= 0) & (j < K)
        g = tl.load(row + j, mask=inside, other=0.0)
        tl.store(DT + b * stride_tb + h * stride_th + i * R + cols, g, mask=cols < R)
        if HAS_SEG:  # g is 0 outside the window, whatever the clamped key's segment
            sk = tl.load(SEGK + b * K + tl.minimum(tl.maximum(j, 0), K - 1))
            dcoef += tl.where(sk == sq, g.to(tl.float32), 0.0)
    if HAS_SEG:
        tl.store(DCOEF + bh * Lq + i, tl.sum(dcoef, 0))


def _launch_args(qc: Tensor, klen: int, table: Tensor, strides: tuple[int, int], c0: Tensor, coef: Tensor | None,
                 seg_q: Tensor | None, seg_k: Tensor | None, mask: Tensor | None, seed: Tensor, p: float,
                 scale: float) -> dict:
    """What every kernel takes after q, k, v: tensors (absent ones as a placeholder pointer), sizes, strides,
    and the compile-time flags; and by name what _window_grad takes of them (stride_cb, the segment ids)."""
    _, n_head, qlen, d_head = qc.shape
    has_seg, has_mask = coef is not None, mask is not None
    if has_mask:
        mask = mask.expand(-1, 1, qlen, klen)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    stride_mb, stride_mi = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2)) if has_mask else (0, 0)
    stride_cb = c0.stride(0) if c0.shape[0] > 1 else 0
    scalars = (qlen, klen, d_head, n_head, scale, p, seed, strides[0], strides[1], table.shape[-1], stride_cb,
               stride_mb, stride_mi)
    flags = dict(HAS_SEG=has_seg, HAS_MASK=has_mask, DROPOUT=p > 0, IEEE=qc.dtype == torch.float32,
                 BLOCK_D=max(16, triton.next_power_of_2(d_head)))
    seg_ids = (seg_q, seg_k) if has_seg else (c0, c0)
    tensors = (table, c0, coef if has_seg else qc, *seg_ids, mask if has_mask else qc)
    return dict(tensors=tensors, scalars=scalars, flags=flags, stride_cb=stride_cb, seg_ids=seg_ids)


def _grid(rows: int, block: str, programs: int):
    """Launch grid: blocks of `rows` by the autotuned tile size `block`, times one program per (batch, head)."""
    return lambda meta: (triton.cdiv(rows, meta[block]), programs)


# Custom operators (opaque to torch.compile, which traces around them without a graph break), with autograd.


def _new_output(like: Tensor, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised buffer for a kernel to fill completely (tests poison it with NaN): like's shape and
    layout, or the given shape in dtype (row statistics and the segment coefficient's gradient: float32)."""
    return torch.empty_like(like) if shape is None else like.new_empty(shape, dtype=dtype)


@torch.library.custom_op("xlnet::rel_attention", mutates_args=())
def rel_attention(qc: Tensor, k: Tensor, v: Tensor, table: Tensor, c0: Tensor, coef: Optional[Tensor],
                  seg_q: Optional[Tensor], seg_k: Optional[Tensor], mask: Optional[Tensor], seed: Tensor, sb: int,
                  sn: int, p: float, scale: float) -> tuple[Tensor, Tensor]:
    bsz, n_head, qlen, _ = qc.shape
    out = _new_output(qc)
    stats = _new_output(qc, (bsz, n_head, 2, qlen))  # row max, row sum
    args = _launch_args(qc, k.shape[2], table, (sb, sn), c0, coef, seg_q, seg_k, mask, seed, p, scale)
    _forward[_grid(qlen, "BLOCK_M", bsz * n_head)](
        qc, k, v, *args["tensors"], out, stats, *args["scalars"], **args["flags"])
    return out, stats


@rel_attention.register_fake
def _(qc, k, v, table, c0, coef, seg_q, seg_k, mask, seed, sb, sn, p, scale):
    bsz, n_head, qlen, _ = qc.shape
    return torch.empty_like(qc), qc.new_empty((bsz, n_head, 2, qlen), dtype=torch.float32)


@torch.library.custom_op("xlnet::rel_attention_backward", mutates_args=())
def rel_attention_backward(grad_out: Tensor, out: Tensor, stats: Tensor, qc: Tensor, k: Tensor, v: Tensor,
                           table: Tensor, c0: Tensor, coef: Optional[Tensor], seg_q: Optional[Tensor],
                           seg_k: Optional[Tensor], mask: Optional[Tensor], seed: Tensor, sb: int, sn: int, p: float,
                           scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    bsz, n_head, qlen, _ = qc.shape
    klen = k.shape[2]
    args = _launch_args(qc, klen, table, (sb, sn), c0, coef, seg_q, seg_k, mask, seed, p, scale)
    do = grad_out.contiguous()
    delta = (do.float() * out.float()).sum(-1)  # rowsum(dO ∘ O) = Σ_j P_ij dP_ij, dropout included
    dk, dv, d_table = _new_output(k), _new_output(v), _new_output(table)
    d_s = _new_output(qc, (bsz, n_head, qlen, klen), table.dtype)
    d_coef = _new_output(qc, (bsz, n_head, qlen) if coef is not None else (0,))
    _backward_kv[_grid(klen, "BLOCK_N", bsz * n_head)](
        qc, k, v, *args["tensors"], do, stats, delta, dk, dv, d_s, *args["scalars"], **args["flags"])
    # dq = scale·dS·k: dS is in memory anyway (the table's gradient is made of it), so a matrix product over it
    # replaces a kernel that recomputed every tile
    dq = torch.baddbmm(d_s.new_zeros(()), d_s.flatten(0, 1), k.flatten(0, 1).to(d_s.dtype), beta=0,
                       alpha=scale).view(qc.shape).to(qc.dtype)
    rlen = table.shape[-1]
    _window_grad[(qlen, bsz * n_head)](d_s, c0, d_table, *args["seg_ids"], d_coef if coef is not None else d_s,
                                       qlen, klen, rlen, n_head, sb, sn, args["stride_cb"], HAS_SEG=coef is not None,
                                       BLOCK=min(WINDOW_BLOCK, triton.next_power_of_2(rlen)))
    return dq, dk, dv, d_table, d_coef


@rel_attention_backward.register_fake
def _(grad_out, out, stats, qc, k, v, table, c0, coef, seg_q, seg_k, mask, seed, sb, sn, p, scale):
    shape = (qc.shape[0], qc.shape[1], qc.shape[2]) if coef is not None else (0,)
    return (torch.empty_like(qc), torch.empty_like(k), torch.empty_like(v), torch.empty_like(table),
            qc.new_empty(shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output, *inputs[:10])
    ctx.scalars = inputs[10:]


def _backward(ctx, grad_out: Tensor, _grad_stats: Tensor):
    out, stats, qc, k, v, table, c0, coef, seg_q, seg_k, mask, seed = ctx.saved_tensors
    dq, dk, dv, d_table, d_coef = rel_attention_backward(grad_out, out, stats, qc, k, v, table, c0, coef, seg_q,
                                                         seg_k, mask, seed, *ctx.scalars)
    g_coef = d_coef.to(coef.dtype) if coef is not None else None
    return dq, dk, dv, d_table, None, g_coef, None, None, None, None, None, None, None, None


rel_attention.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(qc: Tensor, k: Tensor, v: Tensor, table: Tensor, strides: tuple[int, int], c0: Tensor,
                     coef: Tensor | None, seg_q: Tensor | None, seg_k: Tensor | None, mask: Tensor | None, p: float,
                     scale: float) -> Tensor:
    """softmax(S)·v with attention dropout p; S as in the module docstring.

    qc [B, n, Lq, dh] (q + r_w_bias), k and v [B, n, K, dh]; table: the position term with rows at strides
    (sb, sn) per (batch, head) and R columns per row; c0 [B|1, Lq] int; coef [B, n, Lq] (scaled) or None with
    seg_q [B, Lq] and seg_k [B, K] ids; mask [B|1, 1, Lq, K] additive or None. -> [B, n, Lq, dh]. The dropout
    seed is drawn from the device's generator (seeded runs repeat)."""
    bsz, n_head, qlen, _ = qc.shape
    if n_head * qlen * k.shape[2] >= 2**31 or table.numel() >= 2**31:  # 32-bit offsets in the kernels
        raise ValueError("the triton core needs n_head * Lq * K and the distance table below 2**31 entries")
    p = round(p * 65536) / 65536  # the kernels draw 16-bit lanes
    seed = (torch.randint(0, 2**30, (1,), dtype=torch.int32, device=qc.device) if p > 0
            else torch.zeros(1, dtype=torch.int32, device=qc.device))

    def ints(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(torch.int32).contiguous()

    out, _ = rel_attention(qc.contiguous(), k.contiguous(), v.contiguous(), table, ints(c0),
                           None if coef is None else coef.contiguous(), ints(seg_q), ints(seg_k), mask, seed,
                           strides[0], strides[1], p, scale)
    return out
