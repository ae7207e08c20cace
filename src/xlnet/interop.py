"""`xlnet convert`: move checkpoints between our directories and Hugging Face XLNet directories.

Tensor names are shared, so conversion validates the weights against the config by loading them into the
head class the config names, then writes them back out in the source's dtype: HF -> ours -> HF is bit-identical.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from xlnet.checkpoint import MODEL_DIR, load_model, read_weights
from xlnet.errors import XLNetError
from xlnet.fileio import check_replaceable

TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: str | Path, dst: str | Path, to_hf: bool) -> Path:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise XLNetError(f"{dst}: destination must differ from the source")
    check_replaceable(dst, MODEL_DIR)  # before the load: never convert only to refuse the destination
    model = load_model(src, strict=True)
    model.to(source_dtype(src))
    model.save_pretrained(dst, hf=to_hf)  # type: ignore[operator]
    for name in TOKENIZER_FILES:  # keep the tokenizer beside the weights when there is one
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def source_dtype(src: Path) -> torch.dtype:
    """The floating dtype most of the source's tensors use (so conversion neither widens nor narrows)."""
    weights, _ = read_weights(src)
    counts: dict[torch.dtype, int] = {}
    for t in weights.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", action="store_true", help="SRC is a Hugging Face XLNet directory")
    direction.add_argument("--to-hf", action="store_true", help="write DST as a Hugging Face XLNet directory")
    parser.add_argument("src", help="source model directory")
    parser.add_argument("dst", help="destination directory (replaced atomically if it holds a model)")


def run(args: argparse.Namespace) -> int:
    dst = convert(args.src, args.dst, to_hf=args.to_hf)
    print(f"wrote {'Hugging Face' if args.to_hf else 'xlnet'} checkpoint to {dst}")
    return 0
