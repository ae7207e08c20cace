"""Permutation-language-modeling batches, faithful to the reference XLNet pipeline (zihangdai/xlnet
`data_utils.py`: `batchify`, `_split_a_and_b`, `_sample_mask`, `create_tfrecords`, `_local_perm`), but built
on the fly from a token corpus instead of TFRecords.

Corpus: two aligned 1-D arrays, `tokens` (ids, `<eod>` at document ends) and `sent_ids` (bool, flips at each
new sentence/line), plus `word_start` (bool per vocab id: True for pieces starting with "▁"; the reference
also treats single-character punctuation pieces as starts, mark them too if you want that; special ids 0..8
are always starts because the reference treats pieces beginning with "<" as starts).

Rows, ranks and gradient accumulation
-------------------------------------
A *step* is one optimizer step over `total_rows` batch rows. `cfg.batch_size` (B) is the number of rows of
one yielded batch (a micro-batch of one process). The global layout depends only on the corpus, `total_rows`
and B (never on the seed or the process split):

* without bi_data the corpus is cut into `total_rows` contiguous streams (reference `batchify`); global row r
  reads stream r;
* with bi_data the corpus is cut into `total_rows // 2` forward streams; global rows are grouped in chunks of
  B (like the reference's per-core groups): in chunk g, rows g*B + k for k < B/2 read forward stream
  g*B/2 + k and rows g*B + B/2 + k read the same stream reversed. So every yielded batch is
  [B/2 forward rows | their B/2 reversed copies], which the model's bi_data relative positions expect.

`PLMSampler(..., total_rows, rows=slice(start, stop))` yields, for each step, the micro-batches
rows[start:start+B], rows[start+B:start+2B], ... then moves to the next step. `PLMSampler.for_rank(...,
world_size, rank, accum_steps)` sets total_rows = B * world_size * accum_steps and gives rank r the chunks
r*accum_steps .. (r+1)*accum_steps-1. All randomness of a sample comes from a generator seeded with
(seed, global_row, step), so 2 ranks x 1 micro-batch see exactly what 1 rank x 2 micro-batches sees.

Stream position and epochs
--------------------------
As in the reference, each row's stream advances by reuse_len per step whatever A/B looked like (the
reference computes `new_begin` but never uses it): sample t of a row is
[stream[i:i+R] | A <sep> | B <sep> | <cls>] with i = t*R and A starting at stream[i+R]; hence the reused
part of sample t+1 is stream[i+R:i+2R], the continuation of the reused part of sample t (the Transformer-XL
memory holds exactly that). The sampler is infinite: after `steps_per_epoch` steps (the reference's number of
batches) the position wraps to 0 and `epoch` increments; the A/B splits, masks and orders differ because the
step number seeds them.

Sample layout and targets
-------------------------
Segment ids: reused part, A and its `<sep>` 0; B and its `<sep>` 1; `<cls>` 2. num_predict is split as
num_predict_1 = num_predict*(L-R)//L for the new part and the rest for the reused part (for R = L/2 this is
the reference's `num_predict // 2` / `num_predict - num_predict // 2`). Spans follow `_sample_mask`, including
its effective behaviour: an "n-gram" is n *pieces* starting at a word start (the reference's end-of-n-gram
loop tests the start piece, not the current one, so it counts pieces). As in the reference, the span sampler
and the random top-up may pick `<sep>`/`<cls>`; those are dropped from the targets later, so a sample has at
most num_predict targets and the remaining slots are padding (target_mask 0, labels -100).

Batch dict (batch-first torch tensors, L = seq_len, P = num_predict)
-------------------------------------------------------------------
input_ids [B, L] long, token_type_ids [B, L] long, perm_mask [B, L, L] float32 (1 = i may NOT attend to j; the
query-stream mask; a content stream clears the diagonal), target_mapping [B, P, L] float32, labels [B, P] long
(-100 on padding slots), target_mask [B, P] float32, is_masked [B, L] bool (the targets), perm_q_rank /
perm_k_rank [B, L] long with perm_mask == (perm_q_rank[:, :, None] <= perm_k_rank[:, None, :]) -- a
rank form of the same mask (`perm_mask_from_ranks`) -- and target_index [B, P] long, the position each slot
reads (-1 on padding slots), the index form of target_mapping (`target_mapping_from_index`). A compact batch
(`dense=False`) has only the rank and index forms, 1/L and 1/L of the two dense tensors: `xlnet pretrain`
builds batches that way and rebuilds the dense ones on the device (`densify`); kernels can also build masks on
the fly from the ranks (e.g. flex_attention's mask_mod).

Objectives (`PLMConfig.objective`)
---------------------------------
The same samples (layout, A/B split, span targets, random streams) feed four objectives, so that comparing them
changes nothing but the objective:

* "plm" (XLNet): the batch above; the query stream predicts the targets in a sampled factorization order. With
  factorization_order "left-to-right" the order is the identity over every position, as "clm"'s (query stream:
  target i sees j < i and the memory, non-targets included): the same targets from the same stream, only the
  order fixed, the bridge between XLNet and a left-to-right LM.
* "mlm" (BERT's masked LM on the same backbone, the paper's "DAE + Transformer-XL" ablation): the same targets,
  corrupted in the input as BERT does (80% `<mask>`, 10% a random ordinary piece, 10% unchanged), no
  factorization order, only PLM's part blocks (`part_ranks`: the reused part, the next sample's memory, never
  sees the new part, the next sample's text); the content stream at the targets predicts them. Keys: input_ids
  (corrupted), token_type_ids, target_positions [B, P] long (0 on padding slots), labels, target_mask,
  is_masked, perm_mask, perm_q_rank, perm_k_rank.
* "clm" (left-to-right LM): the identity factorization order as perm ranks (content stream: i sees j <= i and
  the memory); the content stream at position i predicts token i + 1, every position but the last. Keys:
  input_ids, token_type_ids, perm_mask, perm_q_rank, perm_k_rank, target_positions [B, L - 1], labels
  [B, L - 1], target_mask. With clm_predict "targets" only the span targets are predicted (position i - 1
  predicts target i: the tokens and the number of predictions of plm and mlm), target_positions and labels
  [B, P].
* "infoword" (InfoWord, Kong et al. 2019: masked LM plus an InfoNCE term between a masked n-gram and its
  masked sentence): the "mlm" batch (the same corruption, except that the n-gram's pieces are all `<mask>`: the
  paper's sentence with the n-gram masked out, where 80/10/10 would leave some of it in view), whose
  target_positions and labels gain a last column for `<cls>` (position L - 1, label -100: its content state is
  the sentence's global representation, no loss), plus one masked n-gram per row, drawn last, laid out as a
  sentence of its own for the local representation: span_ids / span_type_ids / span_mask [B, max_ngram + 2] =
  the n-gram's original pieces (the first max_ngram pieces of a run of consecutive targets) laid out as
  fine-tuning lays out a sentence (`tasks.layout`: left padding, `<sep>`, `<cls>`).

Feeding a GPU
-------------
Every batch is a pure function of (step, rows), so `Prefetcher` can build the next ones in a worker process
while the device runs the current step, and the sampler's state (what a checkpoint stores) still counts only the
batches consumed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from xlnet.errors import XLNetError

SEP_ID = 4
CLS_ID = 3
MASK_ID = 6
NUM_SPECIAL = 9  # ids 0..8 are "<...>" pieces, which the reference counts as word starts
STATE_VERSION = 1
OBJECTIVES = ("plm", "mlm", "clm", "infoword")
FACTORIZATION_ORDERS = ("random", "left-to-right")
MLM_MASK, MLM_RANDOM = 0.8, 0.1  # BERT: shares of the targets shown as <mask> and as a random piece


@dataclass
class PLMConfig:
    """Hyperparameters of the pretraining data (reference defaults: 512/256/85, alpha 6, beta 1)."""

    seq_len: int = 512
    reuse_len: int = 256
    batch_size: int = 8  # rows per yielded (micro-)batch of this process
    num_predict: int = 85
    perm_size: int | None = None  # None -> reuse_len
    mask_alpha: float = 6
    mask_beta: float = 1
    max_ngram: int = 5
    bi_data: bool = False
    seed: int = 0
    sample_b_random_prob: float = 0.5
    objective: str = "plm"  # plm | mlm | clm | infoword (module docstring)
    clm_predict: str = "all"  # clm: every next token, or only the span "targets" (the tokens plm and mlm predict)
    factorization_order: str = "random"  # plm: "random" (sampled, XLNet) or "left-to-right" (the identity)

    @property
    def resolved_perm_size(self) -> int:
        return self.reuse_len if self.perm_size is None else self.perm_size

    @property
    def num_predict_split(self) -> tuple[int, int]:
        """(targets in the reused part, targets in the new part)."""
        new = self.num_predict * (self.seq_len - self.reuse_len) // self.seq_len
        return self.num_predict - new, new

    def validate(self) -> None:
        L, R, ps = self.seq_len, self.reuse_len, self.resolved_perm_size
        if not 0 < R < L - 3:
            raise XLNetError(f"PLMConfig: need 0 < reuse_len < seq_len - 3 (room for 2 <sep> + <cls>), got reuse_len={R} seq_len={L}")
        if ps <= 0 or R % ps or (L - R) % ps:
            raise XLNetError(f"PLMConfig: perm_size={ps} must divide both reuse_len={R} and seq_len-reuse_len={L - R}")
        if self.batch_size <= 0:
            raise XLNetError(f"PLMConfig: batch_size must be positive, got {self.batch_size}")
        if self.bi_data and self.batch_size % 2:
            raise XLNetError(f"PLMConfig: bi_data needs an even batch_size (forward + reversed halves), got {self.batch_size}")
        n0, n1 = self.num_predict_split
        if self.num_predict <= 0 or n0 > R or n1 > L - R:
            raise XLNetError(f"PLMConfig: num_predict={self.num_predict} does not fit seq_len={L}, reuse_len={R}")
        if self.clm_predict not in ("all", "targets"):
            raise XLNetError(f"PLMConfig: clm_predict must be 'all' or 'targets', got {self.clm_predict!r}")
        if self.factorization_order not in FACTORIZATION_ORDERS:
            raise XLNetError(f"PLMConfig: factorization_order must be one of {', '.join(FACTORIZATION_ORDERS)}, "
                             f"got {self.factorization_order!r}")
        if self.factorization_order != "random" and self.objective != "plm":
            raise XLNetError(f"PLMConfig: factorization_order is plm's; objective {self.objective} has its own order")
        if self.objective == "infoword" and self.bi_data:  # a row's reversed twin would be a false negative
            raise XLNetError("PLMConfig: objective infoword draws its negatives from the other rows; not with bi_data")
        if self.max_ngram < 1 or int(self.mask_alpha // self.mask_beta) < 1:
            raise XLNetError("PLMConfig: need max_ngram >= 1 and mask_alpha >= mask_beta > 0")
        if self.seed < 0:
            raise XLNetError(f"PLMConfig: seed must be >= 0, got {self.seed}")
        check_objective(self.objective)
        if not 0.0 <= self.sample_b_random_prob <= 1.0:
            raise XLNetError(f"PLMConfig: sample_b_random_prob must be in [0, 1], got {self.sample_b_random_prob}")


def check_objective(objective: str) -> None:
    """The one check of an objective's name (pretrain config, sampler, demo)."""
    if objective not in OBJECTIVES:
        raise XLNetError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


