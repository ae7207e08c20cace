"""The embedded data under xlnet/assets: present, valid, leak-free, licensed, small."""

from __future__ import annotations

import gzip
import json

import pytest

from xlnet.assets import (ASSETS_DIR, default_corpus_path, default_tokenizer_dir, supersense_labels,
                          supersense_path)
from xlnet.errors import XLNetError
from xlnet.tokenizer import SPECIAL_PIECES, Tokenizer

SPLITS = ("train", "dev", "test")
MIN_SIZE = {"train": 20000, "dev": 2000, "test": 4000}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    out = {}
    for s in SPLITS:
        with gzip.open(supersense_path(s), "rt", encoding="utf-8") as f:
            out[s] = [json.loads(line) for line in f]
    return out


def test_supersense_files_valid(records):
    labels = supersense_labels()
    assert len(labels) == 45 and len(set(labels)) == 45
    assert {"noun.animal", "verb.motion", "adj.all", "noun.Tops", "adv.all"} <= set(labels)
    for s, recs in records.items():
        assert len(recs) >= MIN_SIZE[s], s
        for r in recs:
            assert set(r) == {"text", "label", "lemma", "pos", "id"}
            assert r["text"].strip() and r["lemma"] and r["label"] in labels
            assert r["pos"] in "nvar" and r["id"].startswith(r["pos"])
    train_labels = {r["label"] for r in records["train"]}
    assert len(train_labels) >= 40


def test_splits_disjoint(records):
    ids = {s: {r["id"] for r in recs} for s, recs in records.items()}
    texts = {s: {r["text"] for r in recs} for s, recs in records.items()}
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        assert not ids[a] & ids[b], (a, b)
        assert not texts[a] & texts[b], (a, b)


def test_corpus_has_no_dev_or_test_gloss(records):
    path = default_corpus_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = {line.rstrip("\n") for line in f}
    held_out = {r["text"] for s in ("dev", "test") for r in records[s]}
    assert not lines & held_out
    assert {r["text"] for r in records["train"][:100]} <= lines
    assert "" in lines  # blank lines separate documents


def test_default_tokenizer():
    tok = Tokenizer.load(default_tokenizer_dir())
    assert [tok.id_to_piece(i) for i in range(len(SPECIAL_PIECES))] == list(SPECIAL_PIECES)
    assert tok.vocab_size == 8000 and not tok.lowercase
    ids = tok.encode("a domesticated carnivorous mammal")
    assert 0 not in ids and tok.decode(ids) == "a domesticated carnivorous mammal"


def test_licenses_readme_and_size():
    assert "Princeton" in (ASSETS_DIR / "LICENSE.wordnet").read_text()
    readme = (ASSETS_DIR / "README").read_text()
    assert "WordNet" in readme and "TRAIN" in readme
    if "KJV: one verse" in readme:
        assert "public domain" in (ASSETS_DIR / "LICENSE.kjv").read_text()
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total <= 6 * 1024 * 1024


def test_bad_split_name():
    with pytest.raises(XLNetError, match="validation"):
        supersense_path("validation")
