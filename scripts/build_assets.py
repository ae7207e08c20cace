#!/usr/bin/env python
"""Build the embedded data under src/xlnet/assets/ from Debian's wordnet-base (and bible-kjv, if present).

    python scripts/build_assets.py [--wordnet /usr/share/wordnet] [--no-kjv] [--out src/xlnet/assets]

Outputs (all deterministic):
    supersense/{train,dev,test}.jsonl.gz, supersense/labels.txt   WordNet supersense classification
    corpus/corpus.txt.gz                                            train-split glosses (+ KJV), for pretraining
    tokenizer/                                                      SentencePiece vocab 8000, cased
    LICENSE.wordnet, LICENSE.kjv, README
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from xlnet.fileio import atomic_write
from xlnet.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# lexnames(5WN): lex_filenum -> lexicographer file name (the supersense)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_FILES = (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv"))
DOC_SYNSETS = 50  # synsets per corpus document
SIZE_CAP = 6 * 1024 * 1024
# synsets shipped per supersense split (a hash-chosen subsample, to stay under SIZE_CAP with the corpus)
SHIP = {"train": 32000, "dev": 4000, "test": 6000}


def split_of(synset_id: str) -> str:
    """10% test, 10% dev, 80% train, by a hash of the synset id (stable across WordNet file orderings)."""
    bucket = int(hashlib.sha256(synset_id.encode()).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def subsample(recs: list[dict], n: int) -> list[dict]:
    """The n records with the smallest id hash (deterministic), kept in WordNet file order."""
    key = lambda r: hashlib.sha256(b"ship:" + r["id"].encode()).hexdigest()
    keep = {r["id"] for r in sorted(recs, key=key)[:n]}
    return [r for r in recs if r["id"] in keep]


def parse_synsets(wordnet: Path) -> list[dict]:
    records = []
    for pos, name in POS_FILES:
        with open(wordnet / f"data.{name}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # license header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, lex_filenum = fields[0], int(fields[1])
                lemma = re.sub(r"\([a-z]+\)$", "", fields[4]).replace("_", " ")  # drop adj markers like (p)
                text = " ".join(gloss.split())
                if not text:
                    continue
                label = LEXNAMES[lex_filenum]
                assert label.split(".")[0] == name or (name == "adj" and label.startswith("adj")), (offset, label)
                records.append({"text": text, "label": label, "lemma": lemma, "pos": pos, "id": pos + offset})
    return records


def gz_bytes(lines: list[str]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as g:  # mtime=0: reproducible
        g.write("".join(lines).encode("utf-8"))
    return buf.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def kjv_documents() -> list[list[str]]:
    """Chapters of the KJV as lists of verses, via the `bible` program of Debian's bible-kjv."""
    if shutil.which("bible") is None:
        return []
    out = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    docs: list[list[str]] = []
    for line in out.splitlines():
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            docs[-1].append(" ".join(m.group(1).split()))
        elif line.strip():  # "Genesis 1": a new chapter
            docs.append([])
    return [d for d in docs if d]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--copyright", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"))
    ap.add_argument("--out", type=Path, default=ROOT / "src/xlnet/assets")
    ap.add_argument("--no-kjv", action="store_true")
    ap.add_argument("--vocab-size", type=int, default=8000)
    args = ap.parse_args()
    out: Path = args.out

    records = parse_synsets(args.wordnet)
    # synsets sharing a gloss (WordNet has a few hundred) follow the first one's split, so no text crosses splits
    canonical: dict[str, str] = {}
    for r in records:
        canonical.setdefault(r["text"], r["id"])
    splits = {s: [r for r in records if split_of(canonical[r["text"]]) == s] for s in ("train", "dev", "test")}
    sizes: dict[str, int] = {}
    shipped = {s: subsample(recs, SHIP[s]) for s, recs in splits.items()}
    for s, recs in shipped.items():
        data = gz_bytes([json.dumps(r, ensure_ascii=False) + "\n" for r in recs])
        write_bytes(out / f"supersense/{s}.jsonl.gz", data)
        sizes[f"supersense/{s}.jsonl.gz"] = len(data)
    with atomic_write(out / "supersense/labels.txt", "w") as f:
        f.write("".join(l + "\n" for l in LEXNAMES))

    # corpus: train-split glosses only (dev/test glosses never appear), 50 synsets per document
    train = splits["train"]
    lines: list[str] = []
    for k in range(0, len(train), DOC_SYNSETS):
        lines.extend(r["text"] + "\n" for r in train[k:k + DOC_SYNSETS])
        lines.append("\n")
    kjv = [] if args.no_kjv else kjv_documents()
    for chapter in kjv:
        lines.extend(v + "\n" for v in chapter)
        lines.append("\n")
    corpus = gz_bytes(lines)
    write_bytes(out / "corpus/corpus.txt.gz", corpus)
    sizes["corpus/corpus.txt.gz"] = len(corpus)

    # tokenizer trained on the corpus just written
    train_tokenizer([out / "corpus/corpus.txt.gz"], out / "tokenizer", vocab_size=args.vocab_size,
                    lowercase=False, strip_accents=False, seed=0)
    sizes["tokenizer/spiece.model"] = (out / "tokenizer/spiece.model").stat().st_size

    # licenses
    copyright_text = args.copyright.read_text(encoding="utf-8")
    m = re.search(r"License: WordNet3\.0\n(.*?)\n\n", copyright_text, re.S)
    lic = "\n".join("" if l.strip() == "." else l[1:] for l in m.group(1).splitlines()) if m else copyright_text
    with atomic_write(out / "LICENSE.wordnet", "w") as f:
        f.write("WordNet 3.0 license (from Debian's wordnet-base copyright file)\n\n" + lic.strip() + "\n")
    if kjv:
        with atomic_write(out / "LICENSE.kjv", "w") as f:
            f.write("The King James Version (Authorized Version, 1611) text, as distributed in Debian's "
                    "bible-kjv-text package, is in the public domain.\n")

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    n = {s: len(r) for s, r in shipped.items()}
    readme = f"""Embedded data for xlnet (built by scripts/build_assets.py; do not edit by hand)

Sources
- WordNet 3.0 (Princeton University), Debian package wordnet-base: /usr/share/wordnet/data.{{noun,verb,adj,adv}}.
  License: WordNet 3.0 license, see LICENSE.wordnet (permissive; the notice must accompany all copies).
- King James Version of the Bible, Debian package bible-kjv-text: {"included" if kjv else "not included"}.
  {"Public domain, see LICENSE.kjv." if kjv else ""}

supersense/  WordNet supersense classification: text = synset gloss (definitions and quoted examples,
             whitespace collapsed), label = lexicographer file (45 names, labels.txt), lemma = first lemma,
             pos in n/v/a/r, id = pos + byte offset. Split by a sha256 hash of the id (synsets with the
             same gloss follow the first one): 80/10/10
             ({len(splits['train'])}/{len(splits['dev'])}/{len(splits['test'])} synsets); shipped: a
             deterministic hash-chosen subsample of train {n['train']}, dev {n['dev']}, test {n['test']}.
             JSON lines, gzip.
corpus/corpus.txt.gz  Pretraining text. Holds ONLY glosses of TRAIN-split synsets (all {len(train)}, one per line,
             {DOC_SYNSETS} consecutive synsets per document, blank line between documents); no dev/test gloss
             is in it, so fine-tuning evaluation has no leakage (in-domain text, labels never included).
             {f"Then the KJV: one verse per line, one chapter ({len(kjv)}) per document." if kjv else ""}
tokenizer/   SentencePiece unigram, vocab {args.vocab_size}, cased, accents kept, trained on corpus.txt.gz with
             xlnet.tokenizer.train_tokenizer; ids 0..8 = <unk> <s> </s> <cls> <sep> <pad> <mask> <eod> <eop>.

Sizes (bytes): {json.dumps(sizes)}; everything under assets/: about {total // 1024} KiB.
"""
    with atomic_write(out / "README", "w") as f:
        f.write(readme)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    print(json.dumps({"sizes": sizes, "total": total, "synsets": n, "kjv_chapters": len(kjv)}, indent=1))
    if total > SIZE_CAP:
        print(f"assets total {total} exceeds the {SIZE_CAP} byte cap", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