# ----------------------------------------------------------------------------------------------- A/B split


def sentence_boundaries(sent_ids: np.ndarray) -> np.ndarray:
    """Positions c > 0 where a new sentence starts (sent_ids[c] != sent_ids[c-1]), ascending."""
    return np.flatnonzero(sent_ids[1:] != sent_ids[:-1]) + 1


def truncate_pair(a_len: int, b_len: int, tot_len: int) -> tuple[int, int]:
    """Closed form of the reference loop `while a+b > tot: if a > b: a -= 1 else: b -= 1` (cuts from the right)."""
    excess = a_len + b_len - tot_len
    if excess <= 0:
        return a_len, b_len
    gap = abs(a_len - b_len)
    if excess <= gap:
        return (a_len - excess, b_len) if a_len > b_len else (a_len, b_len - excess)
    # shrink the longer to the shorter, then alternate starting with b (ties cut b)
    rest = excess - gap
    short = min(a_len, b_len)
    return short - rest // 2, short - (rest + 1) // 2


def split_a_b(
    stream_len: int, bounds: np.ndarray, begin: int, tot_len: int, rng: np.random.Generator, random_b_prob: float
) -> tuple[int, int, int, int, bool]:
    """Reference `_split_a_and_b` on a stream given its sentence boundaries.

    Returns (a_begin, a_end, b_begin, b_end, is_next): A = stream[a_begin:a_end] starts at `begin` and ends at a
    sentence boundary; B either continues A (is_next) or is a random sentence-aligned span of the same stream;
    both are then cut from the right to fit tot_len.
    """
    lo = int(np.searchsorted(bounds, begin, side="right"))
    hi = int(np.searchsorted(bounds, begin + tot_len, side="left"))
    cuts = bounds[lo:hi]  # boundaries strictly inside (begin, begin + tot_len)
    end_idx = int(bounds[hi]) if hi < len(bounds) else stream_len
    if len(cuts) == 0 or rng.random() < random_b_prob:
        is_next = False
        a_end = end_idx if len(cuts) == 0 else int(cuts[rng.integers(len(cuts))])
        b_len = max(1, tot_len - (a_end - begin))
        b_begin = int(rng.integers(0, stream_len - 1 - b_len, endpoint=True))
        b_end = b_begin + b_len
        # widen B to whole sentences: back to the previous boundary, forward to the next (capped at len-1)
        k = int(np.searchsorted(bounds, b_begin, side="right"))
        b_begin = int(bounds[k - 1]) if k > 0 else 0
        if b_end < stream_len - 1:
            k = int(np.searchsorted(bounds, b_end, side="left"))
            b_end = int(bounds[k]) if k < len(bounds) else stream_len - 1  # boundaries are < stream_len
    else:
        is_next = True
        a_end = int(cuts[rng.integers(len(cuts))])
        b_begin, b_end = a_end, end_idx
    a_len, b_len = truncate_pair(a_end - begin, b_end - b_begin, tot_len)
    return begin, begin + a_len, b_begin, b_begin + b_len, is_next


