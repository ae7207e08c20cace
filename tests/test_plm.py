"""Tests of the PLM data pipeline (xlnet.data.plm) against the reference data_utils semantics.

The `_ref_*` helpers are literal loop-by-loop restatements of the reference algorithms (written here as
oracles) that draw random numbers in the same order as the vectorized code, so the two must agree exactly.
The reference itself is the oracle too: tests/data/original_plm.npz holds what zihangdai/xlnet's data_utils
computed (its A/B split and span sampler on recorded random draws, its record parser with recorded
permutations).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xlnet.data.plm import (
    CLS_ID, SEP_ID, PLMConfig, PLMSampler, Prefetcher, densify, layout_sample, make_plm_batch, perm_mask_from_ranks,
    sample_span_mask, sample_spans, sentence_boundaries, split_a_b, truncate_pair,
)
from xlnet.errors import XLNetError

VOCAB = 100
EOD = 7


def make_corpus(seed: int, n_tokens: int = 6000, max_sent: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random corpus: sentences of 1..max_sent pieces, <eod> after every few sentences, random word starts."""
    rng = np.random.default_rng(seed)
    toks, sents, flag = [], [], True
    while len(toks) < n_tokens:
        n = int(rng.integers(1, max_sent + 1))
        toks.extend(rng.integers(9, VOCAB, n).tolist())
        sents.extend([flag] * n)
        flag = not flag
        if rng.random() < 0.2:  # document end: <eod> is its own "line" like in the reference
            toks.append(EOD)
            sents.append(flag)
            flag = not flag
    word_start = rng.random(VOCAB) < 0.6
    return np.array(toks, dtype=np.int64), np.array(sents, dtype=bool), word_start


SMALL = dict(seq_len=64, reuse_len=32, num_predict=12, batch_size=4)


# ------------------------------------------------------------------------------------------ oracles


def _ref_truncate(a: int, b: int, tot: int) -> tuple[int, int]:
    while a + b > tot:
        if a > b:
            a -= 1
        else:
            b -= 1
    return a, b


def _ref_split(sent: np.ndarray, begin: int, tot_len: int, rng: np.random.Generator, p: float):
    """Reference _split_a_and_b with python loops (same RNG draw order as split_a_b)."""
    n = len(sent)
    end_idx, cuts = begin + 1, []
    while end_idx < n:
        if sent[end_idx] != sent[end_idx - 1]:
            if end_idx - begin >= tot_len:
                break
            cuts.append(end_idx)
        end_idx += 1
    if len(cuts) == 0 or rng.random() < p:
        a_end = end_idx if not cuts else cuts[rng.integers(len(cuts))]
        b_len = max(1, tot_len - (a_end - begin))
        b_begin = int(rng.integers(0, n - 1 - b_len, endpoint=True))
        b_end = b_begin + b_len
        while b_begin > 0 and sent[b_begin - 1] == sent[b_begin]:
            b_begin -= 1
        while b_end < n - 1 and sent[b_end - 1] == sent[b_end]:
            b_end += 1
        nxt = False
    else:
        a_end = cuts[rng.integers(len(cuts))]
        b_begin, b_end, nxt = a_end, end_idx, True
    a_len, b_len = _ref_truncate(a_end - begin, b_end - b_begin, tot_len)
    return begin, begin + a_len, b_begin, b_begin + b_len, nxt


def _ref_spans(seg, word_start, goal, rng, max_ngram, alpha, beta):
    """Reference _sample_mask span loop (with its piece-counting end loop), same draws as sample_spans."""
    p = 1.0 / np.arange(1, max_ngram + 1)
    cdf = np.cumsum(p / p.sum())
    spans, num, cur, n_tok = [], 0, 0, len(seg)
    while cur < n_tok:
        if num >= goal:
            break
        n = min(int(np.searchsorted(cdf, rng.random(), side="right")) + 1, max_ngram)
        n = min(n, goal - num)
        ctx = int(n * alpha // beta)
        l_ctx = int(rng.integers(ctx))
        beg = cur + l_ctx
        while beg < n_tok and not word_start[seg[beg]]:
            beg += 1
        if beg >= n_tok:
            break
        end, cnt = beg + 1, 1
        while end < n_tok:
            if word_start[seg[beg]]:  # sic: the reference tests seg[beg], so it counts pieces
                cnt += 1
                if cnt > n:
                    break
            end += 1
        if end >= n_tok:
            break
        spans.append((beg, end))
        num += end - beg
        cur = end + ctx - l_ctx
    return spans


def _ref_local_perm_mask(inputs, is_masked, sigma):
    """Reference _local_perm mask formula for one part, given the shuffled index permutation sigma."""
    n, ps = len(inputs), len(sigma)
    index = np.arange(n).reshape(-1, ps).T[sigma].T.reshape(-1)  # tf reshape/transpose/shuffle/transpose
    func = (inputs == SEP_ID) | (inputs == CLS_ID)
    non_mask = ~is_masked & ~func
    rev = np.where(non_mask, -1, index)
    target = is_masked & ~func
    self_rev = np.where(target, rev, rev + 1)
    return (self_rev[:, None] <= rev[None, :]) & ~non_mask[None, :]


# --------------------------------------------------------------------------------- unit: split/masks


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 300))
def test_truncate_pair_matches_reference_loop(a, b, tot):
    assert truncate_pair(a, b, tot) == _ref_truncate(a, b, tot)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(8, 60), st.floats(0, 1))
