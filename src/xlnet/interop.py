"""`xlnet convert`: move checkpoints between our directories and Hugging Face XLNet directories, and to and from the
original TensorFlow checkpoints (xlnet/tf_checkpoint.py reads and writes their format).

Tensor names are shared, so conversion validates the weights against the config by loading them into the
head class the config names, then writes them back out in the source's dtype: HF -> ours -> HF is bit-identical.

The tokenizer travels in the destination's own format: `spiece.model` beside our `tokenizer.json` (xlnet) or HF's
`tokenizer_config.json` (HF). The two `tokenizer.json` files share a name but not a format, so neither is copied
across. A pretraining checkpoint holds no tokenizer: its run's, recorded in trainer_state.json, is exported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from xlnet.checkpoint import MODEL_DIR, load_model, read_weights
from xlnet.errors import XLNetError
from xlnet.fileio import DirKind, atomic_dir, check_replaceable, sha256_file
from xlnet.tokenizer import MODEL_FILE, SPECIAL_PIECES, Tokenizer, write_settings

HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_TOKENIZER_CLASS = "XLNetTokenizer"
# HF's attribute for each special piece (ids 0..8 of every XLNet spiece.model); <eod> and <eop> are HF's
# default additional special tokens
HF_SPECIAL_NAMES = ("unk_token", "bos_token", "eos_token", "cls_token", "sep_token", "pad_token", "mask_token")


def convert(src: str | Path, dst: str | Path, to_hf: bool, tokenizer: str | Path | None = None) -> Path:
    """`src` into `dst` in the other format, with `tokenizer` (a directory) if given, else `source_tokenizer`'s."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst)
    model = load_model(src, strict=True)
    model.to(source_dtype(src))
    return write_converted(model, source_tokenizer(src, tokenizer), src, dst, to_hf)


def convert_from_tf(src: str | Path, dst: str | Path, config: str | Path | None = None,
                    tokenizer: str | Path | None = None) -> Path:
    """An original (TensorFlow) XLNet checkpoint into our format, with `tokenizer` if given, else the
    spiece.model beside the checkpoint (the original release ships one)."""
    from xlnet.tf_checkpoint import checkpoint_prefix, load_tf_model, print_notes

    src, dst = Path(src), Path(dst)
    check_destination(src, dst)
    prefix = checkpoint_prefix(src)
    model, notes = load_tf_model(prefix, config)
    print_notes(notes)
    beside = prefix.parent
    tok = Tokenizer.load(tokenizer or beside) if tokenizer or (beside / MODEL_FILE).is_file() else None
    if tok is None:
        print(f"xlnet convert: warning: no tokenizer exported: {beside} has no {MODEL_FILE} (--tokenizer names one)",
              file=sys.stderr)
    return write_converted(model, tok, src, dst, to_hf=False)


def convert_to_tf(src: str | Path, dst: str | Path, task: str | None = None,
                  tokenizer: str | Path | None = None) -> Path:
    """`src` (ours or HF's) laid out as the original release (xlnet/tf_checkpoint.py's save_tf_model) for the
    original scripts' --init_checkpoint, with the tokenizer's spiece.model. `task` names a classifier's scope
    (default: the task it was fine-tuned on)."""
    from xlnet.finetune import read_meta
    from xlnet.tf_checkpoint import TF_DIR, print_notes, save_tf_model

    src, dst = Path(src), Path(dst)
    check_destination(src, dst, TF_DIR)
    model = load_model(src, strict=True)
    tok = source_tokenizer(src, tokenizer)
    check_vocab(tok, model, src)
    with atomic_dir(dst, replaces=TF_DIR) as tmp:
        notes = save_tf_model(model, tmp, task or read_meta(src).get("task") or "xlnet")
        if tok is not None:
            shutil.copyfile(tok.model_path, tmp / MODEL_FILE)
            if tok.lowercase:
                notes.append("the tokenizer lowercases: pass --uncased=True to the original scripts")
            if not tok.strip_accents:
                notes.append("the tokenizer keeps accents; the original scripts strip them")
    print_notes(notes)
    return dst


def check_destination(src: Path, dst: Path, kind: DirKind = MODEL_DIR) -> None:
    """Before any load: never convert only to refuse the destination."""
    if src.resolve() == dst.resolve():
        raise XLNetError(f"{dst}: destination must differ from the source")
    check_replaceable(dst, kind)


def check_vocab(tok: Tokenizer | None, model: torch.nn.Module, src: Path) -> None:
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise XLNetError(f"{tok.model_path}: tokenizer has {tok.vocab_size} pieces but the model in {src} only "
                         f"{model.config.vocab_size}")


def write_converted(model: torch.nn.Module, tok: Tokenizer | None, src: Path, dst: Path, to_hf: bool) -> Path:
    """`model` and `tok` into `dst`, in our format or HF's, together or not at all."""
    check_vocab(tok, model, src)
    with atomic_dir(dst, replaces=MODEL_DIR) as tmp:  # weights and tokenizer appear together or not at all
        model.save_pretrained(tmp, hf=to_hf)  # type: ignore[operator]  # replaces `tmp`, still our temp name
        if tok is not None:
            write_tokenizer(tok, tmp, to_hf)
    return dst


