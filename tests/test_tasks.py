"""Readers on small files in the public formats, featurization layout, SQuAD windows and decoding."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from xlnet import tasks as T
from xlnet.errors import XLNetError
from xlnet.tokenizer import CLS_ID, PAD_ID, SEP_ID, truncate_longest_first

from helpers import original_tokenizer

CLS, SEP, PAD = CLS_ID, SEP_ID, PAD_ID


class FakeTokenizer:
    """Whitespace words cut into pieces of at most 4 characters; ids assigned on first sight from 10 up."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inv: dict[int, str] = {}

    @property
    def vocab_size(self):
        return 10 + len(self.vocab)

    def _id(self, piece):
        if piece not in self.vocab:
            self.vocab[piece] = 10 + len(self.vocab)
            self.inv[self.vocab[piece]] = piece
        return self.vocab[piece]

    def encode_with_offsets(self, text):
        ids, offsets = [], []
        for m in re.finditer(r"\S+", text):
            for k in range(m.start(), m.end(), 4):
                end = min(k + 4, m.end())
                ids.append(self._id(text[k:end]))
                offsets.append((k, end))
        return ids, offsets

    def encode(self, text):
        return self.encode_with_offsets(text)[0]

    def decode(self, ids):
        return " ".join(self.inv.get(i, "?") for i in ids)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ GLUE


def test_registry():
    assert T.get_task("SST-2").name == "sst2"
    assert T.get_task("MNLI-MM").dev_names == ("dev_mismatched",)
    # GLUE's MNLI folder has no test.tsv: test_matched.tsv / test_mismatched.tsv (finetune.split_file tries these)
    assert T.get_task("mnli").test_names == ("test", "test_matched")
    assert T.get_task("mnli-mm").test_names == ("test_mismatched",) and T.get_task("sst2").test_names == ("test",)
    with pytest.raises(XLNetError, match="unknown task"):
        T.get_task("nope")