def test_split_a_b_matches_reference(seed, max_sent, tot_len, p):
    _, sent, _ = make_corpus(seed, n_tokens=400, max_sent=max_sent)
    rng = np.random.default_rng(seed)
    begin = int(rng.integers(0, len(sent) - tot_len - 4))
    got = split_a_b(len(sent), sentence_boundaries(sent), begin, tot_len, np.random.default_rng(seed), p)
    ref = _ref_split(sent, begin, tot_len, np.random.default_rng(seed), p)
    assert got == ref
    a0, a1, b0, b1, nxt = got
    assert a0 == begin and a1 > a0 and b1 > b0 and (a1 - a0) + (b1 - b0) <= tot_len


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 40), st.sampled_from([(6, 1), (5, 1), (4, 2)]))
def test_sample_spans_match_reference_and_properties(seed, max_ngram, goal, ab):
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, VOCAB, int(rng.integers(5, 200)))
    ws = rng.random(VOCAB) < 0.5
    spans = sample_spans(seg, ws, goal, np.random.default_rng(seed), max_ngram, *ab)
    assert spans == _ref_spans(seg, ws, goal, np.random.default_rng(seed), max_ngram, *ab)
    assert sum(e - b for b, e in spans) <= goal
    prev_end = -1
    for beg, end in spans:
        assert ws[seg[beg]], "spans start at word starts"
        assert 1 <= end - beg <= max_ngram
        assert beg > prev_end, "spans are separated by at least one context token"
        assert end < len(seg)
        prev_end = end


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.booleans())
def test_sample_span_mask_exact_goal_and_reverse(seed, goal, reverse):
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, VOCAB, 40)
    ws = rng.random(VOCAB) < 0.5
    mask = sample_span_mask(seg, ws, goal, np.random.default_rng(seed), reverse=reverse)
    assert mask.sum() == goal
    # reverse = place the spans on the flipped segment, then flip back
    flipped = sample_span_mask(seg[::-1].copy(), ws, goal, np.random.default_rng(seed), reverse=not reverse)
    assert np.array_equal(mask, flipped[::-1])


def test_layout_sample_segments():
    ids, seg = layout_sample(np.array([10, 11]), np.array([12, 13, 14]), np.array([15]))
    assert ids.tolist() == [10, 11, 12, 13, 14, SEP_ID, 15, SEP_ID, CLS_ID]
    assert seg.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 2]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([4, 8, 16]), st.floats(0, 0.6))
def test_perm_mask_matches_reference_formula(seed, perm_size, p_mask):
    """make_plm_batch == reference _local_perm per part, joined with the ones/zeros blocks of `parser`."""
    rng = np.random.default_rng(seed)
    L, R, bsz = 32, 16, 3
    ids = rng.integers(9, VOCAB, (bsz, L))
    ids[rng.random((bsz, L)) < 0.1] = SEP_ID
    ids[:, -1] = CLS_ID
    masked = rng.random((bsz, L)) < p_mask
    out = make_plm_batch(ids, np.zeros_like(ids), masked, reuse_len=R, num_predict=L, perm_size=perm_size,
                         rng=np.random.default_rng(seed))
    ref_rng = np.random.default_rng(seed)  # one generator shared by the rows, two permutations per row
    for b in range(bsz):
        m0 = _ref_local_perm_mask(ids[b, :R], masked[b, :R], ref_rng.permutation(perm_size))
        m1 = _ref_local_perm_mask(ids[b, R:], masked[b, R:], ref_rng.permutation(perm_size))
        ref = np.block([[m0, np.ones((R, L - R), bool)], [np.zeros((L - R, R), bool), m1]])
        assert np.array_equal(out["perm_mask"][b].numpy().astype(bool), ref)
    func = (ids == SEP_ID) | (ids == CLS_ID)
    assert np.array_equal(out["is_masked"].numpy(), masked & ~func)


def test_make_plm_batch_rejects_too_many_targets():
    ids = np.full((1, 16), 20)
    with pytest.raises(XLNetError):
        make_plm_batch(ids, np.zeros_like(ids), np.ones((1, 16), bool), reuse_len=8, num_predict=4)


# ------------------------------------------------------------------- the original data_utils as the oracle
ORIGINAL = Path(__file__).parent / "data" / "original_plm.npz"  # tests/data/make_original_plm.py made it


