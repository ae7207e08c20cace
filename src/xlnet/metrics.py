"""Task metrics, written from the published definitions (no sklearn/scipy at run time).

Units: classification/regression/RACE/CoNLL scores are fractions in [0, 1]; SQuAD scores are
percentages (0-100) because that is what the official SQuAD scripts print and users compare against.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- classification


def _check_lengths(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no examples to score")


def accuracy(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    _check_lengths(preds, labels)
    return sum(p == g for p, g in zip(preds, labels)) / len(labels)


def _f1_for_class(preds: Sequence[Hashable], labels: Sequence[Hashable], cls: Hashable) -> float:
    tp = sum(p == cls and g == cls for p, g in zip(preds, labels))
    fp = sum(p == cls and g != cls for p, g in zip(preds, labels))
    fn = sum(p != cls and g == cls for p, g in zip(preds, labels))
    # F1 = 2TP / (2TP + FP + FN); defined as 0 when the class never appears anywhere (sklearn's convention).
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def f1_binary(preds: Sequence[Hashable], labels: Sequence[Hashable], positive: Hashable = 1) -> float:
    """F1 of the `positive` class (GLUE MRPC/QQP use label 1)."""
    _check_lengths(preds, labels)
    return _f1_for_class(preds, labels, positive)


def f1_macro(preds: Sequence[Hashable], labels: Sequence[Hashable], classes: Iterable[Hashable] | None = None) -> float:
    """Unweighted mean of per-class F1 over `classes` (default: every class seen in gold or predictions)."""
    _check_lengths(preds, labels)
    classes = sorted(set(labels) | set(preds), key=str) if classes is None else list(classes)
    return sum(_f1_for_class(preds, labels, c) for c in classes) / len(classes)


def matthews_corrcoef(preds: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """Multiclass MCC (Gorodkin's R_K); equals the usual binary formula for two classes. 0 when undefined."""
    _check_lengths(preds, labels)
    classes = sorted(set(labels) | set(preds), key=str)
    idx = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)  # rows = gold, cols = predicted
    for p, g in zip(preds, labels):
        conf[idx[g], idx[p]] += 1
    n = conf.sum()
    correct = np.trace(conf)
    true_counts = conf.sum(axis=1)
    pred_counts = conf.sum(axis=0)
    cov_tp = correct * n - float(true_counts @ pred_counts)
    cov_pp = n * n - float(pred_counts @ pred_counts)
    cov_tt = n * n - float(true_counts @ true_counts)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0  # a constant predictor (or constant gold) carries no correlation; CoLA convention
    return float(cov_tp / math.sqrt(cov_pp * cov_tt))


# ----------------------------------------------------------------------------- regression


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _check_lengths(x, y)
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom else 0.0


def rankdata(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span (Spearman needs this)."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # positions i..j hold ranks i+1..j+1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the average ranks (handles ties the way scipy.stats.spearmanr does)."""
    _check_lengths(x, y)
    return pearson(rankdata(x), rankdata(y))


# ----------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalization: lowercase, drop ASCII punctuation, drop a/an/the, squeeze whitespace.

    The order matters: punctuation goes before articles so "the-end" -> "theend" keeps its "the".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, v2: bool = True) -> float:
    """Bag-of-tokens F1 between normalized answers.

    v2=True follows the v2.0 script: if either side is empty, F1 is 1 when both are empty else 0 (this is
    how "no answer" gets credit). The v1.1 script has no such case: an empty side always gives 0.
    """
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if v2 and (not pred_toks or not gold_toks):
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _iter_qas(dataset: Sequence[Mapping]) -> Iterable[Mapping]:
    """Questions of a SQuAD `data` list (articles -> paragraphs -> qas)."""
    for article in dataset:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def squad_v1_scores(dataset: Sequence[Mapping], predictions: Mapping[str, str]) -> dict[str, float]:
    """Official v1.1 metric: max EM/F1 over gold answers; a missing prediction scores 0 but still counts."""
    em = f1 = 0.0
    total = missing = 0
    for qa in _iter_qas(dataset):
        total += 1
        if qa["id"] not in predictions:
            missing += 1
            continue
        pred = predictions[qa["id"]]
        golds = [a["text"] for a in qa["answers"]]
        em += max(squad_exact(pred, g) for g in golds)
        f1 += max(squad_f1(pred, g, v2=False) for g in golds)
    if total == 0:
        raise ValueError("no questions to score")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total, "missing": missing}


def squad_v2_raw_scores(
    dataset: Sequence[Mapping], predictions: Mapping[str, str]
) -> tuple[dict[str, int], dict[str, float], dict[str, bool]]:
    """Per-question EM and F1 (0/1 scale) and has-answer flags, as in the v2.0 script.

    Gold answers that normalize to "" are dropped for scoring (a question with none left has "" as its only
    gold), but, as in the official script, a question counts as HasAns whenever its `answers` list is non-empty.
    A missing prediction scores 0 (the official script would skip it or crash).
    """
    exact: dict[str, int] = {}
    f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for qa in _iter_qas(dataset):
        qid = qa["id"]
        has_ans[qid] = bool(qa.get("answers"))
        golds = [a["text"] for a in qa.get("answers", []) if normalize_answer(a["text"])] or [""]
        pred = predictions.get(qid)
        if pred is None:
            exact[qid], f1[qid] = 0, 0.0
            continue
        exact[qid] = max(squad_exact(pred, g) for g in golds)
        f1[qid] = max(squad_f1(pred, g) for g in golds)
    return exact, f1, has_ans


