"""SentencePiece tokenizer with XLNet's special ids, text cleanup and input layout.

XLNet's conventions (the original prepro_utils / data_utils, and HF's XLNetTokenizer):
- ids 0..8 are `<unk> <s> </s> <cls> <sep> <pad> <mask> <eod> <eop>`;
- text cleanup before SentencePiece: collapse whitespace, `` and '' -> ", optional NFKD accent stripping
  and lowercasing;
- a piece like "▁1999," (digit then comma) is re-split into "▁1999" + ",";
- inputs are laid out `A <sep> B <sep> <cls>` with segment ids 0/1/2, padded on the LEFT.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from xlnet.errors import XLNetError
from xlnet.fileio import atomic_write

UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID, EOD_ID, EOP_ID = range(9)
SPECIAL_PIECES: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>", "<eop>")
SPIECE_UNDERLINE = "▁"
SEG_A, SEG_B, SEG_CLS, SEG_PAD = 0, 1, 2, 3  # HF uses 3 as the pad token type id

MODEL_FILE = "spiece.model"
SETTINGS_FILE = "tokenizer.json"
_SETTINGS_FORMAT = "xlnet-tokenizer/1"
# tokenizer.json fields: exact JSON type (a bool is not an int here) and how the error message names it
_SETTINGS_TYPES: dict[str, tuple[type, str]] = {
    "lowercase": (bool, "true or false"), "strip_accents": (bool, "true or false"),
    "remove_space": (bool, "true or false"), "vocab_size": (int, "an integer")}
# Pieces the original data_utils treats as word starts besides "▁..." (punctuation and "<...>" symbols).
_PUNCT_PIECES = frozenset('!"#$%&"()*+,-./:;?@[\\]^_`{|}~')


# ----------------------------------------------------------------------------------------------- cleanup
def preprocess_text(text: str, lowercase: bool = False, strip_accents: bool = False,
                    remove_space: bool = True) -> str:
    """XLNet's cleanup, applied to whole strings (as the original does) before SentencePiece."""
    out = " ".join(text.strip().split()) if remove_space else text
    out = out.replace("``", '"').replace("''", '"')
    if strip_accents:
        out = "".join(c for c in unicodedata.normalize("NFKD", out) if not unicodedata.combining(c))
    if lowercase:
        out = out.lower()
    return out


def _preprocess_mapped(text: str, lowercase: bool, strip_accents: bool,
                       remove_space: bool) -> tuple[str, list[tuple[int, int]]]:
    """The same cleanup char by char, remembering each output char's span in `text` (for offsets)."""
    chars: list[tuple[str, int, int]] = []
    if remove_space:
        i, n = 0, len(text)
        while i < n:
            if text[i].isspace():
                j = i
                while j < n and text[j].isspace():
                    j += 1
                if chars and j < n:  # interior run -> one space; leading/trailing runs vanish
                    chars.append((" ", i, j))
                i = j
            else:
                chars.append((text[i], i, i + 1))
                i += 1
    else:
        chars = [(c, i, i + 1) for i, c in enumerate(text)]
    merged: list[tuple[str, int, int]] = []
    k = 0
    while k < len(chars):
        pair = chars[k][0] + chars[k + 1][0] if k + 1 < len(chars) else ""
        if pair in ("``", "''"):
            merged.append(('"', chars[k][1], chars[k + 1][2]))
            k += 2
        else:
            merged.append(chars[k])
            k += 1
    out: list[tuple[str, int, int]] = []
    for c, s, e in merged:
        if strip_accents:
            c = "".join(x for x in unicodedata.normalize("NFKD", c) if not unicodedata.combining(x))
        if lowercase:
            c = c.lower()
        out.extend((x, s, e) for x in c)
    return "".join(c for c, _, _ in out), [(s, e) for _, s, e in out]