@pytest.fixture(scope="module")
def original() -> dict[str, np.ndarray]:
    with np.load(ORIGINAL, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


class Replay:
    """A generator that gives our sampler the draws the original code was given: uniforms as recorded, an
    integer below n as floor(u * n), each permutation as recorded; a top-up picks the first free positions."""

    def __init__(self, uniforms=(), permutations=()) -> None:
        self.u, self.perms, self.used, self.picked = list(uniforms), list(permutations), 0, []

    def random(self) -> float:
        self.used += 1
        return float(self.u[self.used - 1])

    def integers(self, low: int, high: int | None = None, endpoint: bool = False) -> int:
        low, high = (0, low) if high is None else (low, high)
        return low + int(self.random() * (high - low + int(endpoint)))

    def permutation(self, n: int) -> np.ndarray:
        assert len(self.perms[0]) == n
        return self.perms.pop(0)

    def choice(self, pool: np.ndarray, size: int, replace: bool = False) -> np.ndarray:
        self.picked = list(pool[:size])
        return pool[:size]


@pytest.mark.parametrize("case", range(16))
def test_span_sampling_equals_the_original_sample_mask(original, case):
    """The spans data_utils._sample_mask chose from the same draws (its n-gram lengths, contexts, word starts
    read from piece text by its _is_start_piece, reversal for backward rows); then exactly the goal, as its
    top-up gives. Real ids from the embedded corpus and tokenizer."""
    from xlnet.tokenizer import Tokenizer

    word_start = Tokenizer.load(Path(__file__).parents[1] / "src/xlnet/assets/tokenizer").word_start_table()
    seg, (_, goal, reverse) = original[f"span{case}_seg"], original[f"span{case}_case"]
    rng = Replay(original[f"span{case}_uniforms"])
    mask = sample_span_mask(seg, word_start, int(goal), rng, reverse=bool(reverse))
    assert rng.used == len(original[f"span{case}_uniforms"])  # no draw more or less in the span loop
    spans = mask.copy()
    picked = np.asarray(rng.picked, dtype=int)
    spans[len(seg) - 1 - picked if reverse else picked] = False
    assert np.array_equal(spans, original[f"span{case}_spans"])
    assert mask.sum() == original[f"span{case}_mask"].sum() == goal


@pytest.mark.parametrize("case", range(19))
def test_segment_split_equals_the_original_split_a_and_b(original, case):
    """A ends at a sentence boundary (or B is a random sentence-aligned span of the stream, label 0), both cut
    from the right to fit: the original's [begin, end) of A and B, its label, and as many draws, on the
    embedded corpus' sentence ids. (Its 20th case starts too near the stream's end and returns None; the
    sampler never asks for that: a row's last step leaves seq_len tokens.)"""
    begin, tot_len, draws, *want = original["split_cases"][case]
    sent = original["split_sent_ids"]
    rng = Replay(original["split_uniforms"][case])
    a0, a1, b0, b1, is_next = split_a_b(len(sent), sentence_boundaries(sent), int(begin), int(tot_len), rng, 0.5)
    assert [a0, a1, b0, b1, int(is_next)] == list(want) and rng.used == draws


@pytest.mark.parametrize("record", range(12))
def test_factorization_masks_equal_the_original_parser(original, record):
    """get_dataset's record parser with the same permutations: two _local_perm parts (perm_size 8 and 16) joined
    by its ones/zeros blocks, <sep>/<cls> never targets, the num_predict slots in position order with padding;
    perm_mask, target_mapping, targets, target_mask, input_k, input_q."""
    r = {k[len(f"rec{record}_"):]: v for k, v in original.items() if k.startswith(f"rec{record}_")}
    batch = make_plm_batch(r["input"][None], r["seg_id_in"][None], r["is_masked"][None], reuse_len=16,
                           num_predict=12, perm_size=int(r["perm_size"]),
                           rng=[Replay(permutations=[r["sigma0"], r["sigma1"]])])  # one generator per row
    for ours, theirs in [("perm_mask", "perm_mask"), ("target_mapping", "target_mapping"),
                         ("target_mask", "target_mask"), ("input_ids", "input_k"), ("is_masked", "input_q"),
                         ("token_type_ids", "seg_id")]:
        assert np.array_equal(batch[ours][0].numpy().astype(np.float64), r[f"out_{theirs}"].astype(np.float64)), ours
    slots = r["out_target_mask"].astype(bool)
    assert np.array_equal(batch["labels"][0].numpy()[slots], r["out_target"][slots])
    assert (batch["labels"][0].numpy()[~slots] == -100).all()


# ------------------------------------------------------------------------------ batch properties


def check_batch(batch: dict[str, torch.Tensor], cfg: PLMConfig) -> None:
    """All per-sample invariants of a batch (targets, layout, segments, factorization order)."""
    B, L, P, R = cfg.batch_size, cfg.seq_len, cfg.num_predict, cfg.reuse_len
    shapes = dict(input_ids=((B, L), torch.int64), token_type_ids=((B, L), torch.int64),
                  perm_mask=((B, L, L), torch.float32), target_mapping=((B, P, L), torch.float32),
                  labels=((B, P), torch.int64), target_mask=((B, P), torch.float32), is_masked=((B, L), torch.bool),
                  perm_q_rank=((B, L), torch.int64), perm_k_rank=((B, L), torch.int64))
    for key, (shape, dtype) in shapes.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    ids = batch["input_ids"].numpy()
    seg = batch["token_type_ids"].numpy()
    pm = batch["perm_mask"].numpy().astype(bool)
    tmap = batch["target_mapping"].numpy()
    tmask = batch["target_mask"].numpy()
    labels = batch["labels"].numpy()
    target = batch["is_masked"].numpy()
    assert np.array_equal(pm, batch["perm_q_rank"].numpy()[:, :, None] <= batch["perm_k_rank"].numpy()[:, None, :])
    part1 = np.arange(L) >= R
    for b in range(B):
        # layout and segments
        seps = np.flatnonzero(ids[b] == SEP_ID)
        assert len(seps) == 2 and ids[b, -1] == CLS_ID and seps[1] == L - 2 and R < seps[0] < L - 2
        assert (seg[b, :seps[0] + 1] == 0).all() and (seg[b, seps[0] + 1:L - 1] == 1).all() and seg[b, -1] == 2
        func = (ids[b] == SEP_ID) | (ids[b] == CLS_ID)
        # targets: never functional, the new part gets num_predict_split[1] minus dropped <sep>/<cls>
        assert not (target[b] & func).any()
        n0, n1 = cfg.num_predict_split
        assert target[b, :R].sum() == n0 and n1 - 3 <= target[b, R:].sum() <= n1
        pos = np.flatnonzero(target[b])
        k = len(pos)
        assert tmask[b].tolist() == [1.0] * k + [0.0] * (P - k)
        assert np.array_equal(tmap[b, :k], np.eye(L, dtype=np.float32)[pos]) and not tmap[b, k:].any()
        assert np.array_equal(labels[b, :k], ids[b, pos]) and (labels[b, k:] == -100).all()
        # factorization order: targets/functional tokens form a strict total order under "sees"
        K = np.flatnonzero(target[b] | func)
        sees = ~pm[b][np.ix_(K, K)]
        np.fill_diagonal(sees, False)
        order = sees.sum(1)  # how many ordered tokens each sees = its position in the order
        assert sorted(order.tolist()) == list(range(len(K)))
        assert np.array_equal(sees, order[:, None] > order[None, :])
        # the query stream never sees its own token; everything else sees itself
        assert np.array_equal(np.diag(pm[b]), target[b])
        ctx = ~target[b] & ~func
        for i in np.flatnonzero(ctx):
            same = part1 == part1[i]
            assert not pm[b, i, ctx & same].any(), "context tokens see the context of their part"
            assert pm[b, i, (target[b] | func) & same].all(), "context tokens see no ordered token of their part"
        assert pm[b][np.ix_(~part1, part1)].all(), "the reused part never sees the new part"
        assert not pm[b][np.ix_(part1, ~part1)].any(), "the new part sees all of the reused part"


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 1000), st.booleans(), st.sampled_from([(64, 32, 12, 8), (48, 16, 9, 16), (32, 16, 6, 16)]))
def test_sampler_batches_are_valid(corpus_seed, seed, bi_data, shape):
    L, R, P, ps = shape
    tokens, sent, ws = make_corpus(corpus_seed, n_tokens=3000)
    cfg = PLMConfig(seq_len=L, reuse_len=R, num_predict=P, perm_size=ps, batch_size=4, bi_data=bi_data, seed=seed)
    sampler = PLMSampler(tokens, sent, ws, cfg)
    for _ in range(2):
        check_batch(next(sampler), cfg)