def source_tokenizer(src: Path, tokenizer: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer that goes with `src`'s weights: `tokenizer` if given, else its own spiece.model, else (a
    pretraining checkpoint) the one its run recorded, when that file still has the recorded sha256; a warning says
    why none is exported. A given tokenizer must match the recorded sha256."""
    from xlnet.finetune import pretraining_tokenizer  # finetune imports most of the package
    from xlnet.training import TRAINER_STATE

    recorded = pretraining_tokenizer(src)
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        if recorded is not None and sha256_file(tok.model_path) != recorded[1]:
            raise XLNetError(f"{src} was pretrained with another tokenizer than {tok.model_path} (sha256 differs "
                             f"from the one its {TRAINER_STATE} records)")
        return tok
    where = src if (src / MODEL_FILE).is_file() else Path(recorded[0]) if recorded else None
    if where is None:
        if any((src / name).is_file() for name in (HF_TOKENIZER_CONFIG, "tokenizer.json")):
            # e.g. saved by transformers 5, which writes only its own tokenizer.json
            print(f"xlnet convert: warning: the tokenizer was not exported: {src} has no {MODEL_FILE} (xlnet reads "
                  "SentencePiece models only)", file=sys.stderr)
        return None  # a bare model directory: there is no tokenizer to carry
    if recorded is not None:
        # checked before loading: another tokenizer with as many pieces would read the embeddings wrongly
        model_file = where / MODEL_FILE
        why = ("it is not found" if not model_file.is_file() else
               "its sha256 differs from the one the run recorded" if sha256_file(model_file) != recorded[1] else "")
        if why:
            print(f"xlnet convert: warning: the tokenizer was not exported: {src} was pretrained with "
                  f"{model_file}, and {why}; pass the right one with --tokenizer", file=sys.stderr)
            return None
    return Tokenizer.load(where)


def write_tokenizer(tok: Tokenizer, directory: Path, to_hf: bool) -> None:
    """spiece.model plus the settings file the destination's format reads its cleanup flags from."""
    shutil.copyfile(tok.model_path, directory / MODEL_FILE)
    if to_hf:
        text = json.dumps(hf_tokenizer_config(tok), indent=2) + "\n"
        (directory / HF_TOKENIZER_CONFIG).write_text(text, encoding="utf-8")
    else:
        write_settings(directory, tok.lowercase, tok.strip_accents, tok.remove_space, tok.vocab_size)


def hf_tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """HF XLNetTokenizer settings that clean text as `tok` does: transformers 4's runs our steps in our order
    (collapse spaces, `` and '' to ", NFKD accent stripping, lowercasing, the "9," re-split). Known gaps, HF's:
    transformers 5's strips accents whatever keep_accents says and does not re-split "9,"; both split special
    pieces such as "<eop>" out of the text, where SentencePiece reads them as pieces."""
    special = dict(zip(HF_SPECIAL_NAMES, SPECIAL_PIECES))
    return {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "do_lower_case": tok.lowercase,
        "remove_space": tok.remove_space,
        "keep_accents": not tok.strip_accents,
        "padding_side": "left",  # XLNet's, as ours: the <cls> summary reads the last position
        # XLNet reads segment ids (<cls> 2, padding 3); transformers 5 returns them only when named here
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        **special,
        "additional_special_tokens": ["<eop>", "<eod>"],
        # pinned to our ids, so no version of transformers appends them to the vocabulary instead
        "added_tokens_decoder": {str(i): {"content": piece, "lstrip": piece == "<mask>", "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for i, piece in enumerate(SPECIAL_PIECES)},
    }


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
    direction.add_argument("--from-tf", action="store_true",
                           help="SRC is an original (TensorFlow) XLNet checkpoint: a directory with xlnet_config.json "
                                "and the checkpoint (e.g. the released xlnet_cased_L-12_H-768_A-12), or its prefix")
    direction.add_argument("--to-tf", action="store_true",
                           help="write DST as an original (TensorFlow) XLNet checkpoint directory, as released: "
                                "xlnet_model.ckpt.*, xlnet_config.json, spiece.model (for the original scripts' "
                                "--init_checkpoint)")
    parser.add_argument("src", help="source model directory")
    parser.add_argument("dst", help="destination directory (replaced atomically if it holds a model)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory to export with the weights (default: SRC's spiece.model, else the "
                             "one its pretraining run recorded; --from-tf: the spiece.model beside the checkpoint)")
    parser.add_argument("--tf-config", default=None,
                        help="--from-tf: the original xlnet_config.json (default: beside the checkpoint)")
    parser.add_argument("--tf-task", default=None,
                        help="--to-tf, a classifier: the task in its scope, model/classification_<task>/ "
                             "(default: the task it was fine-tuned on, else xlnet)")


def run(args: argparse.Namespace) -> int:
    if args.tf_config and not args.from_tf:
        raise XLNetError("--tf-config goes with --from-tf")
    if args.tf_task and not args.to_tf:
        raise XLNetError("--tf-task goes with --to-tf")
    if args.from_tf:
        dst = convert_from_tf(args.src, args.dst, config=args.tf_config, tokenizer=args.tokenizer)
    elif args.to_tf:
        dst = convert_to_tf(args.src, args.dst, task=args.tf_task, tokenizer=args.tokenizer)
    else:
        dst = convert(args.src, args.dst, to_hf=args.to_hf, tokenizer=args.tokenizer)
    kind = "TensorFlow (original XLNet)" if args.to_tf else "Hugging Face" if args.to_hf else "xlnet"
    print(f"wrote {kind} checkpoint to {dst}")
    return 0
