"""The flex core of the fast path (`XLNET_ATTN_CORE=flex`, opt-in; CUDA, where torch.compile lowers
`torch.nn.attention.flex_attention` to one fused kernel that runs Hopper's tiles).

The whole score is q·k plus one gather: the segment term and the mask are added into the distance table at the
columns their scores read (`fold_into_table`), and a `score_mod` reads the table at column c0_i + j. flex then
computes the position term inside each tile and scatters its gradient into the table's, where SDPA's
memory-efficient kernel (the sdpa core) needs the [B, n, Lq, K] bias and writes its gradient. Attention dropout,
which flex does not have, is drawn from a hash of each score's index (the same mask in the forward and both
backward passes, nothing stored) and made exact through two calls' log-sum-exps (`flex_core`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as torch_flex

from xlnet.fast_attention import drop_lanes

AUX_LSE = torch_flex.AuxRequest(lse=True) if hasattr(torch_flex, "AuxRequest") else None  # torch >= 2.9


def flex_attend(qc: Tensor, kc: Tensor, v: Tensor, table: Tensor, c0: Tensor, seg: tuple[Tensor, ...],
                mask: Tensor | None, p: float, scale: float) -> Tensor:
    """fast_attend's flex core: qc, kc, v [B, n, Lq|K, dh]; the distance table as distance_scores makes it in one
    block of rows ([n, 1, B·Lq, R] when the batch shares the table's keys, else [B, n, 1, Lq, R]); c0 [B|1, Lq]
    each row's column of key 0; seg and mask as for the sdpa core's bias. -> [B, n, Lq, dh]."""
    bsz, n_head, qlen, _ = qc.shape
    c0 = c0.expand(bsz, -1)
    if table.dim() == 4:
        table = table.view(n_head, bsz, qlen, -1).transpose(0, 1)
    table = fold_into_table(table.view(bsz, n_head, qlen, -1), c0, seg, mask, kc.shape[2])
    return flex_core(qc, kc, v.to(qc.dtype), table, c0, p, scale)


def fold_into_table(table: Tensor, c0: Tensor, seg: tuple[Tensor, ...], mask: Tensor | None, klen: int) -> Tensor:
    """The distance table [B, n, Lq, R] with the segment term and the mask added at the columns their scores read
    (key j of row i at column c0_i + j: one column per key, so the sum is exact and the segment coefficient's
    gradient is the table gradient's sum over the row's same-segment columns). The score is then q·k plus one
    gather, and flex scatters its score gradient into one tensor."""
    if not seg and mask is None:
        return table
    cols = torch.arange(table.shape[-1], device=table.device)
    key = (cols - c0[..., None]).clamp(0, klen - 1)[:, None]  # [B, 1, Lq, R] the key each column holds
    if seg:  # coef [B, n, Lq], same [B, 1, Lq, K]
        table = torch.addcmul(table, seg[0][..., None], seg[1].gather(-1, key))
    if mask is not None:  # [B|1, 1, Lq, K]; columns outside a row's window are never read
        table = table + mask.expand(c0.shape[0], -1, -1, -1).gather(-1, key)
    return table


HASH_MUL = 0x45D9F3B  # a 32-bit multiply-xorshift finalizer's multiplier (int32 products wrap)


def mix32(x: Tensor) -> Tensor:
    """An integer hash of int32 x: two multiply-xorshift rounds, the shifts made logical by masking. Pure index
    arithmetic, so flex's forward and both backward passes draw the same dropout mask without storing it."""
    for _ in range(2):
        x = (x ^ ((x >> 16) & 0xFFFF)) * HASH_MUL
    return x ^ ((x >> 16) & 0xFFFF)


def flex_keep(seed: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor, shape: tuple[int, int, int],
              drop: int) -> Tensor:
    """Whether score (b, h, i, j) of a [B, n=shape[0], Lq=shape[1], K=shape[2]] call survives attention dropout:
    the low 16 bits of the hashed flat index (xor the call's seed) against fast_attention.drop_lanes' threshold."""
    n_head, qlen, klen = shape
    return (mix32((((b * n_head + h) * qlen + i) * klen + j) ^ seed) & 0xFFFF) >= drop


_compiled_flex = None


def flex_fn(device: torch.device):
    """flex_attention, compiled once on CUDA outside compiled regions (eager, it is a slow dense reference; inside
    torch.compile it lowers to its fused kernel anyway)."""
    global _compiled_flex
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch_flex.flex_attention
    if _compiled_flex is None:
        from xlnet.training import allow_recompiles

        allow_recompiles()  # a variant per stream, score_mod (dropped or not) and value width
        _compiled_flex = torch.compile(torch_flex.flex_attention, dynamic=False)
    return _compiled_flex


def flex_core(qc: Tensor, kc: Tensor, v: Tensor, table: Tensor, c0: Tensor, p: float, scale: float) -> Tensor:
    """softmax(q·k·scale + table[b, h, i, c0_i + j]) with attention dropout p, times v: [B, n, Lq, dh].

    flex_attention has no dropout, so it is made exact from two calls' log-sum-exps: the call whose score_mod
    sets dropped scores to -inf returns (sum over kept of e^s·v) / Z_kept, the call without dropout Z_all, and
    the output is that times Z_kept / Z_all / (1 - p'), with the gradient through both log-sum-exps. The second
    call's values are cut to 16 dims (its output is unused)."""
    flex = flex_fn(qc.device)
    bsz, n_head, qlen, _ = qc.shape

    def biased(s: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return s + table[b, h, i, c0[b, i] + j]

    if not p:
        return flex(qc, kc, v, score_mod=biased, scale=scale)
    drop, drop_scale = drop_lanes(p)
    seed = torch.randint(-2**31, 2**31 - 1, (1,), dtype=torch.int32, device=qc.device)
    shape = (n_head, qlen, kc.shape[2])

    def dropped(s: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return torch.where(flex_keep(seed[0], b, h, i, j, shape, drop), biased(s, b, h, i, j), float("-inf"))

    out, lse_kept = with_lse(flex, qc, kc, v, dropped, scale)
    _, lse_all = with_lse(flex, qc, kc, v[..., :16], biased, scale)
    ratio = torch.exp(lse_kept - lse_all) * drop_scale  # float32; 0 where every key dropped
    return (out * ratio[..., None]).to(out.dtype)


def with_lse(flex, q: Tensor, k: Tensor, v: Tensor, score_mod, scale: float) -> tuple[Tensor, Tensor]:
    """flex's output and its rows' log-sum-exp (return_aux from torch 2.9, return_lse before)."""
    if AUX_LSE is None:
        return flex(q, k, v, score_mod=score_mod, scale=scale, return_lse=True)
    out, aux = flex(q, k, v, score_mod=score_mod, scale=scale, return_aux=AUX_LSE)
    return out, aux.lse