# ------------------------------------------------------------------------------ streams and rows


def test_reused_part_continues_previous_sample():
    tokens, sent, ws = make_corpus(1)
    cfg = PLMConfig(**SMALL)
    sampler = PLMSampler(tokens, sent, ws, cfg)
    R = cfg.reuse_len
    batches = [next(sampler)["input_ids"].numpy() for _ in range(6)]
    for row in range(cfg.batch_size):
        stream, _ = sampler.stream(row)
        reused = np.concatenate([b[row, :R] for b in batches])
        assert np.array_equal(reused, stream[: len(reused)]), "reused parts are consecutive stream windows"
        for t in range(5):
            ex = sampler.row_example(row, t)
            a_len = int(ex["a"][1] - ex["a"][0])
            assert ex["a"][0] == (t + 1) * R
            n = min(R, a_len)  # A of sample t starts where the reused part of sample t+1 starts
            assert np.array_equal(batches[t + 1][row, :n], batches[t][row, R:R + n])


def test_streams_follow_batchify_and_wrap_into_new_epoch():
    tokens, sent, ws = make_corpus(2, n_tokens=2000)
    cfg = PLMConfig(**SMALL)
    sampler = PLMSampler(tokens, sent, ws, cfg, total_rows=8)
    n = len(tokens) // 8
    assert sampler.stream_len == n
    for row in range(8):
        assert np.array_equal(sampler.stream(row)[0], tokens[row * n:(row + 1) * n])
    assert sampler.steps_per_epoch == (n - cfg.seq_len) // cfg.reuse_len + 1
    last = sampler.steps_per_epoch - 1
    assert sampler.row_example(0, last)["reuse_begin"] + cfg.seq_len <= n
    assert sampler.row_example(0, last + 1)["reuse_begin"] == 0
    sampler.load_state_dict({**sampler.state_dict(), "step": last + 1})
    assert sampler.epoch == 1


def test_two_ranks_equal_one_rank_with_accumulation():
    tokens, sent, ws = make_corpus(4)
    for bi in (False, True):
        cfg = PLMConfig(**SMALL, bi_data=bi, seed=5)
        single = PLMSampler.for_rank(tokens, sent, ws, cfg, world_size=1, accum_steps=2)
        ranks = [PLMSampler.for_rank(tokens, sent, ws, cfg, world_size=2, rank=r) for r in range(2)]
        assert single.micro_batches_per_step == 2 and single.total_rows == ranks[0].total_rows == 8
        for _ in range(3):
            for r in range(2):
                a, b = next(single), next(ranks[r])
                for key in a:
                    assert torch.equal(a[key], b[key]), key


def test_bi_data_rows_are_reversed_copies():
    tokens, sent, ws = make_corpus(5)
    cfg = PLMConfig(**SMALL, bi_data=True)
    sampler = PLMSampler(tokens, sent, ws, cfg, total_rows=8)
    half, R = cfg.batch_size // 2, cfg.reuse_len
    assert sampler.stream_len == len(tokens) // 4
    first = next(sampler)["input_ids"].numpy()
    for chunk in range(2):
        for k in range(half):
            fwd, bwd = chunk * cfg.batch_size + k, chunk * cfg.batch_size + half + k
            f_tok, f_sent = sampler.stream(fwd)
            b_tok, b_sent = sampler.stream(bwd)
            assert np.array_equal(b_tok, f_tok[::-1]) and np.array_equal(b_sent, f_sent[::-1])
            s = chunk * half + k
            assert np.array_equal(f_tok, tokens[s * sampler.stream_len:(s + 1) * sampler.stream_len])
    for k in range(half):
        assert np.array_equal(first[half + k, :R], sampler.stream(k)[0][::-1][:R])


def test_bi_data_needs_even_batch():
    tokens, sent, ws = make_corpus(0)
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws, PLMConfig(**{**SMALL, "batch_size": 3}, bi_data=True))


@pytest.mark.parametrize("bad", [
    dict(perm_size=12), dict(reuse_len=61), dict(seed=-1), dict(num_predict=100), dict(mask_alpha=0.5), dict(batch_size=0),
])
def test_bad_config_is_user_error(bad):
    tokens, sent, ws = make_corpus(0)
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws, PLMConfig(**{**SMALL, **bad}))