# ----------------------------------------------------------------------------------------------- reading
def iter_training_lines(path: Path) -> Iterator[str]:
    """Lines of a .txt / .jsonl / .gz file, decoded strictly; bad files raise XLNetError naming them."""
    from xlnet.data.prepare import iter_documents  # shared reader; lazy to keep imports light

    for doc in iter_documents(path):
        yield from doc


def _reservoir(lines: Iterable[str], k: int, seed: int) -> list[str]:
    """Uniform sample of k lines in one pass, so huge corpora never sit in memory whole."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, line in enumerate(lines):
        if len(sample) < k:
            sample.append(line)
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = line
    return sample


# ----------------------------------------------------------------------------------------------- training
def train_tokenizer(inputs: Sequence[Path], out_dir: Path, vocab_size: int = 32000, lowercase: bool = False,
                    strip_accents: bool = False, sample_sentences: int = 1_000_000, seed: int = 0,
                    character_coverage: float = 0.9995, num_threads: int = 4) -> Path:
    """Train a unigram SentencePiece model whose ids 0..8 are XLNet's special pieces; returns out_dir.

    `inputs` are files or directories (their input files, recursively, as `xlnet prepare` reads them)."""
    from xlnet.data.prepare import expand_inputs

    out_dir = Path(out_dir)
    if not inputs:
        raise XLNetError("tokenizer: no --input files given")
    if sample_sentences < 1:
        raise XLNetError(f"--sample-sentences must be positive (lines to train on), got {sample_sentences}")
    cleaned: list[str] = []
    for path in expand_inputs(inputs):
        lines = (preprocess_text(l, lowercase, strip_accents) for l in iter_training_lines(path))
        kept = [l for l in _reservoir((l for l in lines if l), sample_sentences, seed)]
        if not kept:
            raise XLNetError(f"{path}: no text to train on")
        cleaned.extend(kept)
    if len(cleaned) > sample_sentences:  # several files: sample again across them
        cleaned = _reservoir(iter(cleaned), sample_sentences, seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(cleaned), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            # control symbols take the next free ids in order: <cls>3 <sep>4 <pad>5 <mask>6 <eod>7, then the
            # user-defined <eop>8 (as in the original XLNet recipe, <eop> may be written in the text).
            control_symbols=list(SPECIAL_PIECES[3:8]), user_defined_symbols=[SPECIAL_PIECES[8]],
            character_coverage=character_coverage, hard_vocab_limit=False, shuffle_input_sentence=False,
            input_sentence_size=0, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise XLNetError(f"{out_dir}: SentencePiece training failed: {str(e).splitlines()[0]}") from None
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    _check_special_ids(proc, out_dir / MODEL_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / MODEL_FILE, "wb") as f:
        f.write(model.getvalue())
    write_settings(out_dir, lowercase, strip_accents, True, proc.get_piece_size())
    return out_dir


def write_settings(directory: Path, lowercase: bool, strip_accents: bool, remove_space: bool,
                   vocab_size: int) -> Path:
    """Our tokenizer.json: the cleanup flags the pieces were trained with, read back by `Tokenizer.load`."""
    settings = {"format": _SETTINGS_FORMAT, "lowercase": lowercase, "strip_accents": strip_accents,
                "remove_space": remove_space, "vocab_size": vocab_size}
    with atomic_write(Path(directory) / SETTINGS_FILE, "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")
    return Path(directory) / SETTINGS_FILE


def _check_special_ids(proc: spm.SentencePieceProcessor, path: Path) -> None:
    n = proc.get_piece_size()
    got = [proc.id_to_piece(i) if i < n else None for i in range(len(SPECIAL_PIECES))]
    if got != list(SPECIAL_PIECES):
        bad = next(i for i, (g, w) in enumerate(zip(got, SPECIAL_PIECES)) if g != w)
        raise XLNetError(f"{path}: id {bad} is {got[bad]!r}, XLNet needs {SPECIAL_PIECES[bad]!r} "
                         f"(ids 0..8 must be {' '.join(SPECIAL_PIECES)})")


# ----------------------------------------------------------------------------------------------- tokenizer
@dataclass
class Tokenizer:
    """A loaded SentencePiece model plus XLNet's cleanup flags."""

    sp: spm.SentencePieceProcessor
    model_path: Path
    lowercase: bool = False
    strip_accents: bool = True
    remove_space: bool = True

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Our tokenizer dir, an HF-style dir with spiece.model (+ tokenizer_config.json), or a .model file."""
        path = Path(path)
        if path.is_dir():
            model_path = path / MODEL_FILE
            flags = _read_dir_flags(path)
        else:
            model_path, flags = path, {}
        if not model_path.is_file():
            raise XLNetError(f"{model_path}: tokenizer model not found")
        try:
            proc = spm.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as e:
            raise XLNetError(f"{model_path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        _check_special_ids(proc, model_path)
        return cls(proc, model_path, **flags)

    # ---- vocabulary
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_word_start(self, i: int) -> bool:
        """As the original data_utils._is_start_piece: "▁..." pieces, "<...>" symbols, lone punctuation."""
        piece = self.id_to_piece(i)
        return piece.startswith(SPIECE_UNDERLINE) or piece.startswith("<") or piece in _PUNCT_PIECES

    def word_start_table(self) -> np.ndarray:
        return np.array([self.is_word_start(i) for i in range(self.vocab_size)], dtype=bool)

    # ---- encoding
    def preprocess(self, text: str) -> str:
        return preprocess_text(text, self.lowercase, self.strip_accents, self.remove_space)

    def encode(self, text: str) -> list[int]:
        """Ids without special tokens, as the original encode_ids (preprocess + "9," re-split)."""
        return [i for i, _ in self._encode_spans(self.preprocess(text))]

    def encode_pieces(self, text: str) -> list[str]:
        return [self.id_to_piece(i) for i in self.encode(text)]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids plus each token's (start, end) char span in the ORIGINAL text (best effort through cleanup)."""
        norm, spans = _preprocess_mapped(text, self.lowercase, self.strip_accents, self.remove_space)
        full = self.preprocess(text)
        if len(full) == len(norm):  # context rules (final sigma) may differ char-wise; lengths still align
            norm = full
        ids, offsets = [], []
        for i, (cb, ce) in self._encode_spans(norm):
            ids.append(i)
            while cb < ce and norm[cb] == " ":  # a "▁" piece's surface starts at the space: skip it
                cb += 1
            if ce > cb:
                offsets.append((spans[cb][0], spans[ce - 1][1]))
            else:
                at = spans[cb][0] if cb < len(spans) else len(text)
                offsets.append((at, at))
        return ids, offsets

    def _encode_spans(self, norm: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, char span in `norm`) per token, with the digit-comma re-split."""
        if not norm:
            return []
        byte_to_char = _byte_to_char(norm)
        out: list[tuple[int, tuple[int, int]]] = []
        for p in self.sp.encode(norm, out_type="proto").pieces:
            cb, ce = byte_to_char[p.begin], byte_to_char[p.end]
            piece = p.piece
            if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
                out.extend(self._split_digit_comma(piece, cb, ce))
            else:
                out.append((p.id, (cb, ce)))
        return out

    def _split_digit_comma(self, piece: str, cb: int, ce: int) -> list[tuple[int, tuple[int, int]]]:
        """"▁1999," -> "▁1999" + ","; spans are the surface's, the comma taking its last char."""
        head = piece[:-1].replace(SPIECE_UNDERLINE, "")
        sub = list(self.sp.encode(head, out_type="proto").pieces)
        # the sub-encoding adds a dummy "▁"; keep it only if the original piece had one
        if not piece.startswith(SPIECE_UNDERLINE) and sub and sub[0].piece.startswith(SPIECE_UNDERLINE):
            if len(sub[0].piece) == 1:
                sub = sub[1:]
                subs = [(s.id, s.begin, s.end) for s in sub]
            else:
                subs = [(self.piece_to_id(sub[0].piece[1:]), sub[0].begin, sub[0].end)]
                subs += [(s.id, s.begin, s.end) for s in sub[1:]]
        else:
            subs = [(s.id, s.begin, s.end) for s in sub]
        comma_at = max(cb, ce - 1)
        base = max(cb, comma_at - len(head))  # the surface may start with the space that became "▁"
        b2c = _byte_to_char(head)
        out = [(i, (min(base + b2c[b], comma_at), min(base + b2c[e], comma_at))) for i, b, e in subs]
        out.append((self.piece_to_id(","), (comma_at, ce)))
        return out

    # ---- decoding
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if BOS_ID <= i <= EOP_ID:
                if run:
                    parts.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    parts.append(SPECIAL_PIECES[i])
            else:
                run.append(i)
        if run:
            parts.append(self.sp.decode(run))
        return " ".join(p for p in parts if p)

    # ---- model inputs
    def build_inputs(self, a_ids: Sequence[int], b_ids: Sequence[int] | None = None,
                     max_len: int | None = None, pad: bool = True) -> dict[str, list[int]]:
        return build_inputs(a_ids, b_ids, max_len, pad)

    def batch_inputs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int] | None]],
                     max_len: int | None = None) -> dict:
        return batch_inputs(pairs, max_len)


