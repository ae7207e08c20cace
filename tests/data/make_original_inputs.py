"""Write tests/data/original_inputs.json: what the original XLNet code makes of text, with our embedded tokenizer.

The oracle for our tokenizer's cleanup and splitting and for the fine-tuning input layout is the original code
(https://github.com/zihangdai/xlnet, Apache-2.0; not copied here): prepro_utils.preprocess_text + encode_ids, as
run_classifier.py's tokenize_fn calls them, and classifier_utils.convert_single_example (truncation, `<sep>`,
`<cls>` at the end, segment ids, left padding). Run once with the original's dependencies (absl, tensorflow for
classifier_utils' imports, sentencepiece), as tests/data/make_tf_checkpoint.py:
    /tmp/tfenv/bin/python tests/data/make_original_inputs.py --xlnet-repo PATH/TO/xlnet
"""

from __future__ import annotations

import json
import types
from functools import partial
from pathlib import Path

from make_tf_checkpoint import ROOT, SPIECE, embedded_spiece, generator_args, original_code

TEXTS = [
    "I was born in 2000, and this is falsé.",
    "I was born in 92000, and 1,000,000 people came; 7, 8, 9,",
    "  Runs   of\tspaces,\nnewlines  and a trailing space ",
    "He said ``hello'' and 'goodbye' in Paris",
    "Café naïve résumé élan Zoë façade garçon Ångström",
    "Decomposed: Ångstro\u0308m and e\u0301lan",
    "UPPER lower MiXeD 3.14159 -42 +7 1e-5",
    "the ﬁne ﬂour (ligatures), “curly quotes” — dashes – and … ellipses",
    "numbers2000, words,with,commas and 5,",
    "<sep> <cls> <mask> are plain text here",
    "",
]
# (text_a, text_b): single sentences and pairs, short and truncated (equal lengths included: which side loses a
# token on a tie)
PAIRS = [
    ("The cat sat on the mat.", None),
    ("A bird in the hand is worth two in the bush, they say, and they say it often.", None),
    ("Who wrote it?", "It was written in 1605 by Cervantes."),
    ("one two three four five six seven eight", "nine ten eleven twelve thirteen fourteen fifteen sixteen"),
    ("alpha beta gamma delta", "epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi"),
    ("a b c d e f g h i j", "k l m n o p q r s t"),
]
MAX_SEQ_LENGTH = 16


def main() -> None:
    args = generator_args(__doc__, "original_inputs.json")

    original_code(args.xlnet_repo)

    import classifier_utils  # the original XLNet code
    from prepro_utils import encode_ids, preprocess_text

    sp = embedded_spiece()
    encoded = [{"text": text, "lower": lower, "ids": encode_ids(sp, preprocess_text(text, lower=lower))}
               for lower in (False, True) for text in TEXTS]
    tokenize_fn = partial(lambda text: encode_ids(sp, preprocess_text(text, lower=False)))
    features = []
    for i, (a, b) in enumerate(PAIRS):
        example = types.SimpleNamespace(guid=str(i), text_a=a, text_b=b, label="x")
        f = classifier_utils.convert_single_example(i, example, ["x"], MAX_SEQ_LENGTH, tokenize_fn)
        features.append({"text_a": a, "text_b": b, "input_ids": f.input_ids, "input_mask": f.input_mask,
                         "segment_ids": f.segment_ids})
    data = {"spiece_model": str(SPIECE.relative_to(ROOT)), "max_seq_length": MAX_SEQ_LENGTH, "encoded": encoded,
            "classifier_features": features}
    one = partial(json.dumps, ensure_ascii=False)  # a record per line: readable diffs
    lines = [f' "{k}": {one(v)},' for k, v in data.items() if not isinstance(v, list)]
    for key in ("encoded", "classifier_features"):
        lines += [f' "{key}": [', ",\n".join("  " + one(r) for r in data[key]), " ],"]
    Path(args.out).write_text("{\n" + "\n".join(lines).rstrip(",") + "\n}\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(encoded)} encodings, {len(features)} classifier features")


if __name__ == "__main__":
    main()