def test_special_pieces_always_count_as_word_starts():
    """The reference treats every "<...>" piece (ids 0..8) as a word start whatever the caller passes."""
    tokens, sent, _ = make_corpus(0)
    sampler = PLMSampler(tokens, sent, np.zeros(VOCAB, bool), PLMConfig(**SMALL))
    assert sampler._word_start[:9].all() and not sampler._word_start[9:].any()
    check_batch(next(sampler), sampler.cfg)


def test_bad_layout_and_corpus_are_user_errors():
    tokens, sent, ws = make_corpus(0, n_tokens=500)
    cfg = PLMConfig(**SMALL)
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws, cfg, total_rows=6)
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws, cfg, total_rows=8, rows=slice(2, 6))
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws, cfg, total_rows=64)  # streams shorter than seq_len
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent[:-1], ws, cfg)
    with pytest.raises(XLNetError):
        PLMSampler(tokens, sent, ws[:50], cfg)


# ------------------------------------------------------------------------------ determinism / resume


def _take(sampler: PLMSampler, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(sampler) for _ in range(n)]


def _same(xs, ys) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in x)


def test_deterministic_for_a_seed():
    tokens, sent, ws = make_corpus(6)
    mk = lambda seed: PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, seed=seed))  # noqa: E731
    assert _same(_take(mk(1), 3), _take(mk(1), 3))
    assert not _same(_take(mk(1), 3), _take(mk(2), 3))


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_from_state(accum):
    tokens, sent, ws = make_corpus(7)
    cfg = PLMConfig(**SMALL, seed=3)
    a = PLMSampler.for_rank(tokens, sent, ws, cfg, accum_steps=accum)
    _take(a, 5)  # with accum=2 this stops mid-step
    state = json.loads(json.dumps(a.state_dict()))
    expected = _take(a, 3)
    b = PLMSampler.for_rank(tokens, sent, ws, cfg, accum_steps=accum)
    b.load_state_dict(state)
    assert _same(_take(b, 3), expected)


def test_state_from_other_sampler_is_rejected():
    tokens, sent, ws = make_corpus(7)
    a = PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, seed=3))
    b = PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, seed=4))
    with pytest.raises(XLNetError):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_yields_the_samplers_batches_and_keeps_its_state(depth):
    """Batches built ahead by a worker process are the sampler's own, in order (across micro-batches of a step),
    and the sampler's state is that of the batches consumed: a checkpoint resumes at the right batch."""
    tokens, sent, ws = make_corpus(8)
    cfg = PLMConfig(**SMALL, seed=5)
    plain = PLMSampler.for_rank(tokens, sent, ws, cfg, accum_steps=2)
    ahead = Prefetcher(PLMSampler.for_rank(tokens, sent, ws, cfg, accum_steps=2), depth=depth,
                       keys=("input_ids", "perm_q_rank", "perm_k_rank"))
    for _ in range(5):  # stops mid-step
        want, got = next(plain), next(ahead)
        assert set(got) == {"input_ids", "perm_q_rank", "perm_k_rank"}
        assert all(torch.equal(got[k], want[k]) for k in got)
        assert ahead.sampler.state_dict() == plain.state_dict()
        assert torch.equal(perm_mask_from_ranks(got["perm_q_rank"], got["perm_k_rank"]), want["perm_mask"])
    ahead.close()
    resumed = PLMSampler.for_rank(tokens, sent, ws, cfg, accum_steps=2)
    resumed.load_state_dict(json.loads(json.dumps(ahead.sampler.state_dict())))
    again = Prefetcher(resumed, depth=depth)
    assert _same(_take(again, 3), _take(plain, 3))
    again.close()


@pytest.mark.parametrize("depth,platform", [(0, "linux"), (2, "linux"), (2, "darwin")])
def test_prefetcher_builds_compact_batches(depth, platform, monkeypatch):
    """dense=False (what `xlnet pretrain` asks for): the sampler's compact batches, only the fields asked for; a
    forked worker on Linux, elsewhere a fresh process with the sampler pickled in."""
    monkeypatch.setattr(sys, "platform", platform)
    tokens, sent, ws = make_corpus(8)
    cfg = PLMConfig(**SMALL, seed=5)
    plain = PLMSampler(tokens, sent, ws, cfg)
    keys = ("input_ids", "labels", "target_index", "perm_q_rank", "perm_k_rank")
    ahead = Prefetcher(PLMSampler(tokens, sent, ws, cfg), depth=depth, keys=keys, dense=False)
    for step in range(3):
        got, want = next(ahead), plain.batch_at(step, 0, dense=False)
        assert set(got) == set(keys) and all(torch.equal(got[k], want[k]) for k in keys)
    ahead.close()


def test_prefetcher_pins_in_a_thread_of_its_own(monkeypatch):
    """For a CUDA device the worker's arrays become page-locked tensors in the prefetcher's pinning thread, never
    the training thread; in order, and the worker's errors still arrive (pin_memory stubbed: no GPU here)."""
    pinned_by = []

    def pin(t):
        pinned_by.append(threading.current_thread().name)
        return t.clone()
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    tokens, sent, ws = make_corpus(8)
    cfg = PLMConfig(**SMALL, seed=5)
    plain = PLMSampler(tokens, sent, ws, cfg)
    ahead = Prefetcher(PLMSampler(tokens, sent, ws, cfg), depth=2, device=torch.device("cuda"), dense=False)
    assert _same(_take(ahead, 4), [plain.batch_at(step, 0, dense=False) for step in range(4)])
    ahead.close()
    assert pinned_by and all(name.startswith("plm-pin") for name in pinned_by)

    def broken(step, first_row, dense=True):
        raise XLNetError("corrupt corpus")
    plain.batch = broken
    ahead = Prefetcher(plain, depth=2, device=torch.device("cuda"))
    with pytest.raises(XLNetError, match="corrupt corpus"):
        next(ahead)
    ahead.close()


