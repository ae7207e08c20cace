"""xlnet.data.prepare: shards, sentence ids, validation split, checksums, bad inputs, CLI."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from xlnet import cli
from xlnet.data.prepare import load_corpus, prepare
from xlnet.errors import XLNetError
from xlnet.tokenizer import EOD_ID, SPECIAL_PIECES, Tokenizer, train_tokenizer

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A second sentence follows the first one.",
    "Numbers such as 1,000 and 42 appear here.",
    "Accented words: café, naïve, Zürich.",
    "Short line.",
]


def _text_corpus(n_docs: int = 60) -> str:
    docs = []
    for d in range(n_docs):
        docs.append("\n".join(f"Document {d} line {k}: {LINES[(d + k) % len(LINES)]}" for k in range(1 + d % 4)))
    return "\n\n".join(docs) + "\n"


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ptok")
    src = tmp / "train.txt"
    src.write_text(_text_corpus() * 5, encoding="utf-8")
    return train_tokenizer([src], tmp / "tok", vocab_size=150, seed=0)


@pytest.fixture()
def corpus_txt(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(_text_corpus(), encoding="utf-8")
    return p


def _expected_docs(text: str) -> list[list[str]]:
    return [[l for l in block.splitlines() if l.strip()] for block in text.split("\n\n") if block.strip()]


def test_round_trip_txt(tok_dir, corpus_txt, tmp_path):
    out = prepare(tok_dir, [corpus_txt], tmp_path / "data", valid_fraction=0.0, progress=False)
    c = load_corpus(out, "train", expected_vocab_size=Tokenizer.load(tok_dir).vocab_size)
    tok = Tokenizer.load(tok_dir)
    docs = _expected_docs(corpus_txt.read_text())
    want_tokens, want_sids, sid = [], [], True
    for doc in docs:
        for line in doc:
            ids = tok.encode(line)
            want_tokens += ids
            want_sids += [sid] * len(ids)
            sid = not sid
        want_tokens.append(EOD_ID)
        want_sids.append(want_sids[-1])
    assert c.tokens.dtype == np.uint16 and c.sent_ids.dtype == bool
    assert c.tokens.tolist() == want_tokens
    assert c.sent_ids.tolist() == want_sids
    assert c.num_documents == len(docs) and int((c.tokens == EOD_ID).sum()) == len(docs)
    # decoding one document gives back its lines
    first_eod = int(np.argmax(c.tokens == EOD_ID))
    assert tok.decode(c.tokens[:first_eod]) == " ".join(docs[0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tok.vocab_size
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}
    with pytest.raises(XLNetError, match="vocab"):
        load_corpus(out, "train", expected_vocab_size=tok.vocab_size + 1)


def test_jsonl_gz_and_shards(tok_dir, corpus_txt, tmp_path):
    docs = _expected_docs(corpus_txt.read_text())
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": "\n".join(d), "id": i}) + "\n" for i, d in enumerate(docs)))
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    txt_gz = tmp_path / "c.txt.gz"
    txt_gz.write_bytes(gzip.compress(corpus_txt.read_bytes()))
    ref = load_corpus(prepare(tok_dir, [corpus_txt], tmp_path / "ref", valid_fraction=0, progress=False))
    for src in (jl, gz, txt_gz):
        c = load_corpus(prepare(tok_dir, [src], tmp_path / src.name.replace(".", "_"), valid_fraction=0,
                                shard_tokens=100, progress=False))
        assert c.tokens.tolist() == ref.tokens.tolist(), src
        assert c.sent_ids.tolist() == ref.sent_ids.tolist(), src
    manifest = json.loads((tmp_path / "c_txt_gz" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 1


def test_workers_identical_and_valid_split(tok_dir, corpus_txt, tmp_path):
    a = prepare(tok_dir, [corpus_txt], tmp_path / "w1", valid_fraction=0.2, workers=1, seed=3, progress=False)
    b = prepare(tok_dir, [corpus_txt], tmp_path / "w2", valid_fraction=0.2, workers=2, seed=3, progress=False)
    for name in sorted(p.name for p in a.iterdir()):
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = Tokenizer.load(tok_dir)
    train, valid = load_corpus(a, "train"), load_corpus(a, "valid")
    assert train.num_documents + valid.num_documents == len(_expected_docs(corpus_txt.read_text()))
    assert 0 < valid.num_documents < train.num_documents

    def doc_texts(c):
        ends = np.flatnonzero(c.tokens == EOD_ID)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return {tok.decode(c.tokens[s:e]) for s, e in zip(starts, ends)}

    assert not doc_texts(train) & doc_texts(valid)
    # another seed picks other documents
    c = prepare(tok_dir, [corpus_txt], tmp_path / "s4", valid_fraction=0.2, seed=4, progress=False)
    assert doc_texts(load_corpus(c, "valid")) != doc_texts(valid)


def test_checksum_tamper_and_missing(tok_dir, corpus_txt, tmp_path):
    out = prepare(tok_dir, [corpus_txt], tmp_path / "data", valid_fraction=0, progress=False)
    shard = out / "train-00000.tokens.npy"
    arr = np.load(shard)
    arr[3] = (int(arr[3]) + 1) % 100
    np.save(shard, arr)
    with pytest.raises(XLNetError, match="train-00000.tokens.npy"):
        load_corpus(out)
    shard.unlink()
    with pytest.raises(XLNetError, match="train-00000.tokens.npy.*missing"):
        load_corpus(out)
    with pytest.raises(XLNetError, match="manifest.json"):
        load_corpus(tmp_path)


def _bad_tokenizer(tmp: Path) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_text_corpus().splitlines() * 5), model_writer=model,
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    d = tmp / "badtok"
    d.mkdir()
    (d / "spiece.model").write_bytes(model.getvalue())
    return d


def test_bad_inputs(tok_dir, corpus_txt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin.txt").write_bytes("fine\nstill fine\nna\xefve\n".encode("latin-1"))
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    (tmp_path / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    cases = {"empty.txt": "empty.txt", "blank.txt": "blank.txt", "bin.txt": "bin.txt:1", "latin.txt": "latin.txt:3",
             "data.csv": "data.csv", "bad.jsonl": "bad.jsonl:2", "missing.txt": "missing.txt",
             "broken.txt.gz": "broken.txt.gz", "missing_dir": "missing_dir: no such file or directory"}
    for name, match in cases.items():
        out = tmp_path / f"out-{name}"
        code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), str(tmp_path / name),
                         "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{name}")]
    bad = _bad_tokenizer(tmp_path)
    code = cli.main(["prepare", "--tokenizer", str(bad), "--input", str(corpus_txt), "--out",
                     str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "badtok/spiece.model" in err and SPECIAL_PIECES[3] in err


def test_cli_ok_and_help(tok_dir, corpus_txt, tmp_path, capsys):
    code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), "--out",
                     str(tmp_path / "d"), "--valid-fraction", "0.1", "--no-progress"])
    assert code == 0 and "train:" in capsys.readouterr().out
    # re-running replaces the directory whole
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), "--out",
                     str(tmp_path / "d"), "--valid-fraction", "0", "--no-progress"]) == 0
    with pytest.raises(XLNetError, match="valid"):
        load_corpus(tmp_path / "d", "valid")
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare", "--help"])
    assert e.value.code == 0 and "--shard-tokens" in capsys.readouterr().out


def _corpus_tree(root: Path, corpus_txt: Path) -> list[Path]:
    """A directory of inputs plus files a directory input must skip; returns the inputs in sorted order."""
    docs = _expected_docs(corpus_txt.read_text())
    (root / "b").mkdir(parents=True)
    (root / ".git").mkdir()
    inputs = [root / "a.jsonl", root / "b" / "part1.txt", root / "b" / "part2.txt.gz", root / "c.txt"]
    inputs[0].write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n" for d in docs[:20]))
    inputs[1].write_text("\n\n".join("\n".join(d) for d in docs[20:40]) + "\n")
    inputs[2].write_bytes(gzip.compress(("\n\n".join("\n".join(d) for d in docs[40:50]) + "\n").encode()))
    inputs[3].write_text("\n\n".join("\n".join(d) for d in docs[50:]) + "\n")
    for skipped in (root / ".hidden.txt", root / ".git" / "x.txt", root / "b" / "notes.md"):
        skipped.write_text("Skipped text that must not reach the shards.\n")
    return inputs


def test_directory_input(tok_dir, corpus_txt, tmp_path, capsys):
    inputs = _corpus_tree(tmp_path / "corp", corpus_txt)
    ref = load_corpus(prepare(tok_dir, inputs, tmp_path / "ref", valid_fraction=0, progress=False))
    out = prepare(tok_dir, [tmp_path / "corp"], tmp_path / "fromdir", valid_fraction=0, progress=False)
    c = load_corpus(out)
    assert c.tokens.tolist() == ref.tokens.tolist() and c.sent_ids.tolist() == ref.sent_ids.tolist()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(p) for p in inputs]
    # a directory mixes with files on the command line
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(tmp_path / "corp" / "b"),
                     str(corpus_txt), "--out", str(tmp_path / "mixed"), "--valid-fraction", "0",
                     "--no-progress"]) == 0
    mixed = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert [i["path"] for i in mixed["inputs"]] == [str(inputs[1]), str(inputs[2]), str(corpus_txt)]
    # a directory holding no input file (only hidden or other files) is a one-line error naming it
    capsys.readouterr()
    bare = tmp_path / "bare"
    (bare / ".hid").mkdir(parents=True)
    (bare / ".hid" / "x.txt").write_text("hidden\n")
    (bare / "readme.md").write_text("not an input\n")
    code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(bare), "--out", str(tmp_path / "o"),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bare" in err and "no input file" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_empty_valid_split_fails_with_a_hint(tok_dir, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text(_text_corpus(3), encoding="utf-8")
    out = tmp_path / "data"
    code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(small), "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "valid split is empty" in err and "3 documents" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".data")]
    # the suggested fraction does hold a document out
    hint = err.split("use --valid-fraction ")[1].split()[0]
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(small), "--out", str(out),
                     "--valid-fraction", hint, "--no-progress"]) == 0
    assert load_corpus(out, "valid").num_documents >= 1


def test_workers_validated(tok_dir, corpus_txt, tmp_path, capsys):
    code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), "--out",
                     str(tmp_path / "neg"), "--workers", "-3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers" in err and "-3" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "neg").exists()
    # 0 keeps meaning "tokenize in this process", as 1 does
    assert cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), "--out",
                     str(tmp_path / "zero"), "--workers", "0", "--valid-fraction", "0.2", "--no-progress"]) == 0


def test_out_that_is_not_prepared_data_is_refused_before_any_work(tok_dir, corpus_txt, tmp_path, capsys,
                                                                  monkeypatch):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    monkeypatch.setattr(Tokenizer, "load", lambda *a: pytest.fail("tokenizer loaded for a refused --out"))
    for out, message in ((user, "userdir: exists and is not a prepared data directory (no manifest.json); choose "
                                "another path or remove it"), (notes, "notes.txt: exists and is not a directory")):
        code = cli.main(["prepare", "--tokenizer", str(tok_dir), "--input", str(corpus_txt), "--out", str(out),
                         "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and notes.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rerun_replaces_its_own_output_and_files_follow_the_umask(tok_dir, corpus_txt, tmp_path):
    out = tmp_path / "data"
    out.mkdir()  # an empty directory is fine too
    prepare(tok_dir, [corpus_txt], out, valid_fraction=0, progress=False)
    (out / "stale.npy").write_text("from the last run")
    old = os.umask(0o022)
    try:
        prepare(tok_dir, [corpus_txt], out, valid_fraction=0, progress=False)
    finally:
        os.umask(old)
    assert not (out / "stale.npy").exists() and load_corpus(out).num_documents > 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in out.iterdir()} == {"0o644"}
