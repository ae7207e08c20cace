"""Write tests/data/original_plm.npz: the original XLNet code's span sampling and factorization masks.

The oracle for xlnet/data/plm.py is data_utils.py of https://github.com/zihangdai/xlnet (Apache-2.0; not copied
here), run on token ids from the embedded corpus and tokenizer:

- `_sample_mask`: its random draws come from a recorded stream of uniforms (np.random.choice and randint in its
  namespace are replaced by functions reading the stream, as our sampler reads its generator: an index by the
  cumulative probabilities, an integer as floor(u * n)). Recorded: the uniforms its span loop drew, the spans it
  chose (the mask before its top-up with random single tokens, whose draws differ from ours by design) and the
  final mask.
- `_split_a_and_b`: Python's random in its namespace reads a recorded stream the same way.
- the record parser inside `get_dataset` (two `_local_perm` calls, the ones/zeros blocks, num_predict slots),
  taken out of its closure and run eagerly on serialized records, with tf.random_shuffle replaced by a recorded
  permutation of the index rows. Recorded: each record, its two permutations and every output.

Run once with the original's dependencies, as tests/data/make_tf_checkpoint.py:
    /tmp/tfenv/bin/python tests/data/make_original_plm.py --xlnet-repo PATH/TO/xlnet
"""

from __future__ import annotations

import gzip
import sys
import types

import numpy as np

from make_tf_checkpoint import ROOT, embedded_spiece, generator_args, original_code

CORPUS = ROOT / "src" / "xlnet" / "assets" / "corpus"
SPAN_CASES = [(64, 10, False), (64, 10, True), (128, 21, False), (128, 21, True), (40, 40, False), (96, 1, False),
              (96, 5, True), (256, 42, False)] + [(12, 12, False)] * 4 + [(16, 16, True)] * 4
# (segment length, goal, reverse); the short ones end their span loops at the segment's end
SEQ_LEN, REUSE_LEN, NUM_PREDICT, N_RECORDS = 32, 16, 12, 12
# (begin, tot_len) for _split_a_and_b: across sentence boundaries, single-sentence stretches, near the stream's end
SPLIT_CASES = [(b, t) for t in (13, 29, 125) for b in (0, 37, 150, 411, 600, 870)] + [(960, 29), (990, 13)]


class Stream:
    """np.random's choice / randint for the original code, reading recorded uniforms."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self.u, self.used, self.top_up_from, self.span_draws = uniforms, 0, None, None

    def uniform(self) -> float:
        self.used += 1
        return float(self.u[self.used - 1])

    def choice(self, a, p=None):
        if p is None:  # np.random.choice(n): uniform over range(n)
            return int(self.uniform() * a)
        return a[int(np.searchsorted(np.cumsum(p), self.uniform(), side="right"))]

    def randint(self, n):
        if self.top_up_from is None:  # the span loop is over: the mask so far is its spans
            self.top_up_from, self.span_draws = sys._getframe(1).f_locals["mask"].copy(), self.used
        return int(self.uniform() * n)


def corpus_ids(sp, preprocess_text, encode_ids, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n ids of the embedded corpus and their sentence ids (flipping at each line, as _create_data)."""
    ids: list[int] = []
    sent: list[bool] = []
    with gzip.open(CORPUS / "corpus.txt.gz", "rt", encoding="utf-8") as f:
        for line in f:
            piece_ids = encode_ids(sp, preprocess_text(line.strip()))
            flag = not sent[-1] if sent else True
            ids += piece_ids
            sent += [flag] * len(piece_ids)
            if len(ids) >= n:
                return np.array(ids[:n], np.int64), np.array(sent[:n], bool)
    raise SystemExit("corpus too short")