def test_prefetcher_reports_a_dead_worker():
    """The worker killed (the kernel's OOM killer, say): one clear error, not a BrokenProcessPool traceback."""
    tokens, sent, ws = make_corpus(8)
    ahead = Prefetcher(PLMSampler(tokens, sent, ws, PLMConfig(**SMALL)), depth=1)
    next(ahead)
    for pid in list(ahead._procs._processes):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(XLNetError, match="the process building batches died"):
        for _ in range(3):  # the batch under way when it died may have arrived
            next(ahead)
    ahead.close()


def test_prefetcher_leaves_the_thread_count_alone():
    """The worker process sets its own thread count (one), not the training process's."""
    tokens, sent, ws = make_corpus(8)
    before = torch.get_num_threads()
    ahead = Prefetcher(PLMSampler(tokens, sent, ws, PLMConfig(**SMALL)), depth=2)
    _take(ahead, 3)
    ahead.close()
    assert torch.get_num_threads() == before


def test_prefetcher_reports_the_workers_error_and_a_moved_sampler():
    tokens, sent, ws = make_corpus(8)
    sampler = PLMSampler(tokens, sent, ws, PLMConfig(**SMALL))
    ahead = Prefetcher(sampler, depth=1)
    next(sampler)  # moved behind the prefetcher's back
    with pytest.raises(XLNetError, match="the sampler moved under its prefetcher"):
        next(ahead)
    ahead.close()

    def broken(step, first_row, dense=True):
        raise XLNetError("corrupt corpus")
    sampler.batch = broken
    ahead = Prefetcher(sampler, depth=2)
    with pytest.raises(XLNetError, match="corrupt corpus"):
        next(ahead)
    ahead.close()


# ------------------------------------------------------------------------------------------- objectives


def _samplers(objectives=("plm", "mlm", "clm"), **kw):
    tokens, sent, ws = make_corpus(11)
    return {o: PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, seed=2, objective=o, **kw)) for o in objectives}


@pytest.mark.parametrize("objective,order,clm_predict", [
    ("plm", "random", "all"), ("plm", "left-to-right", "all"), ("clm", "random", "all"), ("clm", "random", "targets"),
    ("mlm", "random", "all"), ("infoword", "random", "all")])
def test_compact_batches_densify_to_the_dense_ones(objective, order, clm_predict):
    """dense=False leaves out perm_mask [B, L, L] and target_mapping [B, P, L] and nothing else; `densify` rebuilds
    them (bit for bit) from the ranks and target_index, whose -1 slots are the padding rows."""
    sampler = _samplers((objective,), factorization_order=order, clm_predict=clm_predict)[objective]
    for step in range(3):
        dense, compact = sampler.batch_at(step, 0), sampler.batch_at(step, 0, dense=False)
        assert set(dense) - set(compact) == ({"perm_mask", "target_mapping"} & set(dense)) and set(compact) <= set(dense)
        assert all(torch.equal(compact[k], dense[k]) for k in compact)
        rebuilt = densify(compact)
        assert not {"perm_q_rank", "perm_k_rank", "target_index"} & set(rebuilt)
        assert all(torch.equal(rebuilt[k], dense[k]) for k in rebuilt)
        if objective == "plm":
            tmap, index = dense["target_mapping"], dense["target_index"]
            assert torch.equal(tmap.sum(-1), dense["target_mask"]) and torch.equal(index == -1, dense["target_mask"] == 0)
            assert torch.equal(tmap.argmax(-1)[index >= 0], index[index >= 0])
            assert (index == -1).any()  # the padding slots are exercised


@pytest.mark.parametrize("bi_data", [False, True])
def test_objectives_see_the_same_samples(bi_data):
    """mlm: PLM's targets and labels at PLM's target positions, corrupted only there; clm: PLM's tokens, the
    identity order, every next token as label."""
    s = _samplers(bi_data=bi_data)
    for _ in range(3):
        plm, mlm, clm = (next(s[o]) for o in ("plm", "mlm", "clm"))
        valid = plm["target_mask"].bool()
        assert torch.equal(mlm["is_masked"], plm["is_masked"]) and torch.equal(mlm["labels"], plm["labels"])
        assert torch.equal(mlm["target_mask"], plm["target_mask"])
        assert torch.equal(mlm["target_positions"][valid], plm["target_mapping"].argmax(-1)[valid])
        assert (mlm["target_positions"][~valid] == 0).all()
        untouched = ~plm["is_masked"]
        assert torch.equal(mlm["input_ids"][untouched], plm["input_ids"][untouched])
        assert (mlm["input_ids"][plm["is_masked"]] != plm["input_ids"][plm["is_masked"]]).any()
        assert "target_mapping" not in mlm
        R, L = SMALL["reuse_len"], SMALL["seq_len"]  # no order, only the reused part kept from the new part
        parts = torch.zeros(L, L)
        parts[:R, R:] = 1
        assert torch.equal(mlm["perm_mask"], parts.expand(len(mlm["input_ids"]), -1, -1))

        ids = plm["input_ids"]
        assert torch.equal(clm["input_ids"], ids) and torch.equal(clm["token_type_ids"], plm["token_type_ids"])
        assert torch.equal(clm["labels"], ids[:, 1:]) and (clm["target_mask"] == 1).all()
        L = ids.shape[1]
        assert torch.equal(clm["target_positions"], torch.arange(L - 1).expand(len(ids), -1))
        future = torch.ones(L, L).triu()  # the query stream's mask; the content stream clears the diagonal
        assert torch.equal(clm["perm_mask"], future.expand(len(ids), -1, -1))
        assert torch.equal(perm_mask_from_ranks(clm["perm_q_rank"], clm["perm_k_rank"]), clm["perm_mask"])


