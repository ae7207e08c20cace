"""xlnet.tokenizer: special ids, XLNet cleanup, parity with HF's XLNetTokenizer, input layout, CLI."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from xlnet import cli
from xlnet.errors import XLNetError
from helpers import original_tokenizer
from xlnet.tokenizer import (CLS_ID, EOD_ID, PAD_ID, SEP_ID, SPECIAL_PIECES, Tokenizer, batch_inputs, build_inputs,
                             preprocess_text, train_tokenizer)

CORPUS = """The café served naïve crème brûlée to 1,000 guests in 1999, and 2,500 in 2000.
``Quoted text'' is normalized by XLNet; so are 'single' quotes.
Numbers like 9, 10, 11, 12, 13 and 3,14 appear often, 42, 7, 8.
Résumé, façade, jalapeño, Zürich and São Paulo have accents.
A quick brown fox jumps over the lazy dog while the cat sleeps.
Tabs\tand   runs of spaces   should collapse.
"""

TEXTS = [
    "Hello world", "``like this''", "café naïve Zürich", "1,000 and 9,", "In 1999, 2000, and 3,14,",
    "日本語のテキスト", "emoji 🙂 here", "  lots   of\t\twhitespace \n and newlines\n", "", "   ",
    "CAPS and lower", "x,y,z 12,", "façade — dash – en", "ﬁ ligature ２ full-width",
]


def _corpus_file(tmp: Path) -> Path:
    path = tmp / "corpus.txt"
    path.write_text(CORPUS * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny tokenizers (cased+accents, uncased+stripped) trained once per session."""
    tmp = tmp_path_factory.mktemp("tok")
    corpus = _corpus_file(tmp)
    return {"cased": train_tokenizer([corpus], tmp / "cased", vocab_size=200, seed=1),
            "uncased": train_tokenizer([corpus], tmp / "uncased", vocab_size=200, lowercase=True,
                                       strip_accents=True, seed=1)}