def splits(data_utils, ids: np.ndarray, sent: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """_split_a_and_b (extend_target, as create_tfrecords calls it) with Python's random read from the stream:
    random() a uniform, choice(seq) and randint(a, b) by floor(u * n). Recorded per case: begin, tot_len, the
    uniforms, how many it drew, and A's and B's [begin, end) in the stream (A and B are views of it), label;
    -1s where it returns None (too close to the stream's end)."""
    real_random, rows = data_utils.random, []
    uniforms = rng.random((len(SPLIT_CASES), 4))
    for (begin, tot_len), u in zip(SPLIT_CASES, uniforms):
        stream = Stream(u)
        data_utils.random = types.SimpleNamespace(random=stream.uniform,
                                                  choice=lambda seq: seq[stream.choice(len(seq))],
                                                  randint=lambda a, b: a + stream.choice(b - a + 1))
        try:
            got = data_utils._split_a_and_b(ids, sent, begin, tot_len, extend_target=True)
        finally:
            data_utils.random = real_random
        start = lambda view: (view.__array_interface__["data"][0] - ids.__array_interface__["data"][0]) // 8  # noqa
        spans = [-1] * 5 if got is None else [start(got[0]), start(got[0]) + len(got[0]), start(got[1]),
                                              start(got[1]) + len(got[1]), got[2]]
        rows.append([begin, tot_len, stream.used, *spans])
    return {"split_cases": np.array(rows, np.int64), "split_uniforms": uniforms, "split_sent_ids": sent}


def spans(data_utils, sp, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    real_np = data_utils.np
    for c, (length, goal, reverse) in enumerate(SPAN_CASES):
        seg = ids[c * 50: c * 50 + length]
        stream = Stream(rng.random(64 * length))  # the top-up rejects masked positions: many draws
        numpy_names = {k: getattr(real_np, k) for k in dir(real_np) if not k.startswith("__")}
        data_utils.np = types.SimpleNamespace(**{**numpy_names, "random": stream})
        try:
            mask = data_utils._sample_mask(sp, seg, reverse=reverse, max_gram=5, goal_num_predict=goal)
        finally:
            data_utils.np = real_np
        span_mask = mask if stream.top_up_from is None else stream.top_up_from
        if reverse:  # the original flipped its own copy of the mask before the top-up
            span_mask = span_mask[::-1] if stream.top_up_from is not None else span_mask
        draws = stream.used if stream.span_draws is None else stream.span_draws
        out.update({f"span{c}_seg": seg, f"span{c}_uniforms": stream.u[:draws],
                    f"span{c}_spans": np.asarray(span_mask, bool), f"span{c}_mask": np.asarray(mask, bool),
                    f"span{c}_case": np.array([length, goal, int(reverse)])})
    return out


def records(tf, data_utils, ids: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The parser of get_dataset, out of its closure, on serialized records."""
    code = next(c for c in data_utils.get_dataset.__code__.co_consts if getattr(c, "co_name", "") == "parser")
    cells = dict(seq_len=SEQ_LEN, reuse_len=REUSE_LEN, perm_size=None, num_predict=NUM_PREDICT, use_bfloat16=False)
    out: dict[str, np.ndarray] = {}
    for r in range(N_RECORDS):
        perm_size = (8, 16)[r % 2]
        cells["perm_size"] = perm_size
        parser = types.FunctionType(code, data_utils.__dict__, "parser",
                                    closure=tuple(types.CellType(cells[n]) for n in code.co_freevars))
        inp = ids[200 + r * 40: 200 + r * 40 + SEQ_LEN + 1].copy()
        inp[[REUSE_LEN + 5, SEQ_LEN - 2]] = data_utils.SEP_ID  # A <sep> B <sep> <cls> after the reused part
        inp[SEQ_LEN - 1] = data_utils.CLS_ID
        target = inp[1:]  # the next token, as create_tfrecords writes it
        inp = inp[:SEQ_LEN]
        seg = np.r_[np.zeros(REUSE_LEN + 6), np.ones(SEQ_LEN - REUSE_LEN - 7), [2]].astype(np.int64)
        is_masked = np.zeros(SEQ_LEN, bool)
        is_masked[rng.choice(SEQ_LEN, NUM_PREDICT - r % 3, replace=False)] = True  # <sep>/<cls> may be among them
        sigmas = [rng.permutation(perm_size) for _ in range(2)]
        queue = list(sigmas)
        tf.random_shuffle = lambda x: tf.gather(x, queue.pop(0))
        feature = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=list(map(int, v))))  # noqa: E731
        example = tf.train.Example(features=tf.train.Features(feature={
            "input": feature(inp), "target": feature(target), "seg_id": feature(seg), "label": feature([r % 2]),
            "is_masked": feature(is_masked)}))
        got = parser(example.SerializeToString())
        assert not queue
        out.update({f"rec{r}_{k}": v for k, v in dict(input=inp, seg_id_in=seg, is_masked=is_masked,
                                                       sigma0=sigmas[0], sigma1=sigmas[1],
                                                       perm_size=np.array(perm_size)).items()})
        out.update({f"rec{r}_out_{k}": np.asarray(v) for k, v in got.items()})
    return out


def main() -> None:
    args = generator_args(__doc__, "original_plm.npz")
    shim = original_code(args.xlnet_repo, graph=False)[2]  # eager: the parser runs op by op

    import data_utils  # the original XLNet code
    from prepro_utils import encode_ids, preprocess_text

    data_utils.FLAGS = types.SimpleNamespace(mask_alpha=6, mask_beta=1)  # its defaults (set in its __main__)
    sp = embedded_spiece()
    ids, sent = corpus_ids(sp, preprocess_text, encode_ids, 1000)
    rng = np.random.default_rng(0)
    arrays = {**spans(data_utils, sp, ids, rng), **records(shim, data_utils, ids, rng),
              **splits(data_utils, ids, sent, rng)}
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(SPAN_CASES)} span cases, {N_RECORDS} records, {len(SPLIT_CASES)} splits")


if __name__ == "__main__":
    main()