def test_infoword_batches_are_mlm_batches_plus_one_masked_ngram_per_row():
    """The masked-LM batch of "mlm" (same corruption, but the n-gram all <mask> in its sentence), <cls> as an extra
    unlabeled slot, and per row one run of consecutive targets (at most max_ngram pieces, starting where a run
    starts) laid out as [pad | n-gram | <sep> | <cls>] with the original pieces."""
    from xlnet.data.plm import MASK_ID
    from xlnet.tokenizer import PAD_ID, SEG_CLS as SEG_ID_CLS, SEG_PAD as SEG_ID_PAD

    s = _samplers(("plm", "mlm", "infoword"))
    max_ngram = s["infoword"].cfg.max_ngram
    lengths, unmasked = set(), 0
    for _ in range(4):
        plm, mlm, iw = (next(s[o]) for o in ("plm", "mlm", "infoword"))
        for key in ("token_type_ids", "is_masked"):
            assert torch.equal(iw[key], mlm[key]), key
        in_gram = iw["input_ids"] != mlm["input_ids"]  # BERT's corruption left these pieces in view
        assert (iw["input_ids"][in_gram] == MASK_ID).all()
        unmasked += int(in_gram.sum())
        L = mlm["input_ids"].shape[1]
        assert torch.equal(iw["target_positions"][:, :-1], mlm["target_positions"])
        assert (iw["target_positions"][:, -1] == L - 1).all() and (iw["labels"][:, -1] == -100).all()
        assert torch.equal(iw["labels"][:, :-1], mlm["labels"]) and (iw["target_mask"][:, -1] == 0).all()
        assert iw["span_ids"].shape == (len(mlm["input_ids"]), max_ngram + 2)
        for row in range(len(iw["span_ids"])):
            keep = iw["span_mask"][row].bool()
            ids, seg = iw["span_ids"][row], iw["span_type_ids"][row]
            assert (ids[~keep] == PAD_ID).all() and (seg[~keep] == SEG_ID_PAD).all()
            assert keep[-1] and keep.long().diff().ge(0).all()  # left padding
            assert ids[-2:].tolist() == [SEP_ID, CLS_ID] and seg[-1] == SEG_ID_CLS and (seg[keep][:-1] == 0).all()
            gram = ids[keep][:-2].tolist()
            lengths.add(len(gram))
            targets = plm["is_masked"][row]
            original = plm["input_ids"][row].tolist()
            starts = [b for b in range(L) if targets[b] and (b == 0 or not targets[b - 1])
                      and original[b:b + len(gram)] == gram and targets[b:b + len(gram)].all()]
            assert 1 <= len(gram) <= max_ngram and starts, (row, gram)
            # the n-gram is masked out of its sentence whole, the rest corrupted as "mlm" corrupts it
            hidden = [b for b in starts if (iw["input_ids"][row, b:b + len(gram)] == MASK_ID).all()]
            assert hidden and in_gram[row, :hidden[0]].logical_not().all(), (row, gram)
            assert in_gram[row, hidden[0] + len(gram):].logical_not().all(), (row, gram)
    assert len(lengths) > 1 and unmasked > 0  # n-grams of several lengths; some pieces "mlm" left in view


def test_left_to_right_on_the_span_targets_predicts_plms_tokens():
    """clm_predict "targets": the left-to-right order, but only PLM's targets as labels, each read from the
    position before it (the same tokens and number of predictions as plm and mlm: equal signal per step)."""
    s = _samplers(("plm", "clm"))
    targets = PLMSampler(*make_corpus(11), PLMConfig(**SMALL, seed=2, objective="clm", clm_predict="targets"))
    for _ in range(3):
        plm, clm, ct = next(s["plm"]), next(s["clm"]), next(targets)
        for key in ("input_ids", "token_type_ids", "perm_mask", "perm_q_rank", "perm_k_rank"):
            assert torch.equal(ct[key], clm[key]), key
        positions = plm["target_mapping"].argmax(-1)
        valid = plm["target_mask"].bool() & (positions > 0)
        assert torch.equal(ct["target_mask"].bool(), valid) and valid.sum() > 0
        assert torch.equal(ct["target_positions"][valid], positions[valid] - 1)
        assert torch.equal(ct["labels"][valid], plm["labels"][valid]) and (ct["labels"][~valid] == -100).all()
        rows = torch.arange(len(positions))[:, None].expand_as(positions)
        assert torch.equal(ct["input_ids"][rows[valid], positions[valid]], ct["labels"][valid])


def test_infoword_refuses_bi_data():
    with pytest.raises(XLNetError, match="infoword.*bi_data"):
        _samplers(("infoword",), bi_data=True)


def test_mlm_corruption_follows_bert():
    """80% <mask>, 10% a random ordinary piece, 10% unchanged, measured over many targets; nothing else moves."""
    from xlnet.data.plm import MASK_ID, NUM_SPECIAL, mlm_inputs

    rng = np.random.default_rng(0)
    ids = rng.integers(NUM_SPECIAL, VOCAB, 200_000)
    target = rng.random(len(ids)) < 0.15
    out = mlm_inputs(ids, target, np.random.default_rng(1), VOCAB)
    assert np.array_equal(out[~target], ids[~target])
    t_out, t_in = out[target], ids[target]
    masked = t_out == MASK_ID
    replaced = ~masked & (t_out != t_in)
    n = target.sum()
    assert abs(masked.mean() - 0.8) < 0.01
    # a random piece equals the original with probability 1 / (VOCAB - NUM_SPECIAL)
    assert abs(replaced.sum() / n - 0.1 * (1 - 1 / (VOCAB - NUM_SPECIAL))) < 0.005
    assert ((t_out[~masked] >= NUM_SPECIAL) & (t_out[~masked] < VOCAB)).all()