def _hf(tok_dir: Path, tmp: Path, **cfg):
    import transformers
    d = tmp / ("hf-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.items())))
    d.mkdir(exist_ok=True)
    shutil.copy(tok_dir / "spiece.model", d / "spiece.model")
    # HF 5.x builds its fast XLNetTokenizer from a directory holding spiece.model (not from vocab_file=)
    return transformers.XLNetTokenizer.from_pretrained(str(d), **cfg)


def test_special_ids_and_settings(tok_dirs):
    for d in tok_dirs.values():
        tok = Tokenizer.load(d)
        assert [tok.id_to_piece(i) for i in range(9)] == list(SPECIAL_PIECES)
        assert tok.piece_to_id("<cls>") == CLS_ID and tok.piece_to_id("<eod>") == EOD_ID
        assert (d / "tokenizer.json").is_file()
    assert Tokenizer.load(tok_dirs["uncased"]).lowercase and not Tokenizer.load(tok_dirs["cased"]).lowercase
    # the .model file itself also loads (with XLNet's defaults)
    assert Tokenizer.load(tok_dirs["cased"] / "spiece.model").vocab_size == Tokenizer.load(tok_dirs["cased"]).vocab_size


@pytest.mark.parametrize("variant", ["cased", "uncased"])
def test_ids_match_hf(tok_dirs, tmp_path, variant):
    lower = variant == "uncased"
    hf = _hf(tok_dirs[variant], tmp_path, do_lower_case=lower)
    # our HF-style loading reads tokenizer_config.json flags; HF 5.x always strips accents (keep_accents is
    # ignored by its fast normalizer), so parity is checked with accent stripping on
    ours = Tokenizer.load(tok_dirs[variant])
    ours.strip_accents = True
    compared = 0
    for text in TEXTS:
        raw = ours.sp.encode(ours.preprocess(text), out_type=str)
        if any(len(p) > 1 and p[-1] == "," and p[-2].isdigit() for p in raw):
            # HF 5.x's fast tokenizer lacks the original "9," re-split; ours keeps it (tested below)
            continue
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
        compared += 1
    assert compared >= len(TEXTS) - 3
    for a, b in [("Hello world", "café 1,000"), ("", "x"), ("``q''", "日本語 🙂")]:
        got = build_inputs(ours.encode(a), ours.encode(b), pad=False)
        want = hf(a, b, return_token_type_ids=True)
        assert got["input_ids"] == want["input_ids"], (a, b)
        assert got["token_type_ids"] == want["token_type_ids"], (a, b)
        assert got["attention_mask"] == want["attention_mask"]
    single = build_inputs(ours.encode("Hello"), pad=False)
    assert single["input_ids"] == hf("Hello")["input_ids"]


def test_hf_style_dir_reads_tokenizer_config(tok_dirs, tmp_path):
    d = tmp_path / "hfdir"
    d.mkdir()
    shutil.copy(tok_dirs["cased"] / "spiece.model", d / "spiece.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "keep_accents": True}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))  # HF's own file: ignored
    tok = Tokenizer.load(d)
    assert tok.lowercase and not tok.strip_accents
    assert tok.encode("HELLO") == tok.encode("hello")


def test_preprocess_and_digit_comma_split(tmp_path):
    assert preprocess_text("  a\t ``b''  c ") == 'a "b" c'
    assert preprocess_text("Café", lowercase=True, strip_accents=True) == "cafe"
    # a model that learned pieces like "▁1999," (split_by_number off) must have them re-split
    corpus = tmp_path / "nums.txt"
    corpus.write_text("In 1999, 2000, 1999, and 1999, again 2000, then 1999,\n" * 200, encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.read_text().splitlines()), model_writer=model, vocab_size=60,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=list(SPECIAL_PIECES[3:8]),
        user_defined_symbols=["<eop>"], split_by_number=False, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "spiece.model").write_bytes(model.getvalue())
    tok = Tokenizer.load(tmp_path / "m")
    raw = tok.sp.encode("In 1999, again", out_type=str)
    assert any(p[-1] == "," and p[-2].isdigit() for p in raw if len(p) > 1), raw
    pieces = tok.encode_pieces("In 1999, again")
    assert "," in pieces and not any(len(p) > 1 and p.endswith(",") and p[-2].isdigit() for p in pieces)
    assert tok.decode(tok.encode("In 1999, again")) == "In 1999, again"


def test_offsets_point_into_original_text(tok_dirs):
    tok = Tokenizer.load(tok_dirs["uncased"])
    text = "  The  ``café''\tserved 1,000 GUESTS 日本語 🙂 "
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert len(offsets) == len(ids)
    for (s, e), i in zip(offsets, ids):
        assert 0 <= s <= e <= len(text)
        piece = tok.id_to_piece(i).lstrip("▁")
        if piece and i != 0 and piece.isalnum():
            assert tok.preprocess(text[s:e]).startswith(piece[:1]), (piece, text[s:e])
    starts = [s for s, _ in offsets]
    assert starts == sorted(starts)
    words = {text[s:e] for s, e in offsets}
    assert "``" in "".join(words) or '"' not in "".join(words)


def test_decode_and_word_starts(tok_dirs):
    tok = Tokenizer.load(tok_dirs["cased"])
    text = "The quick brown fox"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [SEP_ID, CLS_ID]) == text
    assert tok.decode([*ids, SEP_ID], skip_special=False).endswith("<sep>")
    table = tok.word_start_table()
    assert table.shape == (tok.vocab_size,) and table.dtype == bool
    assert table[ids[0]] and tok.is_word_start(ids[0])
    assert all(table[i] == tok.id_to_piece(i).startswith(("▁", "<")) or tok.id_to_piece(i) in ",.;:'\"()-"
               for i in range(tok.vocab_size))


