"""Metrics on hand-computed cases (arithmetic in the comments); library cross-checks only if installed."""

import json
import math
from pathlib import Path

import pytest

from xlnet import metrics as M


def test_accuracy_and_f1():
    preds = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # correct at positions 0, 2, 4, 5 -> 4/6
    assert M.accuracy(preds, gold) == pytest.approx(4 / 6)
    # class 1: TP=2 (0,4), FP=1 (1), FN=1 (3) -> 2*2/(4+1+1) = 4/6
    assert M.f1_binary(preds, gold, positive=1) == pytest.approx(4 / 6)
    # class 0: TP=2 (2,5), FP=1 (3), FN=1 (1) -> 4/6; macro = (4/6 + 4/6)/2
    assert M.f1_macro(preds, gold) == pytest.approx(4 / 6)


def test_macro_f1_three_classes():
    preds = ["a", "a", "b", "c"]
    gold = ["a", "b", "b", "b"]
    # a: TP1 FP1 FN0 -> 2/3; b: TP1 FP0 FN2 -> 2/4; c: TP0 FP1 FN0 -> 0
    assert M.f1_macro(preds, gold) == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_mcc():
    preds = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # TP=2 TN=2 FP=1 FN=1: (2*2-1*1)/sqrt(3*3*3*3) = 3/9
    assert M.matthews_corrcoef(preds, gold) == pytest.approx(1 / 3)
    assert M.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # constant predictor
    assert M.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_pearson_spearman_with_ties():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 4.0, 6.0, 9.0]
    # dx = [-1.5,-0.5,0.5,1.5], dy = [-3.25,-1.25,0.75,3.75]; sum dx*dy = 4.875+0.625+0.375+5.625 = 11.5
    # sum dx^2 = 5, sum dy^2 = 10.5625+1.5625+0.5625+14.0625 = 26.75
    assert M.pearson(x, y) == pytest.approx(11.5 / math.sqrt(5 * 26.75))
    assert M.spearman(x, y) == pytest.approx(1.0)
    # ties: ranks of [1,2,2,3] are [1,2.5,2.5,4]
    assert list(M.rankdata([1, 2, 2, 3])) == [1.0, 2.5, 2.5, 4.0]
    # spearman([1,2,2,3],[1,2,3,4]) = pearson([1,2.5,2.5,4],[1,2,3,4]):
    # dx=[-1.5,0,0,1.5], dy=[-1.5,-.5,.5,1.5]; cov=4.5; sxx=4.5; syy=5 -> 4.5/sqrt(22.5)
    assert M.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_against_libraries_if_installed():
    import scipy.stats as stats
    x = [0.3, 1.2, 1.2, 5.0, -2.0, 0.0]
    y = [1.0, 0.5, 2.0, 4.0, -1.0, 0.5]
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_against_sklearn_if_installed():
    import sklearn.metrics as skm
    preds = [0, 1, 2, 2, 1, 0, 1]
    gold = [0, 2, 2, 1, 1, 0, 0]
    assert M.matthews_corrcoef(preds, gold) == pytest.approx(skm.matthews_corrcoef(gold, preds))
    assert M.f1_macro(preds, gold) == pytest.approx(skm.f1_score(gold, preds, average="macro"))


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("The Cat", "cat"),
        ("  a   dog,  an apple!", "dog apple"),
        ("theater", "theater"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation removed first, so "the" is no longer a word
        ("Hello\tWorld\n", "hello world"),
        ("A", ""),
        ("(1,000)", "1000"),
        ("Ünïcode THE", "ünïcode"),
    ],
)
def test_normalize_answer(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_squad_f1_cases():
    # pred "the big cat" -> [big, cat]; gold "a cat sat" -> [cat, sat]; common 1 -> P=1/2 R=1/2 F1=1/2
    assert M.squad_f1("the big cat", "a cat sat") == pytest.approx(0.5)
    # repeated tokens count with multiplicity: pred [cat,cat] gold [cat] -> common 1, P=1/2, R=1 -> 2/3
    assert M.squad_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert M.squad_f1("", "") == 1.0  # v2: both empty = correct "no answer"
    assert M.squad_f1("", "", v2=False) == 0.0  # v1.1 has no empty case
    assert M.squad_f1("the", "") == 1.0  # "the" normalizes to empty
    assert M.squad_exact("The Cat!", "cat") == 1


def test_squad_v1_scores():
    data = [{"paragraphs": [{"context": "x", "qas": [
        {"id": "q1", "answers": [{"text": "Denver Broncos"}, {"text": "the Broncos"}]},
        {"id": "q2", "answers": [{"text": "Santa Clara, California"}]},
        {"id": "q3", "answers": [{"text": "gold"}]},
    ]}]}]
    preds = {"q1": "Broncos", "q2": "Santa Clara"}  # q3 missing -> 0 but counted
    s = M.squad_v1_scores(data, preds)
    # q1: EM max(0, 1 ["broncos"=="broncos"]) = 1, F1 1; q2: EM 0, F1 P=1 R=2/3 -> 0.8; q3: 0
    assert s["exact_match"] == pytest.approx(100 * 1 / 3)
    assert s["f1"] == pytest.approx(100 * 1.8 / 3)
    assert s["missing"] == 1


def _v2_data():
    return [{"paragraphs": [{"context": "x", "qas": [
        {"id": "a", "answers": [{"text": "red"}]},
        {"id": "b", "answers": [{"text": "blue sky"}]},
        {"id": "c", "answers": [], "is_impossible": True},
        {"id": "d", "answers": [], "is_impossible": True},
    ]}]}]


def test_squad_v2_scores_and_thresholds():
    preds = {"a": "red", "b": "sky", "c": "", "d": "green"}
    na = {"a": 0.1, "b": 0.6, "c": 0.9, "d": 0.3}
    s = M.squad_v2_scores(_v2_data(), preds, na)
    # raw EM: a1 b0 c1 d0 ; raw F1: a1, b (P=1,R=1/2 -> 2/3), c1, d0. Threshold 1.0: nothing abstains.
    assert s["exact"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)
    assert s["HasAns_exact"] == pytest.approx(50.0) and s["HasAns_total"] == 2
    assert s["NoAns_exact"] == pytest.approx(50.0) and s["NoAns_total"] == 2
    # Sweep (EM), start = #NoAns = 2, order by na: a(.1) d(.3) b(.6) c(.9)
    # a: has ans +1 -> 3 (best, thresh .1); d: no-ans with text -> 2; b: +0 -> 2; c: empty pred -> 2
    assert s["best_exact"] == pytest.approx(75.0) and s["best_exact_thresh"] == pytest.approx(0.1)
    # F1: a +1 -> 3 (.1); d -1 -> 2; b +2/3 -> 2.667; c -> 2.667. best 3 at .1
    assert s["best_f1"] == pytest.approx(75.0) and s["best_f1_thresh"] == pytest.approx(0.1)


def test_squad_v2_threshold_applied():
    preds = {"a": "red", "b": "sky", "c": "", "d": "green"}
    na = {"a": 0.1, "b": 0.6, "c": 0.9, "d": 0.3}
    s = M.squad_v2_scores(_v2_data(), preds, na, na_prob_thresh=0.2)
    # b, c, d abstain: b has answer -> 0, c and d no answer -> 1; a stays 1 -> EM 3/4
    assert s["exact"] == pytest.approx(75.0)


def test_squad_v2_has_answer_is_a_non_empty_answers_list():
    # the official make_qid_to_has_ans: bool(qa["answers"]), even when every gold normalizes to "" ("The")
    data = [{"paragraphs": [{"context": "x", "qas": [{"id": "e", "answers": [{"text": "The"}]},
                                                     {"id": "n", "answers": []}]}]}]
    s = M.squad_v2_scores(data, {"e": "", "n": ""}, {"e": 0.9, "n": 0.2}, na_prob_thresh=0.5)
    # e: HasAns, gold "" -> raw EM 1, but abstaining (0.9 > 0.5) on a HasAns question scores 0; n: 1
    assert s["HasAns_total"] == 1 and s["NoAns_total"] == 1
    assert s["exact"] == pytest.approx(50.0) and s["HasAns_exact"] == pytest.approx(0.0)
    # sweep from #NoAns = 1: n (.2) empty pred -> 1; e (.9) HasAns +1 -> 2 -> 100% at .9
    assert s["best_exact"] == pytest.approx(100.0) and s["best_exact_thresh"] == pytest.approx(0.9)


def test_squad_v2_threshold_sweep_breaks_ties_in_na_probs_order():
    # equal no-answer scores: the official sweep takes them in the order of the na_probs file
    data = [{"paragraphs": [{"context": "x", "qas": [{"id": "n", "answers": []},
                                                     {"id": "h", "answers": [{"text": "red"}]}]}]}]
    preds = {"n": "blue", "h": "red"}
    # h first: 1 (#NoAns) + 1 = 2 -> best 100% at 0.5; then n (text on a NoAns question) -> 1
    assert M.squad_v2_scores(data, preds, {"h": 0.5, "n": 0.5})["best_exact"] == pytest.approx(100.0)
    # n first: 1 - 1 = 0, then h: 1 -> best stays the starting 1 of 2 -> 50% at 0.0
    s = M.squad_v2_scores(data, preds, {"n": 0.5, "h": 0.5})
    assert s["best_exact"] == pytest.approx(50.0) and s["best_exact_thresh"] == 0.0


def test_race_accuracy():
    gold = {"m1": ("A", "middle"), "m2": ("B", "middle"), "h1": ("C", "high"), "h2": ("D", "high"), "h3": ("A", "high")}
    preds = {"m1": "A", "m2": "C", "h1": "c", "h2": "D"}  # h3 missing -> wrong
    s = M.race_accuracy(preds, gold)
    # middle 1/2, high 2/3, overall 3/5
    assert s["accuracy"] == pytest.approx(0.6)
    assert s["middle"] == pytest.approx(0.5)
    assert s["high"] == pytest.approx(2 / 3)


def test_bio_chunks_conlleval_rules():
    assert M.bio_chunks(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O starts a chunk; type change inside I- splits; B- after I- of same type splits
    assert M.bio_chunks(["O", "I-PER", "I-PER", "I-LOC", "B-LOC", "I-LOC"]) == [
        ("PER", 1, 2), ("LOC", 3, 3), ("LOC", 4, 5)]
    assert M.bio_chunks(["B-ORG", "I-PER"]) == [("ORG", 0, 0), ("PER", 1, 1)]


def test_conll_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG", "B-MISC"]]
    # gold chunks: PER(0,1) LOC(3) | ORG(0) = 3 ; pred: PER(0,1) ORG(3) | ORG(0) MISC(1) = 4
    # correct: PER(0,1), ORG(0) in sentence 2 (I- starts a chunk) = 2 -> P=2/4, R=2/3, F1=2*(1/2*2/3)/(7/6)=4/7
    s = M.conll_f1(gold, pred)
    assert s["precision"] == pytest.approx(0.5)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(4 / 7)
    # tokens equal: 3 of 4, then 0 of 2 -> 3/6
    assert s["token_accuracy"] == pytest.approx(0.5)


def test_squad_v2_scores_equal_the_original_squad_utils():
    """tests/data/original_squad_scores.json: the original XLNet code's squad_utils.py (the official SQuAD 2.0
    script with XLNet's threshold search) on a synthetic dev set with ties among the no-answer probabilities,
    golds that normalize to "", and predictions that do."""
    case = json.loads((Path(__file__).parent / "data" / "original_squad_scores.json").read_text(encoding="utf-8"))
    ours = M.squad_v2_scores(case["dataset"], case["predictions"], case["na_probs"])
    assert ours.pop("missing") == 0
    assert ours.keys() == case["scores"].keys()
    for key, value in case["scores"].items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    # run_squad.py's has_ans_exact / has_ans_f1 (find_best_thresh_v2; a 0-1 scale): HasAns with nothing abstained
    assert (ours["HasAns_exact"], ours["HasAns_f1"]) == pytest.approx((100 * case["has_ans_exact"],
                                                                       100 * case["has_ans_f1"]))