def test_objective_is_checked_and_old_states_resume_plm():
    tokens, sent, ws = make_corpus(1)
    with pytest.raises(XLNetError, match="objective must be one of"):
        PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, objective="bert"))
    with pytest.raises(XLNetError, match="clm_predict must be"):
        PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, objective="clm", clm_predict="some"))
    with pytest.raises(XLNetError, match="factorization_order must be one of random, left-to-right"):
        PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, factorization_order="sorted"))
    with pytest.raises(XLNetError, match="factorization_order is plm's"):
        PLMSampler(tokens, sent, ws, PLMConfig(**SMALL, objective="mlm", factorization_order="left-to-right"))
    s = _samplers(("plm", "mlm"))
    next(s["plm"])
    state = s["plm"].state_dict()
    # a checkpoint written before objectives existed
    del state["cfg"]["objective"], state["cfg"]["clm_predict"], state["cfg"]["factorization_order"]
    fresh = _samplers(("plm",))["plm"]
    fresh.load_state_dict(state)
    assert fresh.step == 1
    with pytest.raises(XLNetError, match="does not match"):
        s["mlm"].load_state_dict(state)


def test_left_to_right_factorization_keeps_plms_targets_and_fixes_the_order():
    """factorization_order "left-to-right": PLM's batch with the same targets, slots and labels, and the identity
    order (clm's ranks): the query stream at target i sees exactly the positions j < i."""
    plm = _samplers(("plm",))["plm"]
    ltr = _samplers(("plm",), factorization_order="left-to-right")["plm"]
    clm = _samplers(("clm",))["clm"]
    for _ in range(3):
        a, b, c = next(plm), next(ltr), next(clm)
        for key in ("input_ids", "token_type_ids", "target_mapping", "labels", "target_mask", "is_masked"):
            assert torch.equal(a[key], b[key]), key
        for key in ("perm_mask", "perm_q_rank", "perm_k_rank"):
            assert torch.equal(b[key], c[key]), key
        L = b["input_ids"].shape[1]
        assert torch.equal(b["perm_mask"][0], torch.triu(torch.ones(L, L)))  # 1 = may not see: j >= i
        assert not torch.equal(a["perm_mask"], b["perm_mask"])


def test_left_to_right_factorization_is_causal_through_the_model():
    """In the model, the query stream's prediction of target i does not change when any token at j >= i does
    (including the target itself), and does change with a token before it."""
    from xlnet.config import XLNetConfig
    from xlnet.model import XLNetLMHeadModel

    torch.manual_seed(0)
    model = XLNetLMHeadModel(XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64,
                                         dropout=0.0, dropatt=0.0)).eval()
    batch = next(_samplers(("plm",), factorization_order="left-to-right")["plm"])
    keys = ("input_ids", "token_type_ids", "perm_mask", "target_mapping")

    def logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(**{k: batch[k] for k in keys if k != "input_ids"}, input_ids=ids).logits

    base = logits(batch["input_ids"])
    positions = batch["target_mapping"].argmax(-1)  # [B, P]
    valid = batch["target_mask"].bool()
    row, slot = 0, int(valid[0].nonzero()[len(valid[0].nonzero()) // 2])
    i = int(positions[row, slot])
    later = batch["input_ids"].clone()
    later[row, i:] = (later[row, i:] + 1) % VOCAB
    assert torch.allclose(logits(later)[row, slot], base[row, slot], atol=1e-6)
    earlier = batch["input_ids"].clone()
    earlier[row, :i] = (earlier[row, :i] + 1) % VOCAB
    assert not torch.allclose(logits(earlier)[row, slot], base[row, slot], atol=1e-3)


@pytest.mark.parametrize("objective", ["mlm", "infoword"])
def test_masked_lm_memory_never_reads_the_next_samples_text(objective):
    """The reused part becomes the next sample's memory and the new part's text is the next sample's reused part,
    so (as PLM's `parser` blocks) the reused part must not attend to the new part: else the memory carries the
    next sample's masked-LM targets. The memory must not move when the new part's tokens change."""
    from xlnet.config import XLNetConfig
    from xlnet.model import XLNetLMHeadModel

    torch.manual_seed(0)
    R = SMALL["reuse_len"]
    model = XLNetLMHeadModel(XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64,
                                         dropout=0.0, dropatt=0.0, mem_len=R, reuse_len=R)).eval()
    batch = next(_samplers((objective,))[objective])
    keys = ("token_type_ids", "perm_mask", "target_positions")

    def mems(ids: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return model(ids, **{k: batch[k] for k in keys if k in batch}).mems

    changed = batch["input_ids"].clone()
    changed[:, R:-3] = (changed[:, R:-3] + 1) % VOCAB  # the new part's text, <sep>s and <cls> kept
    for before, after in zip(mems(batch["input_ids"]), mems(changed)):
        assert torch.equal(before, after)
    # the new part still reads the reused part (bidirectional attention otherwise)
    reused = batch["input_ids"].clone()
    reused[:, :R] = (reused[:, :R] + 1) % VOCAB
    with torch.no_grad():
        logits = [model(ids, **{k: batch[k] for k in keys if k in batch}).logits for ids in (batch["input_ids"], reused)]
    new_slots = batch["target_positions"] >= R
    assert not torch.allclose(logits[0][new_slots], logits[1][new_slots], atol=1e-3)