def test_build_inputs_layout_truncation_padding():
    out = build_inputs([10, 11, 12, 13], [20, 21], max_len=8)
    assert out["input_ids"] == [10, 11, 12, SEP_ID, 20, 21, SEP_ID, CLS_ID]  # longest-first truncation
    assert out["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 2]
    out = build_inputs([10, 11], None, max_len=6)
    assert out["input_ids"] == [PAD_ID, PAD_ID, 10, 11, SEP_ID, CLS_ID]
    assert out["token_type_ids"] == [3, 3, 0, 0, 0, 2]
    assert out["attention_mask"] == [0, 0, 1, 1, 1, 1]
    out = build_inputs([1] * 10, [2] * 10, max_len=9)
    assert out["input_ids"].count(1) == 3 and out["input_ids"].count(2) == 3
    batch = batch_inputs([([10], [20, 21]), ([10, 11, 12], None)])
    assert batch["input_ids"].tolist() == [[10, SEP_ID, 20, 21, SEP_ID, CLS_ID], [PAD_ID, 10, 11, 12, SEP_ID, CLS_ID]]
    assert batch["attention_mask"].tolist()[1] == [0, 1, 1, 1, 1, 1]
    assert str(batch["input_ids"].dtype) == "torch.int64"


def test_wrong_special_ids_rejected(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines() * 20), model_writer=model,
                                   vocab_size=120, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(XLNetError, match="plain.model"):
        Tokenizer.load(path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(XLNetError, match="junk.model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(XLNetError, match="nothere"):
        Tokenizer.load(tmp_path / "nothere")


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_cli_train_and_bad_inputs(tmp_path, capsys):
    corpus = _corpus_file(tmp_path)
    gz = tmp_path / "corpus.txt.gz"
    gz.write_bytes(gzip.compress(corpus.read_bytes()))
    code, _ = _cli(["tokenizer", "train", "--input", str(gz), "--vocab-size", "150", "--out",
                    str(tmp_path / "out")], capsys)
    assert code == 0 and Tokenizer.load(tmp_path / "out").vocab_size > 9

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02\n")
    (tmp_path / "latin1.txt").write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    for name, match in [("missing.txt", "missing.txt"), ("empty.txt", "empty.txt"), ("bin.txt", "bin.txt:1"),
                        ("latin1.txt", "latin1.txt:2")]:
        out = tmp_path / f"out-{name}"
        code, err = _cli(["tokenizer", "train", "--input", str(corpus), str(tmp_path / name), "--vocab-size",
                          "150", "--out", str(out)], capsys)
        assert code == 2, name
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tokenizer", "train", "--help"])
    assert e.value.code == 0
    assert "--vocab-size" in capsys.readouterr().out


def test_cli_warns_when_the_vocab_comes_out_short(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(CORPUS, encoding="utf-8")
    code = cli.main(["tokenizer", "train", "--input", str(small), "--vocab-size", "50000", "--out",
                     str(tmp_path / "short")])
    captured = capsys.readouterr()
    got = Tokenizer.load(tmp_path / "short").vocab_size
    assert code == 0 and got < 50000
    assert captured.err.count("\n") == 1 and "warning" in captured.err, captured.err
    assert f"{got} pieces" in captured.err and "50000" in captured.err and "--vocab-size" in captured.err
    # a vocabulary of the asked size says nothing on stderr
    code = cli.main(["tokenizer", "train", "--input", str(small), "--vocab-size", "100", "--out",
                     str(tmp_path / "full")])
    assert code == 0 and capsys.readouterr().err == "" and Tokenizer.load(tmp_path / "full").vocab_size == 100


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_rejects_non_positive_sample_sentences(tmp_path, capsys, value):
    code, err = _cli(["tokenizer", "train", "--input", str(_corpus_file(tmp_path)), "--sample-sentences", value,
                      "--vocab-size", "150", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--sample-sentences" in err and value in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("lowercase", "yes"), ("strip_accents", 1), ("remove_space", None),
                                         ("vocab_size", True), ("vocab_size", "200")])
def test_settings_field_types_checked(tok_dirs, tmp_path, field, value):
    d = tmp_path / "tok"
    shutil.copytree(tok_dirs["cased"], d)
    settings = json.loads((d / "tokenizer.json").read_text())
    settings[field] = value
    (d / "tokenizer.json").write_text(json.dumps(settings))
    with pytest.raises(XLNetError, match=f'tokenizer.json: field "{field}" must be') as e:
        Tokenizer.load(d)
    assert json.dumps(value) in str(e.value) and "\n" not in str(e.value)


def test_train_on_a_directory(tmp_path, capsys):
    tree = tmp_path / "corp"
    (tree / "sub").mkdir(parents=True)
    (tree / ".cache").mkdir()
    lines = CORPUS.splitlines()
    files = [tree / "a.txt", tree / "sub" / "b.jsonl.gz"]
    files[0].write_text("\n".join(lines[:3] * 30) + "\n")
    files[1].write_bytes(gzip.compress("".join(json.dumps({"text": l}) + "\n" for l in lines[3:] * 30).encode()))
    for skipped in (tree / ".hidden.txt", tree / ".cache" / "c.txt", tree / "sub" / "notes.md"):
        skipped.write_text("Skipped zebra xylophone quokka text.\n" * 50)
    ref = train_tokenizer(files, tmp_path / "ref", vocab_size=120, seed=1)
    code, err = _cli(["tokenizer", "train", "--input", str(tree), "--vocab-size", "120", "--seed", "1", "--out",
                      str(tmp_path / "dir")], capsys)
    assert code == 0, err
    assert (tmp_path / "dir" / "spiece.model").read_bytes() == (ref / "spiece.model").read_bytes()
    (tmp_path / "bare").mkdir()
    code, err = _cli(["tokenizer", "train", "--input", str(tmp_path / "bare"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bare" in err and len(err.strip().splitlines()) == 1, err


# What the original XLNet code makes of text with the embedded spiece.model (tests/data/make_original_inputs.py ran
# zihangdai/xlnet's prepro_utils and classifier_utils): the oracle for cleanup, splitting and the input layout.
ORIGINAL = json.loads((Path(__file__).parent / "data" / "original_inputs.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", ORIGINAL["encoded"], ids=lambda c: f"{'uncased' if c['lower'] else 'cased'}:"
                                                              f"{c['text'][:24]}")
def test_encode_equals_the_original_prepro_utils(case):
    """Accents (composed and decomposed), `` '' quotes, runs of spaces, ligatures, and the "9," re-split."""
    assert original_tokenizer(case["lower"]).encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", ORIGINAL["classifier_features"], ids=lambda c: c["text_a"][:24])
def test_build_inputs_equal_the_original_classifier_features(case):
    """convert_single_example: A <sep> B <sep> <cls>, segment ids 0/1/2, truncation longest-first with B losing
    on a tie, left padding. Padding differs only in values nothing reads (masked keys, unread rows): the original
    pads with id 0 and segment 4, ours (as HF's tokenizer) with <pad> and segment 3."""
    tok = original_tokenizer(False)
    b = tok.encode(case["text_b"]) if case["text_b"] else None
    ours = build_inputs(tok.encode(case["text_a"]), b, ORIGINAL["max_seq_length"])
    assert ours["attention_mask"] == [1 - m for m in case["input_mask"]]
    real = [i for i, m in enumerate(case["input_mask"]) if m == 0]
    assert [ours["input_ids"][i] for i in real] == [case["input_ids"][i] for i in real]
    assert [ours["token_type_ids"][i] for i in real] == [case["segment_ids"][i] for i in real]
    assert all(ours["input_ids"][i] == PAD_ID for i in range(len(ours["input_ids"])) if i not in real)