def _apply_na_threshold(
    scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool], thresh: float
) -> dict[str, float]:
    """Questions whose no-answer probability exceeds `thresh` are answered "no answer"."""
    out = {}
    for qid, s in scores.items():
        out[qid] = float(not has_ans[qid]) if na_probs[qid] > thresh else s
    return out


def _best_threshold(
    preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float], has_ans: Mapping[str, bool]
) -> tuple[float, float]:
    """Sweep the threshold over the sorted no-answer scores; return (best score in %, its threshold).

    Start with "everything is no-answer" (scores the NoAns count), then un-abstain one question at a time
    in increasing no-answer score: a HasAns question adds its score; a NoAns one loses 1 if we predicted text.
    """
    current = best = float(sum(not v for v in has_ans.values()))
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            current += scores[qid]
        elif preds.get(qid):
            current -= 1
        if current > best:
            best, best_thresh = current, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def squad_v2_scores(
    dataset: Sequence[Mapping],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official v2.0 metric: exact/f1 overall, HasAns_*/NoAns_* breakdown, and with `na_probs` also
    best_exact/best_f1 with the thresholds that reach them."""
    exact_raw, f1_raw, has_ans = squad_v2_raw_scores(dataset, predictions)
    if not exact_raw:
        raise ValueError("no questions to score")
    given_na = na_probs is not None
    na = {q: 0.0 for q in exact_raw}
    if given_na:  # in na_probs' own order: the official threshold sweep breaks ties between equal scores by it
        unscored = {q: 0.0 for q in exact_raw if q not in na_probs}
        na = {q: float(na_probs[q]) for q in na_probs if q in exact_raw} | unscored
    exact = _apply_na_threshold(exact_raw, na, has_ans, na_prob_thresh)
    f1 = _apply_na_threshold(f1_raw, na, has_ans, na_prob_thresh)

    def block(qids: list[str]) -> tuple[float, float, int]:
        return 100.0 * sum(exact[q] for q in qids) / len(qids), 100.0 * sum(f1[q] for q in qids) / len(qids), len(qids)

    out: dict[str, float] = {}
    out["exact"], out["f1"], out["total"] = block(list(exact))
    for name, flag in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in exact if has_ans[q] is flag]
        if qids:
            out[f"{name}_exact"], out[f"{name}_f1"], out[f"{name}_total"] = block(qids)
    if given_na:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(predictions, exact_raw, na, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, na, has_ans)
    out["missing"] = sum(q not in predictions for q in exact_raw)
    return out


# ----------------------------------------------------------------------------- RACE


def race_accuracy(predictions: Mapping[str, str], gold: Mapping[str, tuple[str, str]]) -> dict[str, float]:
    """Accuracy overall and per level; gold maps question id -> (answer letter, "middle"|"high").

    A missing prediction counts as wrong.
    """
    if not gold:
        raise ValueError("no questions to score")
    hits: dict[str, list[int]] = collections.defaultdict(list)
    for qid, (answer, level) in gold.items():
        ok = int(str(predictions.get(qid, "")).strip().upper() == answer.upper())
        hits["accuracy"].append(ok)
        hits[level].append(ok)
    out = {name: sum(v) / len(v) for name, v in hits.items()}
    out["total"] = len(gold)
    return out


# ----------------------------------------------------------------------------- CoNLL chunks


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare type such as 'PER' is read as 'I-PER'."""
    if tag == "O" or not tag:
        return "O", ""
    if len(tag) > 1 and tag[1] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag


def bio_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity chunks (type, first, last) with conlleval rules.

    A chunk starts at B-, at S-, or at I-/E- whose previous tag is O or has another type (so a stray I-
    starts a chunk, as in IOB1); it ends before O, B-, S-, a type change, or after E-/S-.
    """
    chunks = []
    start = None
    prev_prefix, prev_type = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):  # trailing O closes the last chunk
        prefix, typ = _split_tag(tag)
        ends = start is not None and (
            prefix in ("O", "B", "S") or typ != prev_type or prev_prefix in ("E", "S")
        )
        if ends:
            chunks.append((prev_type, start, i - 1))
            start = None
        if prefix != "O" and (start is None or prefix in ("B", "S")):
            start = i
        prev_prefix, prev_type = prefix, typ
    return chunks


def conll_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (exact span and type match), plus token accuracy, per conlleval."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(pred)} predicted sentences for {len(gold)} gold sentences")
    n_gold = n_pred = n_correct = tok_ok = tok_total = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(g)} tokens")
        gc, pc = set(bio_chunks(g)), set(bio_chunks(p))
        n_gold += len(gc)
        n_pred += len(pc)
        n_correct += len(gc & pc)
        tok_ok += sum(a == b for a, b in zip(g, p))
        tok_total += len(g)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "token_accuracy": tok_ok / tok_total if tok_total else 0.0,
        "gold_chunks": n_gold,
        "pred_chunks": n_pred,
    }