# ------------------------------------------------------------------------------------------- span masking


def _ngram_cdf(max_ngram: int) -> np.ndarray:
    p = 1.0 / np.arange(1, max_ngram + 1)
    return np.cumsum(p / p.sum())


def sample_spans(
    seg: np.ndarray, word_start: np.ndarray, goal: int, rng: np.random.Generator,
    max_ngram: int = 5, mask_alpha: float = 6, mask_beta: float = 1,
) -> list[tuple[int, int]]:
    """The span loop of the reference `_sample_mask` (no top-up, no reversal): [beg, end) spans in `seg` order.

    Each span: n ~ p(n) ∝ 1/n (clipped to the remaining goal), a context of n*alpha//beta tokens, a left
    context uniform in [0, ctx), the span starts at the first word start from there and covers n pieces; the
    loop stops at the goal or when a span would reach the end of the segment.
    """
    n_tok = len(seg)
    starts = word_start[seg]
    # next_start[p] = first q >= p with a word start (n_tok if none): one vectorized pass instead of a scan
    pos = np.where(starts, np.arange(n_tok), n_tok)
    next_start = np.minimum.accumulate(pos[::-1])[::-1]
    cdf = _ngram_cdf(max_ngram)
    spans: list[tuple[int, int]] = []
    num, cur = 0, 0
    while cur < n_tok and num < goal:
        n = min(int(np.searchsorted(cdf, rng.random(), side="right")) + 1, max_ngram, goal - num)
        ctx = int(n * mask_alpha // mask_beta)
        l_ctx = int(rng.integers(ctx))
        beg = cur + l_ctx
        if beg >= n_tok:
            break
        beg = int(next_start[beg])
        end = beg + n
        if end >= n_tok:  # the reference also gives up when the span touches the last piece
            break
        spans.append((beg, end))
        num += n
        cur = end + (ctx - l_ctx)
    return spans


def sample_span_mask(
    seg: np.ndarray, word_start: np.ndarray, goal: int, rng: np.random.Generator, *,
    reverse: bool = False, max_ngram: int = 5, mask_alpha: float = 6, mask_beta: float = 1,
) -> np.ndarray:
    """Reference `_sample_mask`: spans, then random unmasked positions until exactly `goal` are masked.

    With reverse (backward bi_data rows) the spans are placed on the flipped segment, i.e. in reading order.
    """
    s = seg[::-1] if reverse else seg
    mask = np.zeros(len(s), dtype=bool)
    for beg, end in sample_spans(s, word_start, goal, rng, max_ngram, mask_alpha, mask_beta):
        mask[beg:end] = True
    missing = goal - int(mask.sum())
    if missing > 0:  # same distribution as the reference's rejection loop over randint(seg_len)
        mask[rng.choice(np.flatnonzero(~mask), missing, replace=False)] = True
    return mask[::-1].copy() if reverse else mask


# ----------------------------------------------------------------------------------------- factorization


def local_perm_ranks(
    input_ids: np.ndarray, is_masked: np.ndarray, perm_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference `_local_perm` for one part: returns (query rank, key rank, target) per position.

    Like the reference (tf.random_shuffle of the [perm_size, n/perm_size] index matrix), ONE permutation of
    perm_size is applied to every chunk, and chunk c's ranks are c*perm_size + sigma(k): chunks in order.
    Non-target, non-functional tokens get rank -1 (seen by all, see no target); targets must not see
    themselves (query = rank), everyone else does (query = rank + 1). i may not attend j iff q[i] <= k[j].
    """
    n = len(input_ids)
    sigma = rng.permutation(perm_size)
    ar = np.arange(n)
    index = (ar // perm_size) * perm_size + sigma[ar % perm_size]
    functional = (input_ids == SEP_ID) | (input_ids == CLS_ID)  # np.isin is ~5x slower on short rows
    target = is_masked & ~functional
    non_mask = ~is_masked & ~functional
    k_rank = np.where(non_mask, -1, index)
    q_rank = np.where(target, k_rank, k_rank + 1)
    return q_rank, k_rank, target


def row_perm_ranks(
    input_ids: np.ndarray, is_masked: np.ndarray, reuse_len: int, perm_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both parts of a sample, merged into one rank pair (reference `parser` in get_dataset).

    The reference concatenates the two local masks with an all-ones block (the reused part never sees the new
    part) and an all-zeros block (the new part sees all of the reused part). Offsetting the new part's ranks by
    reuse_len + 1 gives exactly that: its keys (>= reuse_len, non-targets = reuse_len) are above every reused
    query (<= reuse_len) and its queries (>= reuse_len + 1) are above every reused key (<= reuse_len - 1).
    """
    q0, k0, t0 = local_perm_ranks(input_ids[:reuse_len], is_masked[:reuse_len], perm_size, rng)
    q1, k1, t1 = local_perm_ranks(input_ids[reuse_len:], is_masked[reuse_len:], perm_size, rng)
    off = reuse_len + 1
    return np.concatenate([q0, q1 + off]), np.concatenate([k0, k1 + off]), np.concatenate([t0, t1])


def perm_mask_from_ranks(q_rank: Tensor, k_rank: Tensor) -> Tensor:
    """perm_mask [B, L, L] float32 (1 = query i may not see key j) from the rank form [B, L] (on any device)."""
    return (q_rank[:, :, None] <= k_rank[:, None, :]).to(torch.float32)


def target_mapping_from_index(target_index: Tensor, seq_len: int) -> Tensor:
    """target_mapping [B, P, L] float32 from the index form [B, P] (-1: a padding slot, an all-zero row)."""
    return (target_index[:, :, None] == torch.arange(seq_len, device=target_index.device)).to(torch.float32)


def densify(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A compact batch (`PLMSampler.batch_at(..., dense=False)`) with perm_mask and target_mapping built from the
    rank and index forms, on the batch's device; the compact keys are dropped."""
    out = dict(batch)
    if "perm_q_rank" in out:
        out["perm_mask"] = perm_mask_from_ranks(out.pop("perm_q_rank"), out.pop("perm_k_rank"))
    if "target_index" in out:
        out["target_mapping"] = target_mapping_from_index(out.pop("target_index"), out["input_ids"].shape[1])
    return out


def _long(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def target_slots(input_ids: np.ndarray, target: np.ndarray, num_predict: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's targets in ascending position order, padded to num_predict slots: positions [B, P] (0 on
    padding), valid [B, P] bool, labels [B, P] (the token, -100 on padding)."""
    counts = target.sum(1)
    if counts.max(initial=0) > num_predict:
        raise XLNetError(f"a sample has {int(counts.max())} targets, more than num_predict={num_predict}")
    # stable argsort of ~target puts target positions first, in ascending order (reference boolean_mask order)
    pos = np.argsort(~target, axis=1, kind="stable")[:, :num_predict]
    valid = np.arange(num_predict)[None, :] < counts[:, None]
    labels = np.where(valid, np.take_along_axis(input_ids, pos, 1), -100)
    return np.where(valid, pos, 0), valid, labels


def assemble_batch(
    input_ids: np.ndarray, token_type_ids: np.ndarray, q_rank: np.ndarray, k_rank: np.ndarray,
    target: np.ndarray, num_predict: int, dense: bool = True,
) -> dict[str, torch.Tensor]:
    """Stack per-row arrays [B, L] into the PLM batch dict (see module docstring); vectorized over B and L.
    dense=False leaves out perm_mask and target_mapping (`densify` builds them from the ranks and target_index)."""
    pos, valid, labels = target_slots(input_ids, target, num_predict)
    batch = {
        "input_ids": _long(input_ids),
        "token_type_ids": _long(token_type_ids),
        "labels": _long(labels),
        "target_mask": torch.from_numpy(valid.astype(np.float32)),
        "is_masked": torch.from_numpy(np.ascontiguousarray(target)),
        "perm_q_rank": _long(q_rank),
        "perm_k_rank": _long(k_rank),
        "target_index": _long(np.where(valid, pos, -1)),
    }
    return {**batch, **densify(batch)} if dense else batch


def mlm_inputs(input_ids: np.ndarray, target: np.ndarray, rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    """BERT's corruption of one row's targets: MLM_MASK of them become <mask>, MLM_RANDOM a random ordinary
    piece (ids NUM_SPECIAL..vocab_size-1), the rest stay; everything else is untouched."""
    u = rng.random(len(input_ids))
    out = np.array(input_ids, dtype=np.int64)
    out[target & (u < MLM_MASK)] = MASK_ID
    rand = target & (u >= MLM_MASK) & (u < MLM_MASK + MLM_RANDOM)
    out[rand] = rng.integers(NUM_SPECIAL, vocab_size, int(rand.sum()))
    return out


def part_ranks(bsz: int, seq_len: int, reuse_len: int) -> tuple[Tensor, Tensor]:
    """(q, k) ranks [B, L] of PLM's part blocks alone: each part sees itself both ways, the new part also sees the
    reused part, the reused part never the new part (its states are the next sample's memory, and the new part's
    text is the next sample's reused part: seeing it would carry the next sample's targets into the memory)."""
    new = (torch.arange(seq_len) >= reuse_len).long().repeat(bsz, 1)
    return new + 1, new


def mlm_batch(input_ids: np.ndarray, corrupted: np.ndarray, token_type_ids: np.ndarray, target: np.ndarray,
              num_predict: int, reuse_len: int, dense: bool = True) -> dict[str, torch.Tensor]:
    """Masked-LM batch [B, L]: the corrupted rows as input, the original tokens at the targets as labels, and the
    part blocks (`part_ranks`) as perm ranks."""
    pos, valid, labels = target_slots(input_ids, target, num_predict)
    q_rank, k_rank = part_ranks(*input_ids.shape, reuse_len)
    batch = {
        "input_ids": _long(corrupted),
        "token_type_ids": _long(token_type_ids),
        "target_positions": _long(pos),
        "labels": _long(labels),
        "target_mask": torch.from_numpy(valid.astype(np.float32)),
        "is_masked": torch.from_numpy(np.ascontiguousarray(target)),
        "perm_q_rank": q_rank,
        "perm_k_rank": k_rank,
    }
    return {**batch, **densify(batch)} if dense else batch


def pick_span(target: np.ndarray, rng: np.random.Generator, max_ngram: int) -> np.ndarray:
    """[begin, end) of one masked n-gram of a row: a run of consecutive targets drawn uniformly, cut to its first
    max_ngram pieces (adjacent spans merge into one run)."""
    starts = np.flatnonzero(target & ~np.concatenate([[False], target[:-1]]))
    begin = int(starts[rng.integers(len(starts))])
    end = begin
    while end < len(target) and target[end] and end - begin < max_ngram:
        end += 1
    return np.array([begin, end])


def infoword_batch(input_ids: np.ndarray, corrupted: np.ndarray, token_type_ids: np.ndarray, target: np.ndarray,
                   num_predict: int, spans: np.ndarray, max_ngram: int, reuse_len: int,
                   dense: bool = True) -> dict[str, torch.Tensor]:
    """The masked-LM batch with `<cls>` as an extra (unlabeled) slot, and each row's n-gram as a sentence of its
    own: [padding | n-gram | <sep> | <cls>] (module docstring)."""
    from xlnet.tasks import layout

    batch = mlm_batch(input_ids, corrupted, token_type_ids, target, num_predict, reuse_len, dense)
    bsz, seq_len = input_ids.shape
    batch["target_positions"] = torch.cat([batch["target_positions"], torch.full((bsz, 1), seq_len - 1)], 1)
    batch["labels"] = torch.cat([batch["labels"], torch.full((bsz, 1), -100)], 1)
    batch["target_mask"] = torch.cat([batch["target_mask"], torch.zeros(bsz, 1)], 1)
    grams = [layout(input_ids[row, begin:end].tolist(), None, max_ngram + 2) for row, (begin, end) in enumerate(spans)]
    batch.update(span_ids=torch.tensor([g["input_ids"] for g in grams]),
                 span_type_ids=torch.tensor([g["token_type_ids"] for g in grams]),
                 span_mask=torch.tensor([g["attention_mask"] for g in grams], dtype=torch.float32))
    return batch


def clm_batch(input_ids: np.ndarray, token_type_ids: np.ndarray, target: np.ndarray | None = None,
              num_predict: int = 0, dense: bool = True) -> dict[str, torch.Tensor]:
    """Left-to-right batch [B, L]: the identity order as ranks (q = k: i sees j < i, the content stream also
    itself), position i predicts token i + 1; with `target`, only the targets are predicted (target i from
    position i - 1; a target at position 0 has no left context and becomes a padding slot)."""
    bsz, seq_len = input_ids.shape
    order = torch.arange(seq_len).repeat(bsz, 1)
    ids = _long(input_ids)
    if target is None:
        positions, labels, valid = order[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.ones(bsz, seq_len - 1)
    else:
        pos, ok, gold = target_slots(input_ids, target, num_predict)
        ok &= pos > 0
        positions, labels = _long(np.where(ok, pos - 1, 0)), _long(np.where(ok, gold, -100))
        valid = torch.from_numpy(ok.astype(np.float32))
    batch = {
        "input_ids": ids,
        "token_type_ids": _long(token_type_ids),
        "target_positions": positions,
        "labels": labels,
        "target_mask": valid,
        "perm_q_rank": order,
        "perm_k_rank": order,
    }
    return {**batch, **densify(batch)} if dense else batch


def make_plm_batch(
    input_ids: np.ndarray, token_type_ids: np.ndarray, is_masked: np.ndarray, *,
    reuse_len: int, num_predict: int, perm_size: int | None = None,
    rng: np.random.Generator | Sequence[np.random.Generator] | int = 0,
) -> dict[str, torch.Tensor]:
    """Batch dict from handcrafted rows [B, L]: is_masked as the span sampler would give (may include
    <sep>/<cls>, which are dropped); rng is one generator, one per row, or a seed."""
    input_ids = np.asarray(input_ids)
    is_masked = np.asarray(is_masked, dtype=bool)
    bsz = input_ids.shape[0]
    ps = reuse_len if perm_size is None else perm_size
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    rngs = [rng] * bsz if isinstance(rng, np.random.Generator) else list(rng)
    rows = [row_perm_ranks(input_ids[b], is_masked[b], reuse_len, ps, rngs[b]) for b in range(bsz)]
    q, k, t = (np.stack(x) for x in zip(*rows))
    return assemble_batch(input_ids, np.asarray(token_type_ids), q, k, t, num_predict)


def layout_sample(reuse: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[reuse | A <sep> | B <sep> | <cls>] and its segment ids (reuse, A, first <sep>: 0; B, <sep>: 1; <cls>: 2)."""
    ids = np.concatenate([reuse, a, [SEP_ID], b, [SEP_ID], [CLS_ID]]).astype(np.int64)
    seg = np.concatenate([
        np.zeros(len(reuse) + len(a) + 1, np.int64), np.ones(len(b) + 1, np.int64), [2]
    ])
    return ids, seg


# ---------------------------------------------------------------------------------------------- sampler

BATCH_FIELDS = ("input_ids", "token_type_ids", "q_rank", "k_rank", "target", "mlm_input_ids", "span")  # of row_example


class PLMSampler:
    """Infinite iterator of PLM batches over a corpus; see the module docstring for the row layout."""

    def __init__(
        self, tokens: np.ndarray, sent_ids: np.ndarray, word_start: np.ndarray, cfg: PLMConfig,
        total_rows: int | None = None, rows: slice | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        bsz = cfg.batch_size
        self.total_rows = bsz if total_rows is None else int(total_rows)
        if self.total_rows <= 0 or self.total_rows % bsz:
            raise XLNetError(f"total_rows={self.total_rows} must be a positive multiple of batch_size={bsz}")
        rows = slice(0, self.total_rows) if rows is None else rows
        start, stop, stride = rows.indices(self.total_rows)
        if stride != 1 or start % bsz or (stop - start) % bsz or stop <= start:
            raise XLNetError(f"rows={rows} must be a non-empty run of whole batch_size={bsz} chunks of 0..{self.total_rows}")
        self.rows = (start, stop)
        self._word_start = self._check_corpus(tokens, sent_ids, word_start)
        n_streams = self.total_rows // 2 if cfg.bi_data else self.total_rows
        self.stream_len = len(tokens) // n_streams
        if self.stream_len < cfg.seq_len:
            raise XLNetError(
                f"corpus of {len(tokens)} tokens is too small: {n_streams} streams need >= seq_len={cfg.seq_len} tokens each"
            )
        used = n_streams * self.stream_len  # reference batchify drops the tail
        self._tok = np.asarray(tokens)[:used].reshape(n_streams, self.stream_len)
        self._sent = np.asarray(sent_ids, dtype=bool)[:used].reshape(n_streams, self.stream_len)
        self._bounds = [sentence_boundaries(s) for s in self._sent]
        self.steps_per_epoch = (self.stream_len - cfg.seq_len) // cfg.reuse_len + 1
        self.step = 0  # global step (all rows)
        self.micro = 0  # index of the next micro-batch within the step

    @classmethod
    def for_rank(
        cls, tokens: np.ndarray, sent_ids: np.ndarray, word_start: np.ndarray, cfg: PLMConfig, *,
        world_size: int = 1, rank: int = 0, accum_steps: int = 1,
    ) -> "PLMSampler":
        """Rank `rank` of `world_size`, each doing `accum_steps` micro-batches of cfg.batch_size rows per step."""
        if not 0 <= rank < world_size or accum_steps < 1:
            raise XLNetError(f"bad process layout: rank={rank} world_size={world_size} accum_steps={accum_steps}")
        per_rank = cfg.batch_size * accum_steps
        return cls(tokens, sent_ids, word_start, cfg, total_rows=per_rank * world_size,
                   rows=slice(rank * per_rank, (rank + 1) * per_rank))

    @staticmethod
    def _check_corpus(tokens: np.ndarray, sent_ids: np.ndarray, word_start: np.ndarray) -> np.ndarray:
        if np.ndim(tokens) != 1 or np.shape(tokens) != np.shape(sent_ids):
            raise XLNetError(f"tokens {np.shape(tokens)} and sent_ids {np.shape(sent_ids)} must be aligned 1-D arrays")
        ws = np.asarray(word_start, dtype=bool).copy()
        if ws.ndim != 1 or (len(tokens) and int(np.max(tokens)) >= len(ws)):
            raise XLNetError(f"word_start (size {ws.size}) must be 1-D and cover every token id")
        ws[:NUM_SPECIAL] = True  # "<...>" pieces are starts in the reference
        return ws

    # -------------------------------------------------------------------------------- layout / samples

    @property
    def micro_batches_per_step(self) -> int:
        return (self.rows[1] - self.rows[0]) // self.cfg.batch_size

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def stream_of(self, row: int) -> tuple[int, bool]:
        """(forward stream index, reversed?) read by global row `row`."""
        if not self.cfg.bi_data:
            return row, False
        half = self.cfg.batch_size // 2
        chunk, k = divmod(row, self.cfg.batch_size)
        return chunk * half + k % half, k >= half

    def stream(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, sent_ids) of the stream global row `row` reads (a reversed view for backward rows)."""
        s, rev = self.stream_of(row)
        return (self._tok[s][::-1], self._sent[s][::-1]) if rev else (self._tok[s], self._sent[s])

    def _stream_bounds(self, row: int) -> np.ndarray:
        s, rev = self.stream_of(row)
        # boundary c of the reversed stream <-> boundary stream_len - c of the forward one
        return (self.stream_len - self._bounds[s])[::-1] if rev else self._bounds[s]

    def row_example(self, row: int, step: int) -> dict[str, np.ndarray]:
        """Global row `row` at global step `step`: numpy arrays input_ids, token_type_ids, is_masked (as
        sampled, may include <sep>/<cls>), q_rank, k_rank, target, and the stream offsets a/b (for tests)."""
        cfg = self.cfg
        R, L = cfg.reuse_len, cfg.seq_len
        tok, _ = self.stream(row)
        _, reverse = self.stream_of(row)
        rng = np.random.default_rng([cfg.seed, row, step])  # independent of how rows are split over processes
        i = (step % self.steps_per_epoch) * R
        a0, a1, b0, b1, is_next = split_a_b(
            self.stream_len, self._stream_bounds(row), i + R, L - R - 3, rng, cfg.sample_b_random_prob
        )
        ids, seg = layout_sample(tok[i:i + R], tok[a0:a1], tok[b0:b1])
        n0, n1 = cfg.num_predict_split
        kw = dict(reverse=reverse, max_ngram=cfg.max_ngram, mask_alpha=cfg.mask_alpha, mask_beta=cfg.mask_beta)
        is_masked = np.concatenate([
            sample_span_mask(ids[:R], self._word_start, n0, rng, **kw),
            sample_span_mask(ids[R:], self._word_start, n1, rng, **kw),
        ])
        q, k, t = row_perm_ranks(ids, is_masked, R, cfg.resolved_perm_size, rng)
        ex = dict(input_ids=ids, token_type_ids=seg, is_masked=is_masked, q_rank=q, k_rank=k, target=t,
                  reuse_begin=np.int64(i), a=np.array([a0, a1]), b=np.array([b0, b1]), is_next=np.bool_(is_next))
        if cfg.objective in ("mlm", "infoword"):  # drawn last: the targets and orders stay those of the PLM sample
            ex["mlm_input_ids"] = mlm_inputs(ids, t, rng, len(self._word_start))
        if cfg.objective == "infoword":  # after the corruption: "mlm"'s batch but for the n-gram, masked out whole
            ex["span"] = begin, end = pick_span(t, rng, cfg.max_ngram)
            ex["mlm_input_ids"][begin:end] = MASK_ID
        return ex

    def batch(self, step: int, first_row: int, dense: bool = True) -> dict[str, torch.Tensor]:
        """The batch of rows first_row .. first_row + batch_size - 1 at global step `step` (pure function);
        dense=False: without perm_mask and target_mapping (see `densify`)."""
        ex = [self.row_example(r, step) for r in range(first_row, first_row + self.cfg.batch_size)]
        st = {key: np.stack([e[key] for e in ex]) for key in ex[0] if key in BATCH_FIELDS}
        ids, seg, target, n_pred = st["input_ids"], st["token_type_ids"], st["target"], self.cfg.num_predict
        if self.cfg.objective == "mlm":
            return mlm_batch(ids, st["mlm_input_ids"], seg, target, n_pred, self.cfg.reuse_len, dense)
        if self.cfg.objective == "infoword":
            return infoword_batch(ids, st["mlm_input_ids"], seg, target, n_pred, st["span"], self.cfg.max_ngram,
                                  self.cfg.reuse_len, dense)
        if self.cfg.objective == "clm":
            return clm_batch(ids, seg, target if self.cfg.clm_predict == "targets" else None, n_pred, dense)
        if self.cfg.factorization_order == "left-to-right":  # the targets as drawn, the order fixed
            order = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            return assemble_batch(ids, seg, order, order, target, n_pred, dense)
        return assemble_batch(ids, seg, st["q_rank"], st["k_rank"], target, n_pred, dense)

    # ------------------------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def batch_at(self, step: int, micro: int, dense: bool = True) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` of this sampler's rows at global step `step` (pure function)."""
        return self.batch(step, self.rows[0] + micro * self.cfg.batch_size, dense)

    def position_after(self, step: int, micro: int) -> tuple[int, int]:
        """The (step, micro) that follows (step, micro)."""
        return (step + 1, 0) if micro + 1 == self.micro_batches_per_step else (step, micro + 1)

    def advance(self) -> None:
        """Move past the current micro-batch without building it (a Prefetcher built it)."""
        self.step, self.micro = self.position_after(self.step, self.micro)

    def __next__(self) -> dict[str, torch.Tensor]:
        out = self.batch_at(self.step, self.micro)
        self.advance()
        return out

    def _fingerprint(self) -> dict:
        return {"cfg": dataclasses.asdict(self.cfg), "total_rows": self.total_rows, "stream_len": self.stream_len}

    def state_dict(self) -> dict:
        """JSON-serializable resume point; all randomness is a function of (seed, row, step), so this suffices."""
        return {"version": STATE_VERSION, "step": self.step, "micro": self.micro, "rows": list(self.rows),
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise XLNetError(f"PLM sampler state has version {state.get('version')}, expected {STATE_VERSION}")
        mine = self._fingerprint()
        # states from before objectives (clm_predict, factorization_order) were plm runs in a random order
        state = {**state, "cfg": {"objective": "plm", "clm_predict": "all", "factorization_order": "random",
                                  **state.get("cfg", {})}}
        for key, val in mine.items():
            if state.get(key) != val:
                raise XLNetError(f"PLM sampler state does not match this sampler: {key} {state.get(key)} != {val}")
        # the step is global, so another rank's (or layout's) state resumes us too, but only at a step boundary
        if int(state["micro"]) and list(state.get("rows", [])) != list(self.rows):
            raise XLNetError("PLM sampler state was saved mid-step by a sampler over other rows; save at a step boundary")
        self.step, self.micro = int(state["step"]), int(state["micro"])


_WORKER_SAMPLER: "PLMSampler | None" = None  # in a Prefetcher's worker process: its copy of the sampler


def _start_worker(sampler: "PLMSampler") -> None:
    global _WORKER_SAMPLER
    _WORKER_SAMPLER = sampler  # forked: the parent's object as it was, corpus arrays shared; spawned: unpickled
    # Ctrl-C and SIGTERM are the trainer's (it saves, then closes the pool); one thread for the numpy and the
    # small torch ops (the process is the parallelism)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def _worker_batch(step: int, micro: int, dense: bool, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    # numpy arrays travel by value through the result pipe (tensors would go through shared-memory files)
    return {k: v.numpy() for k, v in _keep(_WORKER_SAMPLER.batch_at(step, micro, dense), keys).items()}


def _keep(batch: dict, keys: tuple[str, ...] | None) -> dict:
    return batch if keys is None else {k: v for k, v in batch.items() if k in keys}


def _pin_thread(device: torch.device) -> None:
    if device.index is not None:  # pinned buffers for this process's GPU, not a context on GPU 0 from every rank
        torch.cuda.set_device(device.index)


class Prefetcher:
    """Iterates a PLMSampler with the next `depth` batches built by a worker process (depth 0: inline). The
    sampler moves only as batches are consumed, so its state_dict stays the resume point.

    A process, not a thread: on a GPU the host launches the training step, and a thread building batches (7-14
    ms of mostly Python for 16 rows of 512) takes the GIL from it; with the launching thread busy for most of the
    step, a prefetching thread made each step slower than building its batch inline (benchmarks/data_pipeline.py).
    On Linux the worker is forked (the corpus arrays are shared, not copied); it holds the sampler as it was
    when the Prefetcher was made. keys: the fields to keep; dense: as `PLMSampler.batch`
    (False: the compact batch, a few hundred KB at the GPU shape instead of 19 MB); device: a CUDA device makes
    page-locked copies (so that `.to(device, non_blocking=True)` is asynchronous), made by a thread of this
    process with that device current (the copy runs without the GIL)."""

    def __init__(self, sampler: PLMSampler, depth: int = 2, device: torch.device | None = None,
                 keys: Sequence[str] | None = None, dense: bool = True) -> None:
        self.sampler, self.keys, self.dense = sampler, None if keys is None else tuple(keys), dense
        self.pin = device is not None and device.type == "cuda"
        self._cursor = (sampler.step, sampler.micro)  # the next position to submit
        self._procs = self._pins = None
        if depth > 0:
            # fork on Linux (macOS frameworks are not fork-safe: there the sampler is pickled into a fresh process)
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._procs = ProcessPoolExecutor(1, mp_context=mp.get_context(method), initializer=_start_worker,
                                              initargs=(sampler,))
            if self.pin:
                self._pins = ThreadPoolExecutor(1, thread_name_prefix="plm-pin", initializer=_pin_thread,
                                                initargs=(device,))
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()
        for _ in range(depth):
            self._submit()

    def _tensors(self, batch: dict[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        batch = {k: torch.as_tensor(v) for k, v in batch.items()}
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def _submit(self) -> None:
        pos = self._cursor
        self._cursor = self.sampler.position_after(*pos)
        future = self._procs.submit(_worker_batch, *pos, self.dense, self.keys)
        if self._pins is not None:  # waits for the worker, then pins, off the main thread
            future = self._pins.submit(lambda done=future: self._tensors(done.result()))
        self._pending.append((pos, future))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        here = (self.sampler.step, self.sampler.micro)
        if self._procs is None:
            batch = self._tensors(_keep(self.sampler.batch_at(*here, self.dense), self.keys))
        else:
            pos, future = self._pending.popleft()
            if pos != here:
                raise XLNetError(f"the sampler moved under its prefetcher (at {here}, prefetched {pos})")
            try:
                batch = future.result()  # re-raises the worker's error here
                self._submit()
            except BrokenProcessPool:
                raise XLNetError("the process building batches died (out of memory? killed?); --prefetch 0 "
                                 "builds them in the training process") from None
            batch = batch if self._pins is not None else self._tensors(batch)
        self.sampler.advance()
        return batch

    def close(self) -> None:
        for pool in (self._pins, self._procs):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._procs = self._pins = None
        self._pending.clear()