def _byte_to_char(s: str) -> list[int]:
    """Index: utf-8 byte offset -> char offset (one past the end included)."""
    table: list[int] = []
    for k, c in enumerate(s):
        table.extend([k] * len(c.encode("utf-8")))
    table.append(len(s))
    return table


def _check_settings_types(path: Path, data: dict) -> None:
    """A hand-edited "lowercase": "yes" would otherwise read as True (and "false" too): reject wrong types."""
    for field, (want, described) in _SETTINGS_TYPES.items():
        if field in data and type(data[field]) is not want:
            raise XLNetError(f'{path}: field "{field}" must be {described}, got {json.dumps(data[field])}')


def _read_dir_flags(path: Path) -> dict[str, bool]:
    """Flags from our tokenizer.json, else from an HF tokenizer_config.json, else XLNet's defaults."""
    ours = path / SETTINGS_FILE
    if ours.is_file():
        try:
            data = json.loads(ours.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise XLNetError(f"{ours}: not valid JSON ({e})") from None
        if isinstance(data, dict) and data.get("format") == _SETTINGS_FORMAT:
            _check_settings_types(ours, data)
            return {"lowercase": data.get("lowercase", False), "strip_accents": data.get("strip_accents", False),
                    "remove_space": data.get("remove_space", True)}
        # otherwise it is HF's fast-tokenizer tokenizer.json: ignore it, spiece.model is authoritative
    hf = path / "tokenizer_config.json"
    if hf.is_file():
        try:
            cfg = json.loads(hf.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise XLNetError(f"{hf}: not valid JSON ({e})") from None
        return {"lowercase": bool(cfg.get("do_lower_case", False)),
                "strip_accents": not bool(cfg.get("keep_accents", False)),
                "remove_space": bool(cfg.get("remove_space", True))}
    return {"lowercase": False, "strip_accents": True, "remove_space": True}


# ----------------------------------------------------------------------------------------------- layout
def truncate_longest_first(a: list[int], b: list[int] | None, budget: int) -> None:
    """Drop tokens from the end of the longer segment, in place, until both fit; on a tie B loses one (the
    original `_truncate_seq_pair`: tests/data/original_inputs.json)."""
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) >= len(a):
            b.pop()
        else:
            a.pop()


def build_inputs(a_ids: Sequence[int], b_ids: Sequence[int] | None = None, max_len: int | None = None,
                 pad: bool = True) -> dict[str, list[int]]:
    """`A <sep> B <sep> <cls>` (or `A <sep> <cls>`), segment ids 0/1/2, left-padded to max_len."""
    a = list(map(int, a_ids))
    b = list(map(int, b_ids)) if b_ids is not None else None
    n_special = 3 if b is not None else 2
    if max_len is not None:
        if max_len < n_special:
            raise ValueError(f"max_len {max_len} leaves no room for {n_special} special tokens")
        truncate_longest_first(a, b, max_len - n_special)
    ids = a + [SEP_ID]
    types = [SEG_A] * len(ids)
    if b is not None:
        ids += b + [SEP_ID]
        types += [SEG_B] * (len(b) + 1)
    ids.append(CLS_ID)
    types.append(SEG_CLS)
    mask = [1] * len(ids)
    if pad and max_len is not None and len(ids) < max_len:
        k = max_len - len(ids)
        ids, types, mask = [PAD_ID] * k + ids, [SEG_PAD] * k + types, [0] * k + mask
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def batch_inputs(pairs: Sequence[tuple[Sequence[int], Sequence[int] | None]], max_len: int | None = None) -> dict:
    """Build each (a, b) pair, left-pad all to the longest; returns torch.LongTensor [batch, len] values."""
    import torch  # only batching needs torch

    rows = [build_inputs(a, b, max_len, pad=False) for a, b in pairs]
    longest = max((len(r["input_ids"]) for r in rows), default=0)
    out = {}
    for key, fill in (("input_ids", PAD_ID), ("token_type_ids", SEG_PAD), ("attention_mask", 0)):
        out[key] = torch.tensor([[fill] * (longest - len(r[key])) + r[key] for r in rows], dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a unigram SentencePiece model with XLNet's special ids")
    t.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH",
                   help="text files (.txt, .jsonl with a 'text' field, or .gz of either) or directories of them "
                        "(recursively, in sorted order, hidden files skipped)")
    t.add_argument("--out", required=True, type=Path, help="output directory (spiece.model, tokenizer.json)")
    t.add_argument("--vocab-size", type=int, default=32000,
                   help="pieces to learn (fewer, with a warning, when the text is too small for that many)")
    t.add_argument("--lowercase", action="store_true", help="lowercase text (uncased model)")
    t.add_argument("--strip-accents", action="store_true", help="NFKD-decompose and drop combining accents")
    t.add_argument("--sample-sentences", type=int, default=1_000_000,
                   help="train on a uniform sample of this many lines")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("encode", help="print the pieces and ids of a text")
    e.add_argument("--tokenizer", required=True, type=Path)
    e.add_argument("text")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        if args.vocab_size < 16:
            raise XLNetError(f"--vocab-size {args.vocab_size} is too small (need at least 16)")
        out = train_tokenizer(args.input, args.out, args.vocab_size, args.lowercase, args.strip_accents,
                              args.sample_sentences, args.seed)
        tok = Tokenizer.load(out)
        print(f"wrote {out / MODEL_FILE} (vocab {tok.vocab_size}) and {out / SETTINGS_FILE}")
        _warn_if_vocab_short(args.vocab_size, tok.vocab_size)
        return 0
    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)
    print(" ".join(tok.id_to_piece(i) for i in ids))
    print(" ".join(map(str, ids)))
    return 0


def _warn_if_vocab_short(asked: int, got: int) -> None:
    """Training never fails for lack of text (hard_vocab_limit=False), so say it when the vocab came out short."""
    if got < asked:
        print(f"xlnet tokenizer: warning: the vocabulary has {got} pieces, not the {asked} asked by --vocab-size: "
              f"too little text to learn more; train on more text or ask for fewer", file=sys.stderr)


def default_tokenizer_dir() -> Path:
    """The tokenizer shipped with the package (vocab 8000, cased, trained on the embedded corpus)."""
    from xlnet.assets import default_tokenizer_dir as _d

    return _d()