def test_cola_train_and_test(tmp_path):
    f = write(tmp_path / "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                                    "gj04\t0\t*\tThe more books I ask to whom he will give.\n")
    ex = T.read_glue(T.get_task("cola"), f)
    assert [(e.id, e.label, e.text_b) for e in ex] == [("0", "1", None), ("1", "0", None)]
    assert ex[1].text_a.startswith("The more books")
    t = write(tmp_path / "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    ex = T.read_glue(T.get_task("cola"), t)
    assert ex[0].text_a == "Bill whistled past the house." and ex[0].label is None


def test_cola_malformed(tmp_path):
    f = write(tmp_path / "dev.tsv", "gj04\t1\t\tFine.\ngj04\t1\tmissing\n")
    with pytest.raises(XLNetError, match=r"dev\.tsv:2: expected 4 columns, got 3"):
        T.read_glue(T.get_task("cola"), f)
    f = write(tmp_path / "dev.tsv", "gj04\t1\t\tFine.\ngj04\t1\t\tA tab\tinside.\n")  # would cut the text
    with pytest.raises(XLNetError, match=r"dev\.tsv:2: expected 4 columns, got 5"):
        T.read_glue(T.get_task("cola"), f)
    f = write(tmp_path / "dev.tsv", "gj04\t1\t\tFine.\ngj04\t7\t\tBad label.\n")
    with pytest.raises(XLNetError, match=r"dev\.tsv:2: unknown label '7'"):
        T.read_glue(T.get_task("cola"), f)
    with pytest.raises(XLNetError, match=r"empty\.tsv:1: empty file"):
        T.read_glue(T.get_task("cola"), write(tmp_path / "empty.tsv", ""))


def test_sst2_mrpc_stsb_qqp(tmp_path):
    sst = write(tmp_path / "sst.tsv", "sentence\tlabel\nit 's a charming journey . \t1\n")
    assert T.read_glue(T.get_task("sst2"), sst)[0].label == "1"
    mrpc = write(tmp_path / "mrpc.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                        "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him .\n")
    e = T.read_glue(T.get_task("mrpc"), mrpc)[0]
    assert (e.text_a, e.text_b, e.label) == ("Amrozi accused his brother .", "Referring to him .", "1")
    sts = write(tmp_path / "sts.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                                      "sentence2\tscore\n0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\t"
                                      "A man with a hard hat is dancing.\tA man wearing a hard hat is dancing.\t5.000\n")
    assert T.read_glue(T.get_task("stsb"), sts)[0].label == 5.0
    bad = write(tmp_path / "sts_bad.tsv", sts.read_text().replace("5.000", "five"))
    with pytest.raises(XLNetError, match=r"sts_bad\.tsv:2: label 'five' is not a number"):
        T.read_glue(T.get_task("stsb"), bad)
    qqp = write(tmp_path / "qqp.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                      "201359\t303345\t303346\tWhy are African-Americans so beautiful?\t"
                                      "Why are hispanics so beautiful?\t0\n")
    assert T.read_glue(T.get_task("qqp"), qqp)[0].text_b == "Why are hispanics so beautiful?"
    qqp_test = write(tmp_path / "qqp_test.tsv", "id\tquestion1\tquestion2\n0\tWhat?\tWho?\n")
    assert T.read_glue(T.get_task("qqp"), qqp_test)[0].label is None


def test_mnli_dev_matched_and_missing_column(tmp_path):
    cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "label2", "label3",
            "label4", "label5", "gold_label"]
    row = ["0", "63735", "63735n", "slate", "( x )", "( y )", "(ROOT x)", "(ROOT y)",
           "The new rights are nice enough", "Everyone really likes the newest benefits",
           "neutral", "entailment", "neutral", "neutral", "neutral", "neutral"]
    f = write(tmp_path / "dev_matched.tsv", "\t".join(cols) + "\n" + "\t".join(row) + "\n")
    e = T.read_glue(T.get_task("mnli"), f)[0]
    assert (e.text_a, e.label) == ("The new rights are nice enough", "neutral")
    f2 = write(tmp_path / "dev_mismatched.tsv", "\t".join(cols[:9]) + "\n" + "\t".join(row[:9]) + "\n")
    with pytest.raises(XLNetError, match=r"dev_mismatched\.tsv:1: missing column 'sentence2'"):
        T.read_glue(T.get_task("mnli"), f2)


@pytest.mark.parametrize("task,label", [("qnli", "entailment"), ("rte", "not_entailment"), ("wnli", "1")])
def test_qnli_rte_wnli(tmp_path, task, label):
    head = "index\tquestion\tsentence\tlabel\n" if task == "qnli" else "index\tsentence1\tsentence2\tlabel\n"
    f = write(tmp_path / "dev.tsv", head + f"0\tFirst text.\tSecond text.\t{label}\n")
    e = T.read_glue(T.get_task(task), f)[0]
    assert (e.text_a, e.text_b, e.label) == ("First text.", "Second text.", label)


# ------------------------------------------------------------------ generic CSV / JSONL / supersense


def test_csv_and_jsonl(tmp_path):
    spec = T.get_task("classification")
    f = write(tmp_path / "d.csv", 'text,text_b,label\n"Hello, world",other,pos\nbye,,neg\n')
    ex = T.read_table(spec, f)
    assert [(e.text_a, e.text_b, e.label) for e in ex] == [("Hello, world", "other", "pos"), ("bye", None, "neg")]
    with pytest.raises(XLNetError, match=r"d\.csv:3: unknown label 'neg'"):
        T.read_text_examples(spec, f, labels=["pos"])
    j = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y", "id": "k"}\n')
    ex = T.read_table(spec, j)
    assert [(e.id, e.label) for e in ex] == [("0", "x"), ("k", "y")]
    bad = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n')
    with pytest.raises(XLNetError, match=r"bad\.jsonl:2: bad JSON"):
        T.read_table(spec, bad)
    nocol = write(tmp_path / "nocol.jsonl", '{"label": "x"}\n')
    with pytest.raises(XLNetError, match=r"nocol\.jsonl:1: missing or non-string field 'text'"):
        T.read_table(spec, nocol)
    short = write(tmp_path / "short.csv", "text,label\na,b\nc\n")
    with pytest.raises(XLNetError, match=r"short\.csv:3: expected 2 columns, got 1"):
        T.read_table(spec, short)


def test_supersense_gz_with_labels_txt(tmp_path):
    d = tmp_path / "supersense"
    d.mkdir()
    write(d / "labels.txt", "noun.animal\nverb.motion\n")
    rows = [{"text": "a domestic feline", "label": "noun.animal", "lemma": "cat", "pos": "n", "id": "02121620"},
            {"text": "move fast", "label": "verb.motion", "lemma": "run", "pos": "v", "id": "01926311"}]
    with gzip.open(d / "dev.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = T.get_task("supersense")
    ex = T.read_text_examples(spec, d / "dev.jsonl.gz")
    assert [(e.id, e.label) for e in ex] == [("02121620", "noun.animal"), ("01926311", "verb.motion")]
    assert T.resolve_labels(spec, d / "dev.jsonl.gz") == ["noun.animal", "verb.motion"]
    with gzip.open(d / "bad.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "label": "noun.food"}) + "\n")
    with pytest.raises(XLNetError, match=r"bad\.jsonl\.gz:2: unknown label 'noun.food'"):
        T.read_text_examples(spec, d / "bad.jsonl.gz")


def test_jsonl_numbers_and_booleans_are_labels_as_written(tmp_path):
    """Non-string JSON labels are their JSON text (true -> "true", not Python's "True"), so predictions written
    with these names carry the file's values; a regression label must still be a number."""
    spec = T.get_task("classification")
    values = [2, 10, True, False, 1.0]
    f = write(tmp_path / "d.jsonl", "".join(json.dumps({"text": "t", "label": v}) + "\n" for v in values))
    assert [e.label for e in T.read_table(spec, f)] == ["2", "10", "true", "false", "1.0"]
    assert T.labels_from_examples(T.read_table(spec, f)) == ["1.0", "10", "2", "false", "true"]
    assert [e.label for e in T.read_text_examples(spec, f, labels=["true", "false", "2", "10", "1.0"])][2] == "true"
    with pytest.raises(XLNetError, match=r"d\.jsonl:3: unknown label 'true' \(expected one of 2, 10\)"):
        T.read_text_examples(spec, f, labels=["2", "10"])
    reg = T.get_task("regression")
    nums = write(tmp_path / "r.jsonl", '{"text": "a", "label": 2}\n{"text": "b", "label": 2.5}\n')
    assert [e.label for e in T.read_table(reg, nums)] == [2.0, 2.5]
    boolean = write(tmp_path / "b.jsonl", '{"text": "a", "label": true}\n')
    with pytest.raises(XLNetError, match=r"b\.jsonl:1: label 'true' is not a number"):
        T.read_table(reg, boolean)


@pytest.mark.parametrize("task, name, text", [
    ("sst2", "t.tsv", "sentence\tlabel\nfine words\tfoo\nmore words\t\n"),  # unknown and empty labels
    ("classification", "t.jsonl", '{"text": "a", "label": "unknownlabel"}\n{"text": "b", "label": 3}\n'),
    ("regression", "t.jsonl", '{"text": "a", "label": "unknownlabel"}\n{"text": "b", "label": ""}\n'),
    ("regression", "t.csv", "text,label\na,unknownlabel\nb,nan\n")], ids=["tsv", "jsonl", "jsonl-reg", "csv-reg"])
def test_read_labels_false_neither_parses_nor_checks_labels(tmp_path, task, name, text):
    """A distillation transfer file is read for its inputs: whatever its label column holds is not read."""
    spec, f = T.get_task(task), write(tmp_path / name, text)
    with pytest.raises(XLNetError, match=rf"{re.escape(name)}:\d: (unknown label|label .* is not)"):
        T.read_text_examples(spec, f, labels=["x", "y"] if task == "classification" else None)
    ex = T.read_text_examples(spec, f, labels=["x", "y"] if task == "classification" else None, read_labels=False)
    assert [e.label for e in ex] == [None, None] and [e.text_a for e in ex][1] in ("more words", "b")


def _bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_unreadable_files_name_the_line(tmp_path):
    """Bad bytes anywhere in a task file are an XLNetError naming file:line (not a UnicodeDecodeError from a
    decoder's read-ahead chunk, which would also point at the wrong line)."""
    spec = T.get_task("classification")
    good = "".join(f"row {i},x\n" for i in range(3000)).encode()  # > 8 KiB: past the first decoded chunk
    csv_file = _bytes(tmp_path / "d.csv", b"text,label\n" + good + b"caf\xe9,x\n")
    with pytest.raises(XLNetError, match=r"d\.csv:3002: not UTF-8 text"):
        T.read_table(spec, csv_file)
    jsonl = _bytes(tmp_path / "d.jsonl", b'{"text": "a", "label": "x"}\n\x00\x01\x02\n')
    with pytest.raises(XLNetError, match=r"d\.jsonl:2: binary data \(NUL byte\)"):
        T.read_table(spec, jsonl)
    with pytest.raises(XLNetError, match=r"dev\.tsv:2: not UTF-8 text"):
        T.read_glue(T.get_task("cola"), _bytes(tmp_path / "dev.tsv", b"gj04\t1\t\tFine.\ngj04\t1\t\t\xff\n"))
    with pytest.raises(XLNetError, match=r"s\.json:3: not UTF-8 text"):
        T.read_squad(_bytes(tmp_path / "s.json", b'{"data": [\n\n"\xc3("]}\n'))
    whole = gzip.compress(b'{"text": "a", "label": "x"}\n' * 2000)
    with pytest.raises(XLNetError, match=r"cut\.jsonl\.gz: cannot read"):
        T.read_table(spec, _bytes(tmp_path / "cut.jsonl.gz", whole[: len(whole) // 2]))
    member = gzip.compress(b'{"text": "b", "label": "x"}\n')
    damaged = whole + member[:10] + b"\x07" + member[11:]  # a second gzip member whose deflate block type is invalid
    with pytest.raises(XLNetError, match=r"damaged\.jsonl\.gz: cannot read"):
        T.read_table(spec, _bytes(tmp_path / "damaged.jsonl.gz", damaged))
    with pytest.raises(XLNetError, match=r"fake\.jsonl\.gz: cannot read"):
        T.read_table(spec, _bytes(tmp_path / "fake.jsonl.gz", b'{"text": "a", "label": "x"}\n'))


def test_bom_dropped_and_quoted_newlines_kept(tmp_path):
    spec = T.get_task("classification")
    f = _bytes(tmp_path / "bom.csv", b'\xef\xbb\xbftext,label\r\n"two\r\nlines",x\r\nplain,y\r\n')
    ex = T.read_table(spec, f)
    assert [(e.text_a, e.label) for e in ex] == [("two\r\nlines", "x"), ("plain", "y")]


def test_featurize_text_layout():
    tok = FakeTokenizer()
    spec = T.get_task("rte")
    ex = [T.TextExample("0", "one two", "three", "entailment", "x:1"),
          T.TextExample("1", "alpha beta gamma delta", "epsilon zeta", "not_entailment", "x:2")]
    out = T.featurize_text(ex, tok, spec, max_seq_len=8)
    ids, types, mask = out["input_ids"], out["token_type_ids"], out["attention_mask"]
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    # row 0: 3 pads, one two <sep> three <sep> <cls>
    # row 0: one pad, then one two <sep> thre e <sep> <cls> ("three" is two 4-char pieces)
    a1, a2, b1, b2 = (tok.vocab[p] for p in ("one", "two", "thre", "e"))
    assert ids[0].tolist() == [PAD, a1, a2, SEP, b1, b2, SEP, CLS]
    assert types[0].tolist() == [3, 0, 0, 0, 1, 1, 1, 2]
    assert mask[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    # row 1: A = alph a beta gamm a delt a (7 pieces), B = epsi lon zeta (3); budget 8 - 3 specials = 5.
    # Longest-first pops A while A > B, B on a tie (the original _truncate_seq_pair):
    # 7,3 -> 6,3 -> 5,3 -> 4,3 -> 3,3 (total 6) -> 3,2 (total 5).
    a_ids, b_ids = tok.encode("alpha beta gamma delta"), tok.encode("epsilon zeta")
    truncate_longest_first(a_ids, b_ids, 5)
    assert (len(a_ids), len(b_ids)) == (3, 2)
    tie_a, tie_b = [1, 2], [3, 4]
    truncate_longest_first(tie_a, tie_b, 3)
    assert (tie_a, tie_b) == ([1, 2], [3])  # a tie: B loses its last token
    assert ids[1].tolist() == a_ids + [SEP] + b_ids + [SEP, CLS] and mask[1].sum().item() == 8
    assert out["labels"].tolist() == [0, 1]
    reg = T.featurize_text([T.TextExample("0", "x", None, 2.5, "x:1")], tok, T.get_task("stsb"), 6)
    assert reg["labels"].dtype == torch.float32 and reg["input_ids"][0].tolist()[-3:] == [tok.vocab["x"], SEP, CLS]


# ------------------------------------------------------------------ RACE


def _race_file(path, answers=("B",), options=None):
    data = {"answers": list(answers), "options": options or [["red", "blue", "green", "black"]],
            "questions": ["The sky is _ ."], "article": "The sky is blue today .", "id": path.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_race_reader_and_features(tmp_path):
    _race_file(tmp_path / "dev" / "middle" / "1.txt")
    _race_file(tmp_path / "dev" / "high" / "7.txt", answers=("C",))
    ex = T.read_race(tmp_path / "dev")
    assert [(e.id, e.label, e.level) for e in ex] == [("middle-1-0", 1, "middle"), ("high-7-0", 2, "high")]
    assert T.race_qa_text("The sky is _ .", "blue") == "The sky is blue ."
    assert T.race_qa_text("What color?", "blue") == "What color? blue"
    tok = FakeTokenizer()
    out = T.featurize_race(ex, tok, max_seq_len=12, max_qa_len=4)
    assert out["input_ids"].shape == (2, 4, 12) and out["labels"].tolist() == [1, 2]
    row = out["input_ids"][0, 1].tolist()
    # qa "The sky is blue ." -> pieces The sky is blue . (5) keeps last 4; article cut to 12-3-4 = 5 tokens
    assert row[-1] == CLS and row[-2] == SEP and row[-7] == SEP
    assert row[-6:-2] == tok.encode("sky is blue .")
    assert row[:5] == tok.encode("The sky is blue today")[:5]  # "today" -> "toda" "y": cut after "toda"
    assert out["token_type_ids"][0, 1].tolist() == [0] * 6 + [1] * 5 + [2]


def test_race_malformed(tmp_path):
    _race_file(tmp_path / "high" / "1.txt", answers=("E",))
    with pytest.raises(XLNetError, match=r"1\.txt:1: answer 'E'"):
        T.read_race(tmp_path / "high" / "1.txt")
    bad = tmp_path / "middle" / "2.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"article": "x",\n "questions": [}', encoding="utf-8")
    with pytest.raises(XLNetError, match=r"2\.txt:2: bad JSON"):
        T.read_race(bad)
    _race_file(tmp_path / "x" / "3.txt", options=[["a", "b"]])
    with pytest.raises(XLNetError, match=r"3\.txt:1: question 0 needs 4 options"):
        T.read_race(tmp_path / "x" / "3.txt")


# ------------------------------------------------------------------ CoNLL


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_reader_and_features(tmp_path):
    f = write(tmp_path / "dev.txt", CONLL)
    ex = T.read_conll(f)
    assert [e.words for e in ex] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
    assert ex[1].tags == ["B-PER", "I-PER"] and ex[1].where.endswith("dev.txt:8")
    tok = FakeTokenizer()
    labels = ["O", "B-ORG", "B-MISC", "B-PER", "I-PER"]
    out = T.featurize_tokens(ex, tok, max_seq_len=12, labels=labels)
    # sentence 2 pieces: Pete r Blac kbur n -> 5 tokens + <sep> <cls> = 7, 5 pads
    assert out["labels"][1].tolist() == [-100] * 5 + [3, -100, 4, -100, -100] + [-100, -100]
    assert out["word_ids"][1].tolist() == [-1] * 5 + [0, -1, 1, -1, -1, -1, -1]
    assert out["input_ids"][1, -1].item() == CLS
    bad = write(tmp_path / "bad.txt", "EU B-ORG\nrejects\n")
    with pytest.raises(XLNetError, match=r"bad\.txt:2: expected a token and a tag"):
        T.read_conll(bad)
    with pytest.raises(XLNetError, match=r"empty\.txt:1: empty file"):
        T.read_conll(write(tmp_path / "empty.txt", "-DOCSTART- O\n\n"))


# ------------------------------------------------------------------ SQuAD


CONTEXT = "Super Bowl 50 was played at Levi's Stadium in Santa Clara, California on February 7, 2016."


def squad_file(tmp_path, answer_start=None, text="Santa Clara, California", v2=True, name="dev.json"):
    start = CONTEXT.index(text) if answer_start is None else answer_start
    qas = [{"id": "q1", "question": "Where was the game played?",
            "answers": [{"text": text, "answer_start": start}], "is_impossible": False},
           {"id": "q2", "question": "Who won the hockey cup?", "answers": [], "is_impossible": True,
            "plausible_answers": [{"text": "Levi's", "answer_start": 28}]}]
    if not v2:
        qas = qas[:1]
        del qas[0]["is_impossible"]
    data = {"version": "v2.0", "data": [{"title": "SB", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}
    p = tmp_path / name
    p.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return p


def test_squad_reader_errors(tmp_path):
    ex = T.read_squad(squad_file(tmp_path))
    assert [(e.qid, e.is_impossible) for e in ex] == [("q1", False), ("q2", True)]
    p = squad_file(tmp_path, answer_start=3, name="bad.json")
    with pytest.raises(XLNetError, match=r"bad\.json:\d+: answer 'Santa Clara, California' of question 'q1' is not"):
        T.read_squad(p)
    broken = write(tmp_path / "broken.json", '{"data": [\n{"paragraphs": [}\n]}')
    with pytest.raises(XLNetError, match=r"broken\.json:2: bad JSON"):
        T.read_squad(broken)
    with pytest.raises(XLNetError, match=r"notsquad\.json:1: not a SQuAD file"):
        T.read_squad(write(tmp_path / "notsquad.json", "[1, 2]"))


def test_squad_windows_map_answer_both_ways(tmp_path):
    ex = T.read_squad(squad_file(tmp_path))
    tok = FakeTokenizer()
    feats = T.featurize_squad(ex, tok, max_seq_len=24, doc_stride=5, max_query_len=6)
    t = feats.tensors
    n_ctx = len(tok.encode(CONTEXT))
    assert n_ctx > 24  # forces several windows
    assert (t["input_ids"][:, -1] == CLS).all() and (t["cls_index"] == 23).all()
    hits = 0
    for row, win in enumerate(feats.windows):
        ids = t["input_ids"][row].tolist()
        pm = t["p_mask"][row].tolist()
        types = t["token_type_ids"][row].tolist()
        # paragraph positions are exactly the p_mask==0 positions other than <cls>
        assert sorted(win.token_to_char) == [k for k in range(23) if pm[k] == 0]
        assert types[-1] == 2 and pm[-1] == 0
        sep_positions = [k for k, v in enumerate(ids) if v == SEP]
        assert len(sep_positions) == 2 and types[sep_positions[0]] == 0 and types[sep_positions[1]] == 1
        s, e = t["start_positions"][row].item(), t["end_positions"][row].item()
        if win.qid == "q2":
            assert (s, e) == (23, 23) and t["is_impossible"][row].item() == 1.0
        elif s != 23:
            hits += 1
            assert t["is_impossible"][row].item() == 0.0
            text = CONTEXT[win.token_to_char[s][0]: win.token_to_char[e][1]]
            assert text == "Santa Clara, California"
        else:
            assert t["is_impossible"][row].item() == 1.0  # answer outside this window
    assert hits >= 1
    # every context token is owned by exactly one window of its question
    for qid in ("q1", "q2"):
        owned = [win.token_to_char[k] for win in feats.windows if win.qid == qid
                 for k, own in win.max_context.items() if own]
        assert sorted(owned) == sorted(set(owned)) and len(owned) == n_ctx


def _synthetic_outputs(feats, answer, null_logits, start_n=2, end_n=2, layout="hf"):
    """Beam outputs that put a high score on `answer` (window, start, end) and junk elsewhere."""
    w_count = len(feats.windows)
    s_lp = torch.full((w_count, start_n), -5.0)
    s_ix = torch.zeros((w_count, start_n), dtype=torch.long)  # position 0 is padding -> invalid
    e_lp = torch.full((w_count, start_n * end_n), -5.0)
    e_ix = torch.zeros((w_count, start_n * end_n), dtype=torch.long)
    for w, win in enumerate(feats.windows):
        first = min(win.token_to_char)
        s_ix[w, 1] = first  # a weak valid candidate: the first paragraph token alone
        flat = 1 * start_n + 1 if layout == "hf" else 1 * end_n + 1
        e_ix[w, flat] = first
        e_lp[w, flat] = -4.0
    w, s, e = answer
    s_ix[w, 0], s_lp[w, 0] = s, -0.1
    flat = 0 * start_n + 0  # j=0,i=0 is index 0 in both layouts
    e_ix[w, flat], e_lp[w, flat] = e, -0.2
    return s_lp, s_ix, e_lp, e_ix, torch.tensor(null_logits, dtype=torch.float32)


def test_squad_decoding_synthetic(tmp_path):
    ex = T.read_squad(squad_file(tmp_path))
    feats = T.featurize_squad(ex, FakeTokenizer(), max_seq_len=24, doc_stride=5, max_query_len=6)
    t = feats.tensors
    row = next(r for r, win in enumerate(feats.windows)
               if win.qid == "q1" and t["start_positions"][r] != 23
               and win.max_context[t["start_positions"][r].item()])
    s, e = t["start_positions"][row].item(), t["end_positions"][row].item()
    nulls = [3.0 if win.qid == "q2" else -2.0 for win in feats.windows]
    nulls[0] = -3.0 if feats.windows[0].qid == "q1" else nulls[0]
    for layout in ("hf", "tf"):
        outs = _synthetic_outputs(feats, (row, s, e), nulls, layout=layout)
        preds, na = T.squad_predictions(feats, *outs, n_best=5, max_answer_len=30, end_layout=layout)
        assert preds["q1"] == "Santa Clara, California"
        assert preds["q2"] != ""  # always the best span, as the original; the no-answer score decides
        assert na["q1"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(3.0)).item()))  # min logit -3
        assert na["q2"] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-3.0)).item()))
    # probabilities instead of log-probs rank the same
    s_lp, s_ix, e_lp, e_ix, cls = _synthetic_outputs(feats, (row, s, e), nulls)
    preds, _ = T.squad_predictions(feats, s_lp.exp(), s_ix, e_lp.exp(), e_ix, cls, max_answer_len=30)
    assert preds["q1"] == "Santa Clara, California"
    # too-long answers are rejected
    preds, _ = T.squad_predictions(feats, s_lp, s_ix, e_lp, e_ix, cls, max_answer_len=1)
    assert preds["q1"] != "Santa Clara, California"
    out = tmp_path / "pred.json"
    T.write_squad_predictions(preds, {"q1": 0.1, "q2": 0.9}, out, tmp_path / "na.json")
    assert json.loads(out.read_text()) == preds and json.loads((tmp_path / "na.json").read_text())["q2"] == 0.9


# The original run_squad.py's windows and decoding on a small SQuAD 2.0 set, with the embedded spiece.model
# (tests/data/make_original_squad_features.py ran zihangdai/xlnet's code).
ORIGINAL_SQUAD = json.loads((Path(__file__).parent / "data" / "original_squad_features.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def original_squad(tmp_path_factory):
    """Our windows of the oracle's data, with the original's text cleanup (accents stripped)."""
    path = tmp_path_factory.mktemp("squad") / "train.json"
    path.write_text(json.dumps(ORIGINAL_SQUAD["dataset"]), encoding="utf-8")
    return T.featurize_squad(T.read_squad(path), original_tokenizer(), ORIGINAL_SQUAD["max_seq_length"],
                             ORIGINAL_SQUAD["doc_stride"], ORIGINAL_SQUAD["max_query_length"])


def test_squad_windows_equal_the_original_run_squad(original_squad):
    """convert_examples_to_features in training mode, window by window: the ids, segments, p_mask, <cls>, answer
    positions (out-of-window answers at <cls>), max-context flags, and each paragraph token's span of the context
    (the original aligns pieces to characters by a longest common subsequence, ours by SentencePiece's offsets:
    equal up to the whitespace around a token). The original pads on the right, ours on the left: compared
    without padding."""
    feats, t = original_squad, original_squad.tensors
    assert [(w.qid, w.example_index) for w in feats.windows] == [(o["qid"], o["example_index"])
                                                                  for o in ORIGINAL_SQUAD["features"]]
    for w, (win, o) in enumerate(zip(feats.windows, ORIGINAL_SQUAD["features"])):
        pad = int((t["attention_mask"][w] == 0).sum())
        real = lambda name: t[name][w][pad:].long().tolist()  # noqa: E731
        assert (real("input_ids"), real("token_type_ids"), real("p_mask")) == (o["input_ids"], o["segment_ids"],
                                                                               o["p_mask"]), o["qid"]
        positions = [int(t[k][w]) - pad for k in ("cls_index", "start_positions", "end_positions")]
        assert positions == [o["cls_index"], o["start_position"], o["end_position"]], o["qid"]
        assert bool(t["is_impossible"][w]) == o["is_impossible"]
        n = o["paragraph_len"]
        assert [win.max_context[pad + k] for k in range(n)] == o["token_is_max_context"]
        context = feats.examples[win.example_index].context
        ours = [context[slice(*win.token_to_char[pad + k])].strip() for k in range(n)]
        assert ours == [context[s:e + 1].strip() for s, e in zip(o["tok_start_to_orig_index"],
                                                                 o["tok_end_to_orig_index"])], o["qid"]


def test_squad_decoding_equals_the_original_write_predictions(original_squad):
    """The original's answers and null log-odds from the same beam outputs (its [start, end] layout, indices of
    its right-padded windows): answers that cross accents, ligatures and runs of spaces, spans too long, starts
    in windows that do not own them. The null score is the minimum answer-class logit over windows; ours
    returns its sigmoid."""
    feats, beam = original_squad, ORIGINAL_SQUAD["beam"]
    pads = (feats.tensors["attention_mask"] == 0).sum(1, keepdim=True)
    as_tensor = lambda key, dtype: torch.tensor([r[key] for r in beam], dtype=dtype)  # noqa: E731
    predictions, na_probs = T.squad_predictions(
        feats, as_tensor("start_top_log_probs", torch.float64), as_tensor("start_top_index", torch.long) + pads,
        as_tensor("end_top_log_probs", torch.float64), as_tensor("end_top_index", torch.long) + pads,
        as_tensor("cls_logits", torch.float64), n_best=ORIGINAL_SQUAD["n_best"],
        max_answer_len=ORIGINAL_SQUAD["max_answer_length"], end_layout="tf")
    assert predictions == ORIGINAL_SQUAD["answers"]
    odds = {q: torch.logit(torch.tensor(p, dtype=torch.float64)).item() for q, p in na_probs.items()}
    assert odds == pytest.approx(ORIGINAL_SQUAD["null_log_odds"], abs=1e-6)  # (float32 logits)
