"""`xlnet <verb>`: a thin layer over importable functions.

Each verb lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int | None`.
Modules are imported only when their verb is used, so `xlnet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from xlnet.allocator import tune_host_allocator
from xlnet.errors import XLNetError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("xlnet.demo",
             "pretrain a small model (preset mini) on the embedded corpus, fine-tune it, print scores, write plots"),
    "tokenizer": ("xlnet.tokenizer", "train a SentencePiece tokenizer with XLNet's special ids"),
    "prepare": ("xlnet.data.prepare", "turn raw text into token shards for pretraining"),
    "pretrain": ("xlnet.pretrain",
                 "pretrain with the permutation LM (or masked LM, left-to-right LM, InfoWord); resumable, torchrun-ready"),
    "finetune": ("xlnet.finetune", "fine-tune on GLUE / SQuAD / RACE / CoNLL / CSV / JSONL tasks"),
    "distill": ("xlnet.distill", "compress a fine-tuned model into a shallower one (patient knowledge distillation)"),
    "evaluate": ("xlnet.evaluate", "score predictions or a fine-tuned model with the official metrics"),
    "convert": ("xlnet.interop", "convert checkpoints to and from Hugging Face XLNet directories and the "
                                  "original TensorFlow checkpoints"),
}


def build_parser(verb: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and `verb`'s own (with its arguments) when it names one."""
    parser = argparse.ArgumentParser(prog="xlnet", description="XLNet: pretrain, fine-tune, evaluate, convert.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    verb_parser = None
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module).add_arguments(p)
            verb_parser = p
    return parser, verb_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    verb = verb if verb in VERBS else None
    parser, verb_parser = build_parser(verb)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would report them with the top-level usage; the verb's names its flags
        (verb_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verb is None:
        parser.print_help()
        return 0
    tune_host_allocator()  # freed step temporaries stay mapped (xlnet/allocator.py); XLNET_TUNE_MALLOC=0: off
    # SIGTERM as an exception (pretraining's StopSignal takes it over while it trains); signals are the main thread's
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        code = importlib.import_module(VERBS[args.verb][0]).run(args)
    except XLNetError as e:
        print(f"xlnet {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a file, a full disk, no permission: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"xlnet {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"xlnet {args.verb}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as e:  # a verb may say what its output directory now holds (finetune.run_in)
        print(f"xlnet {args.verb}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(code or 0)


class Terminated(Exception):
    """SIGTERM as an exception, so `finally` blocks and context managers remove temporary files on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
