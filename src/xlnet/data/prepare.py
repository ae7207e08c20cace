"""`xlnet prepare`: raw text -> memmappable token shards + sentence ids + manifest.

Layout of the output directory (built under a temp name, renamed into place whole):
    manifest.json
    {split}-{k:05d}.tokens.npy     uint16 (vocab <= 65535) or int32, 1-D
    {split}-{k:05d}.sent_ids.npy   bool, 1-D, flips at each new input line (original XLNet data_utils convention;
                                   <eod> keeps the id of its document's last line)
Documents: a blank line ends one in .txt; a record is one in .jsonl ("text" field). Each gets <eod> at its end.
A directory input stands for its .txt / .jsonl / .gz files, recursively, in sorted path order (hidden ones skipped).
The validation split holds whole documents chosen by a seeded hash of their text (deterministic, and duplicates
land in the same split).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from xlnet.errors import XLNetError
from xlnet.fileio import DirKind, atomic_dir, check_replaceable, decoded_lines, open_binary, sha256_file

MANIFEST = "manifest.json"
PREPARED_DIR = DirKind(MANIFEST, "a prepared data directory")  # what --out may replace
FORMAT = "xlnet-corpus/1"
SPLITS = ("train", "valid")
_CHUNK_CHARS = 1 << 18  # text per worker task: big enough to amortise IPC, small enough to keep memory flat
_INPUT_TYPES = ".txt, .jsonl or .gz of either"


# ----------------------------------------------------------------------------------------------- reading
def _input_kind(path: Path) -> str | None:
    """".txt" or ".jsonl" (also under .gz) by the file name; None for any other name."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((ext for ext in (".txt", ".jsonl") if name.endswith(ext)), None)


def _kind(path: Path) -> str:
    kind = _input_kind(path)
    if kind is None and not path.exists():  # a mistyped directory, most likely
        raise XLNetError(f"{path}: no such file or directory")
    if kind is None:
        raise XLNetError(f"{path}: unknown input type (expected {_INPUT_TYPES}, or a directory of them)")
    return kind


