"""Write tests/data/original_squad_features.json: the original XLNet code's SQuAD windows, with our tokenizer.

The oracle for `xlnet finetune --task squad2`'s featurization is run_squad.py itself
(https://github.com/zihangdai/xlnet, Apache-2.0; not copied here): read_squad_examples and
convert_examples_to_features in training mode (its character alignment of pieces to the context by a longest common
subsequence, the doc-stride windows, the `paragraph <sep> question <sep> <cls>` layout, answer positions,
max-context flags), on a small SQuAD 2.0 set made here: accents, ligatures, runs of spaces, `` '' quotes, "1,000,"
numbers that the original re-splits, an answer inside a word, answers at window edges and outside a window,
unanswerable questions. Then its decoding:
write_predictions over the evaluation windows with random beam outputs (recorded, with the original's answer texts
and null log-odds). The random token indices avoid each window's last paragraph token, which the original never
predicts (an off-by-one ours does not copy) and padding. Run once with the original's dependencies, as
tests/data/make_tf_checkpoint.py:
    /tmp/tfenv/bin/python tests/data/make_original_squad_features.py --xlnet-repo PATH/TO/xlnet
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from make_tf_checkpoint import ROOT, SPIECE, embedded_spiece, generator_args, original_code

MAX_SEQ_LENGTH, DOC_STRIDE, MAX_QUERY_LENGTH = 40, 8, 12
N_BEST, MAX_ANSWER_LENGTH, TOP = 5, 6, 5  # write_predictions' n_best_size, max_answer_length; start/end_n_top
PARAGRAPHS = [
    ("The Normans (Norman: Nourmands; French: Normands) were the people who in the 10th and 11th centuries gave "
     "their name to Normandy, a region in France.",
     [("In what country is Normandy located?", "France"), ("When were the Normans in Normandy?",
                                                          "10th and 11th centuries"),
      ("From which countries did the Norse originate?", None), ("What is the Norman name?", "Nourmands")]),
    ("Café  naïve résumé: the ﬁne ﬂour cost 1,000,000 dollars in 1605, said ``Cervantes'' to   the baker, "
     "and 7, 8, 9, were the prices.",
     [("What cost a lot?", "ﬁne ﬂour"), ("How much did it cost?", "1,000,000"), ("When?", "1605"),
      ("Who said it?", "Cervantes"), ("What was naïve?", "naïve"), ("Which prices?", "7, 8, 9"),
      ("Who baked?", None)]),
    ("It was an unbelievable story, told again and again: in the beginning God created the heaven and the earth, "
     "and the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God "
     "moved upon the face of the waters. And God said, Let there be light: and there was light.",
     [("Which part of the word?", "believ"), ("What was created?", "the heaven and the earth"),
      ("What was upon the deep?", "darkness"), ("What moved?", "the Spirit of God"),
      ("What was there at the end, after God spoke a very long question that gets truncated here?", "light"),
      ("Where was the face?", None)]),
]


def squad_json() -> dict:
    """SQuAD 2.0 training format: one answer or is_impossible; answer_start of the answer's first occurrence."""
    data, n = [], 0
    for context, questions in PARAGRAPHS:
        qas = []
        for question, answer in questions:
            n += 1
            qa = {"id": f"q{n}", "question": question, "is_impossible": answer is None, "answers": []}
            if answer is not None:
                qa["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
            qas.append(qa)
        data.append({"title": f"t{len(data)}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "v2.0", "data": data}


def decoding(run_squad, sp, dataset: dict, FLAGS) -> dict:
    """The original's answers and null log-odds for random beam outputs over its evaluation windows."""
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dev.json"
        path.write_text(json.dumps(dataset))
        examples = run_squad.read_squad_examples(str(path), is_training=False)
        features = []
        run_squad.convert_examples_to_features(examples, sp, MAX_SEQ_LENGTH, DOC_STRIDE, MAX_QUERY_LENGTH, False,
                                               features.append)
        rng, results, Raw = np.random.default_rng(0), [], run_squad.RawResult
        FLAGS.start_n_top = FLAGS.end_n_top = TOP
        for f in features:
            allowed = [i for i in range(f.cls_index + 1) if i != f.paragraph_len - 1]
            results.append(Raw(
                unique_id=f.unique_id, start_top_log_probs=np.sort(-rng.exponential(2.0, TOP)).round(4)[::-1].tolist(),
                start_top_index=rng.choice(allowed, TOP, replace=False).tolist(),
                end_top_log_probs=(-rng.exponential(2.0, TOP * TOP)).round(4).tolist(),
                end_top_index=rng.choice(allowed, TOP * TOP).tolist(), cls_logits=round(float(rng.normal(0, 2)), 4)))
        run_squad.write_predictions(examples, features, results, N_BEST, MAX_ANSWER_LENGTH, str(Path(tmp) / "p.json"),
                                    str(Path(tmp) / "n.json"), str(Path(tmp) / "o.json"), dataset["data"])
        answers = json.loads((Path(tmp) / "p.json").read_text())
        null_odds = json.loads((Path(tmp) / "o.json").read_text())
    return {"beam": [r._asdict() for r in results], "answers": answers, "null_log_odds": null_odds}


def main() -> None:
    args = generator_args(__doc__, "original_squad_features.json")

    original_code(args.xlnet_repo)
    from absl import flags

    import run_squad  # the original XLNet code

    flags.FLAGS(["run_squad"])  # the defaults: cased (our embedded tokenizer is cased)
    sp = embedded_spiece()
    dataset = squad_json()
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(dataset, f)
        f.flush()
        examples = run_squad.read_squad_examples(f.name, is_training=True)
    features = []

    def keep(feature) -> None:
        n = sum(1 - m for m in feature.input_mask)  # real tokens: the original pads on the right
        features.append({
            "doc_span_index": feature.doc_span_index, "input_ids": feature.input_ids[:n],
            "segment_ids": feature.segment_ids[:n], "p_mask": feature.p_mask[:n], "cls_index": feature.cls_index,
            "paragraph_len": feature.paragraph_len, "start_position": feature.start_position,
            "end_position": feature.end_position, "is_impossible": bool(feature.is_impossible),
            "tok_start_to_orig_index": feature.tok_start_to_orig_index,
            "tok_end_to_orig_index": feature.tok_end_to_orig_index,
            "token_is_max_context": [feature.token_is_max_context[i] for i in range(feature.paragraph_len)]})

    for index, example in enumerate(examples):
        before = len(features)
        run_squad.convert_examples_to_features([example], sp, MAX_SEQ_LENGTH, DOC_STRIDE, MAX_QUERY_LENGTH, True,
                                               keep)
        for feature in features[before:]:
            feature.update(example_index=index, qid=example.qas_id)
    out = {"spiece_model": str(SPIECE.relative_to(ROOT)), "max_seq_length": MAX_SEQ_LENGTH,
           "doc_stride": DOC_STRIDE, "max_query_length": MAX_QUERY_LENGTH, "n_best": N_BEST,
           "max_answer_length": MAX_ANSWER_LENGTH, "dataset": dataset,
           **decoding(run_squad, sp, dataset, flags.FLAGS), "features": features}
    rows = {k: v for k, v in out.items() if k in ("beam", "features")}  # a record per line: readable diffs
    lines = [f' "{k}": {json.dumps(v, ensure_ascii=False)},' for k, v in out.items() if k not in rows]
    for key, records in rows.items():
        lines += [f' "{key}": [', ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in records), " ],"]
    lines[-1] = lines[-1].rstrip(",")
    Path(args.out).write_text("{\n" + "\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(examples)} questions, {len(features)} windows")


if __name__ == "__main__":
    main()
