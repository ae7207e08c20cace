"""Paths of the data shipped inside the package (built by scripts/build_assets.py; see README here)."""

from __future__ import annotations

from pathlib import Path

from xlnet.errors import XLNetError

ASSETS_DIR = Path(__file__).resolve().parent
SUPERSENSE_SPLITS = ("train", "dev", "test")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise XLNetError(f"{path}: embedded asset missing (reinstall xlnet or run scripts/build_assets.py)")
    return path


def default_tokenizer_dir() -> Path:
    """SentencePiece tokenizer (vocab 8000, cased) trained on the embedded corpus."""
    return _existing(ASSETS_DIR / "tokenizer")


def default_corpus_path() -> Path:
    """Pretraining text: train-split WordNet glosses (+ KJV), .txt.gz with blank lines between documents."""
    return _existing(ASSETS_DIR / "corpus" / "corpus.txt.gz")


def supersense_path(split: str) -> Path:
    """WordNet supersense classification split ('train', 'dev' or 'test') as .jsonl.gz."""
    if split not in SUPERSENSE_SPLITS:
        raise XLNetError(f"supersense split must be one of {', '.join(SUPERSENSE_SPLITS)}, got {split!r}")
    return _existing(ASSETS_DIR / "supersense" / f"{split}.jsonl.gz")


def supersense_labels() -> list[str]:
    """The 45 WordNet lexicographer file names, in lex_filenum order."""
    path = _existing(ASSETS_DIR / "supersense" / "labels.txt")
    return [l for l in path.read_text(encoding="utf-8").splitlines() if l]