def _directory_inputs(root: Path) -> list[Path]:
    """Input files under `root`, recursively; sorted so that the same tree always gives the same shards."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, editors' and our own temp dirs
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and _input_kind(Path(f))]
    if not found:
        raise XLNetError(f"{root}: directory holds no input file ({_INPUT_TYPES}; hidden files are skipped)")
    return sorted(found)


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Input files, each directory replaced by its files; checked up front so no work starts on a bad path."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += _directory_inputs(path)
            continue
        _kind(path)
        if not path.is_file():
            raise XLNetError(f"{path}: no such file")
        files.append(path)
    return files


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise XLNetError(f"{path}:{lineno}: invalid JSON ({e})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise XLNetError(f"{path}:{lineno}: JSONL record needs a string field \"text\"")
    return rec["text"]


def _documents(path: Path, src: IO[bytes]) -> Iterator[list[str]]:
    """Documents as lists of non-blank lines (without newlines)."""
    kind = _kind(path)
    doc: list[str] = []
    for lineno, line in decoded_lines(path, src):
        if kind == ".jsonl":
            if not line.strip():
                continue
            lines = [l for l in _jsonl_text(path, lineno, line).splitlines() if l.strip()]
            if lines:
                yield lines
        elif line.strip():
            doc.append(line.rstrip("\r\n"))
        elif doc:
            yield doc
            doc = []
    if doc:
        yield doc


def iter_documents(path: str | Path) -> Iterator[list[str]]:
    """Stream the documents of one input file; empty or unreadable files raise XLNetError naming it."""
    path = Path(path)
    _kind(path)
    src, raw = open_binary(path)
    with raw, src:
        n = 0
        for doc in _documents(path, src):
            n += 1
            yield doc
    if n == 0:
        raise XLNetError(f"{path}: empty (no text)")


# ----------------------------------------------------------------------------------------------- workers
_WORKER_TOK = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOK
    from xlnet.tokenizer import Tokenizer

    _WORKER_TOK = Tokenizer.load(tokenizer_dir)


def _encode_chunk(docs: list[list[str]]) -> list[list[list[int]]]:
    """Per document, per line: token ids (lines that encode to nothing are kept as empty lists)."""
    assert _WORKER_TOK is not None
    return [[_WORKER_TOK.encode(line) for line in doc] for doc in docs]


# ----------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """Accumulates one split's tokens and cuts .npy shards of `shard_tokens` tokens."""

    def __init__(self, name: str, out: Path, dtype: np.dtype, shard_tokens: int):
        self.name, self.out, self.dtype, self.shard_tokens = name, out, dtype, shard_tokens
        self.sent_id = True  # original data_utils starts at True and flips per line
        self.tok_buf: list[np.ndarray] = []
        self.sid_buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0

    def add_document(self, lines: list[list[int]], eod_id: int) -> None:
        toks: list[int] = []
        sids: list[bool] = []
        for ids in lines:
            if not ids:
                continue
            toks.extend(ids)
            sids.extend([self.sent_id] * len(ids))
            self.sent_id = not self.sent_id
        if not toks:
            return
        toks.append(eod_id)
        sids.append(sids[-1])  # <eod> belongs to the document's last sentence, as in the original
        self.tok_buf.append(np.asarray(toks, dtype=self.dtype))
        self.sid_buf.append(np.asarray(sids, dtype=bool))
        self.buffered += len(toks)
        self.num_tokens += len(toks)
        self.num_documents += 1
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def finish(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        toks = np.concatenate(self.tok_buf)
        sids = np.concatenate(self.sid_buf)
        k = len(self.shards)
        tok_name, sid_name = f"{self.name}-{k:05d}.tokens.npy", f"{self.name}-{k:05d}.sent_ids.npy"
        np.save(self.out / tok_name, toks[:n])
        np.save(self.out / sid_name, sids[:n])
        self.shards.append({"tokens": tok_name, "sent_ids": sid_name, "num_tokens": int(n)})
        self.tok_buf, self.sid_buf = ([toks[n:]], [sids[n:]]) if n < len(toks) else ([], [])
        self.buffered = len(toks) - n


def _valid_score(doc: list[str], seed: int) -> float:
    """The document's seeded hash in [0, 1): it goes to the valid split when this is below the valid fraction."""
    h = hashlib.blake2b(f"{seed}\n".encode() + "\n".join(doc).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def _chunks(paths: Sequence[Path], progress) -> Iterator[list[list[str]]]:
    """Documents of all inputs in order, grouped into chunks of about _CHUNK_CHARS characters."""
    chunk: list[list[str]] = []
    size = 0
    for path in paths:
        _kind(path)
        src, raw = open_binary(path)
        done_before = progress.n
        n_docs = 0
        with raw, src:
            for doc in _documents(path, src):
                n_docs += 1
                chunk.append(doc)
                size += sum(len(l) for l in doc)
                if size >= _CHUNK_CHARS:
                    progress.update(done_before + raw.tell() - progress.n)
                    yield chunk
                    chunk, size = [], 0
            progress.update(done_before + raw.tell() - progress.n)
        if n_docs == 0:
            raise XLNetError(f"{path}: empty (no text)")
    if chunk:
        yield chunk


def _encoded(chunks: Iterator[list[list[str]]], tokenizer_dir: Path, workers: int
             ) -> Iterator[tuple[list[list[str]], list[list[list[int]]]]]:
    """(docs, encoded docs) in input order; at most 2 tasks per worker in flight, so memory stays flat."""
    if workers <= 1:
        _init_worker(str(tokenizer_dir))
        for chunk in chunks:
            yield chunk, _encode_chunk(chunk)
        return
    ctx = mp.get_context("spawn")  # no fork of a possibly threaded parent
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 2 * workers:
                c, r = pending.popleft()
                yield c, r.get()
        while pending:
            c, r = pending.popleft()
            yield c, r.get()


@dataclass
class _Tally:
    """What the split check needs to know about the documents read."""

    documents: int = 0
    lowest_score: float = 1.0  # the smallest _valid_score seen: tells which fraction would hold one out


def _write_splits(inputs: Sequence[Path], tokenizer_dir: Path, workers: int, writers: dict[str, _SplitWriter],
                  valid_fraction: float, seed: int, bar) -> _Tally:
    from xlnet.tokenizer import EOD_ID

    tally = _Tally()
    for docs, encoded in _encoded(_chunks(inputs, bar), tokenizer_dir, workers):
        for doc, enc in zip(docs, encoded):
            score = _valid_score(doc, seed)
            tally.documents += 1
            tally.lowest_score = min(tally.lowest_score, score)
            writers["valid" if score < valid_fraction else "train"].add_document(enc, EOD_ID)
    return tally


def _check_splits(writers: dict[str, _SplitWriter], tally: _Tally, inputs: Sequence[Path], valid_fraction: float,
                  seed: int) -> None:
    """Fail (before the output is swapped in) on a split that pretraining would find empty."""
    if writers["train"].num_tokens == 0:
        raise XLNetError(f"{inputs[0]}: no tokens for the train split")
    if valid_fraction > 0 and writers["valid"].num_tokens == 0:
        # the smallest hundredth above the lowest hash holds out at least that document with this seed
        hint = (math.floor(tally.lowest_score * 100) + 1) / 100
        advice = f"use --valid-fraction {hint:g} or more" if hint < 1 else "add documents"
        raise XLNetError(f"valid split is empty: --valid-fraction {valid_fraction:g} held out none of the "
                         f"{tally.documents} documents (seed {seed}); {advice}, or 0 for no valid split")


def prepare(tokenizer_dir: Path, inputs: Sequence[Path], out_dir: Path, valid_fraction: float = 0.01,
            workers: int = 1, shard_tokens: int = 1 << 24, seed: int = 0, progress: bool = True) -> Path:
    """Tokenize `inputs` (files or directories) into shards under `out_dir` (atomically); returns out_dir."""
    from tqdm import tqdm

    from xlnet.tokenizer import EOD_ID, MODEL_FILE, Tokenizer

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    if not inputs:
        raise XLNetError("prepare: no --input files given")
    if not 0 <= valid_fraction < 1:
        raise XLNetError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    if shard_tokens < 1:
        raise XLNetError(f"--shard-tokens must be positive, got {shard_tokens}")
    if workers < 0:
        raise XLNetError(f"--workers must be 0 or more (0 and 1 tokenize in this process), got {workers}")
    inputs = expand_inputs(inputs)
    check_replaceable(out_dir, PREPARED_DIR)
    tok = Tokenizer.load(tokenizer_dir)
    model_path = tok.model_path
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.int32)
    total = sum(p.stat().st_size for p in inputs)
    with atomic_dir(out_dir, replaces=PREPARED_DIR) as tmp:
        writers = {s: _SplitWriter(s, tmp, dtype, shard_tokens) for s in SPLITS}
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress or None) as bar:
            tally = _write_splits(inputs, tokenizer_dir, workers, writers, valid_fraction, seed, bar)
        _check_splits(writers, tally, inputs, valid_fraction, seed)
        for w in writers.values():
            w.finish()
        manifest = {
            "format": FORMAT,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "eod_id": EOD_ID,
            "sent_ids": "bool, flips at each new input line; <eod> shares its document's last line id",
            "tokenizer": {"path": str(tokenizer_dir), "sha256": sha256_file(model_path), "file": MODEL_FILE,
                          "lowercase": tok.lowercase, "strip_accents": tok.strip_accents},
            "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in inputs],
            "valid_fraction": valid_fraction,
            "seed": seed,
            "splits": {s: {"num_tokens": w.num_tokens, "num_documents": w.num_documents, "shards": w.shards}
                       for s, w in writers.items()},
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return out_dir


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class Corpus:
    """One split of a prepared corpus: tokens and sentence ids, aligned, 1-D."""

    tokens: np.ndarray
    sent_ids: np.ndarray
    vocab_size: int
    path: Path
    split: str = "train"
    num_documents: int = 0

    def __len__(self) -> int:
        return len(self.tokens)


def _read_manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST
    if not path.is_file():
        raise XLNetError(f"{path}: missing (not a directory written by `xlnet prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise XLNetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise XLNetError(f"{path}: unknown format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                         f" (expected {FORMAT!r})")
    return manifest


def _load_checked(path: Path, want_sha: str | None, verify: bool) -> np.ndarray:
    if not path.is_file():
        raise XLNetError(f"{path}: missing (listed in {MANIFEST})")
    if verify:
        if want_sha is None:
            raise XLNetError(f"{path}: no checksum in {MANIFEST}")
        if sha256_file(path) != want_sha:
            raise XLNetError(f"{path}: sha256 does not match {MANIFEST} (file changed or corrupt)")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise XLNetError(f"{path}: not a readable .npy array ({e})") from None


def load_corpus(data_dir: str | Path, split: str = "train", expected_vocab_size: int | None = None,
                verify: bool = True) -> Corpus:
    """Memmap one split's shards (concatenated when there are several), checking the manifest's checksums."""
    data_dir = Path(data_dir)
    manifest = _read_manifest(data_dir)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise XLNetError(f"{data_dir / MANIFEST}: no split {split!r} (has {', '.join(splits)})")
    vocab = int(manifest["vocab_size"])
    if expected_vocab_size is not None and vocab != expected_vocab_size:
        raise XLNetError(f"{data_dir / MANIFEST}: corpus was tokenized with vocab {vocab}, "
                         f"the model expects {expected_vocab_size}")
    info = splits[split]
    if not info["shards"]:
        hint = " (prepared with --valid-fraction 0; pretrain with --eval-every 0)" if split == "valid" else ""
        raise XLNetError(f"{data_dir / MANIFEST}: split {split!r} is empty{hint}")
    files = manifest.get("files", {})
    toks, sids = [], []
    for shard in info["shards"]:
        t = _load_checked(data_dir / shard["tokens"], files.get(shard["tokens"]), verify)
        s = _load_checked(data_dir / shard["sent_ids"], files.get(shard["sent_ids"]), verify)
        if t.ndim != 1 or s.shape != t.shape or len(t) != shard["num_tokens"]:
            raise XLNetError(f"{data_dir / shard['tokens']}: shape {t.shape} / sent_ids {s.shape} disagree "
                             f"with {MANIFEST} ({shard['num_tokens']} tokens)")
        toks.append(t)
        sids.append(s)
    tokens = toks[0] if len(toks) == 1 else np.concatenate(toks)
    sent_ids = sids[0] if len(sids) == 1 else np.concatenate(sids)
    return Corpus(tokens, sent_ids.astype(bool, copy=False), vocab, data_dir, split, int(info["num_documents"]))


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="tokenizer directory (ours or HF-style with spiece.model) or a .model file")
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                        help=".txt (blank line between documents), .jsonl ('text' field), .gz of either, or a "
                             "directory: its such files, recursively, in sorted order (hidden ones skipped)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically if it holds prepared data)")
    parser.add_argument("--valid-fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation (0: no valid split; pretrain it with --eval-every 0)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (0 or 1: this process)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    out = prepare(args.tokenizer, args.input, args.out, args.valid_fraction, args.workers,
                  args.shard_tokens, args.seed, progress=not args.no_progress)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    for s, info in manifest["splits"].items():
        print(f"{s}: {info['num_tokens']} tokens, {info['num_documents']} documents, {len(info['shards'])} shards")
    print(f"wrote {out / MANIFEST}")
    return 0
