"""Write tests/data/original_squad_scores.json: SQuAD 2.0 scores from the original XLNet code's squad_utils.py.

squad_utils.py (https://github.com/zihangdai/xlnet, Apache-2.0; not copied here) is the official SQuAD 2.0
evaluation script with XLNet's threshold search; run_squad.py reports its numbers. This script makes a synthetic
dev set (answerable and unanswerable questions, several golds, articles and punctuation that normalization
removes), predictions (exact, partial, re-cased, empty) and no-answer probabilities (with ties), and records what
the original computes: the official main()'s dictionary with find_all_best_thresh, plus find_all_best_thresh_v2's
has_ans_exact / has_ans_f1. Run once with numpy installed:
    python tests/data/make_original_squad_scores.py --xlnet-repo PATH/TO/xlnet
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from make_tf_checkpoint import generator_args

WORDS = ("the a an river stone quiet bright garden window music paper letter silver winter market forest little "
         "ocean gentle north").split()
PUNCT = [".", ",", "!", "?", ";", "'s", ""]


def phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(PUNCT) for _ in range(n))


def prediction(rng: random.Random, golds: list[str]) -> str:
    kind = rng.randrange(6)
    if kind == 0 or not golds:
        return "" if rng.random() < 0.5 or golds else phrase(rng, rng.randint(1, 3))
    gold = rng.choice(golds)
    if kind == 1:
        return gold
    if kind == 2:
        return gold.upper()
    if kind == 3:  # a partial overlap
        words = gold.split()
        return " ".join(words[: max(1, len(words) // 2)] + [rng.choice(WORDS)])
    if kind == 4:
        return f"the {gold}!"
    return phrase(rng, rng.randint(1, 4))


def synthetic(seed: int = 0, n_questions: int = 48) -> tuple[list[dict], dict[str, str], dict[str, float]]:
    rng = random.Random(seed)
    qas, preds, na_probs = [], {}, {}
    for i in range(n_questions):
        qid = f"q{i:02d}"
        golds = [] if rng.random() < 0.4 else [phrase(rng, rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
        if golds and rng.random() < 0.1:
            golds.append("the .")  # normalizes to "": dropped from the golds by the official script
        qas.append({"id": qid, "question": phrase(rng, 5), "answers": [{"text": g, "answer_start": 0} for g in golds],
                    "is_impossible": not golds})
        preds[qid] = prediction(rng, golds)
        na_probs[qid] = round(rng.random(), 1)  # one decimal: ties, broken by the sweep's sort order
    dataset = [{"title": "synthetic", "paragraphs": [{"context": phrase(rng, 30), "qas": qas}]}]
    return dataset, preds, na_probs


def main() -> None:
    args = generator_args(__doc__, "original_squad_scores.json")
    sys.path.insert(0, args.xlnet_repo)
    import squad_utils as su  # the original XLNet code

    dataset, preds, na_probs = synthetic()
    has_ans = su.make_qid_to_has_ans(dataset)
    exact_raw, f1_raw = su.get_raw_scores(dataset, preds)
    exact = su.apply_no_ans_threshold(exact_raw, na_probs, has_ans, 1.0)
    f1 = su.apply_no_ans_threshold(f1_raw, na_probs, has_ans, 1.0)
    out = su.make_eval_dict(exact, f1)
    for name, flag in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, v in has_ans.items() if v is flag]
        su.merge_eval(out, su.make_eval_dict(exact, f1, qid_list=qids), name)
    su.find_all_best_thresh(out, preds, exact_raw, f1_raw, na_probs, has_ans)
    v2: dict = {}
    su.find_all_best_thresh_v2(v2, preds, exact_raw, f1_raw, na_probs, has_ans)
    data = {"dataset": dataset, "predictions": preds, "na_probs": na_probs, "scores": dict(out),
            "has_ans_exact": v2["has_ans_exact"], "has_ans_f1": v2["has_ans_f1"]}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {dict(out)}")


if __name__ == "__main__":
    main()
