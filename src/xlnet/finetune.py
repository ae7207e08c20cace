"""`xlnet finetune`: fine-tune a pretrained XLNet (ours or an HF directory) on a task and score it.

Flow: task files -> features (xlnet.tasks) -> head model -> AdamW with layer-wise lr decay, warmup + linear decay
-> evaluation on dev after every epoch through the official scorer (xlnet.evaluate) -> best checkpoint kept ->
test scores (when the test split is labeled), predictions files, metrics.jsonl/TensorBoard and PNG curves.

Output directory:
  best/          the best epoch's model (config.json + model.safetensors), its tokenizer and finetune.json
                 (task, labels, lengths), so `xlnet evaluate --model best/` featurizes exactly as training did
  dev/, test/    predictions of the best model in the official formats (+ SQuAD na_probs.json)
  summary.json, metrics.jsonl, tensorboard/, loss.png, dev.png
A new run deletes an earlier run's outputs (RUN_OUTPUTS) once its data is read, before training: an interrupted run
leaves its own best/ and dev/ so far, nothing of the earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlnet import tasks as T
from xlnet import training as TR
from xlnet.assets import default_tokenizer_dir, supersense_path
from xlnet.checkpoint import MODEL_DIR, load_model
from xlnet.cliconf import add_dataclass_arguments, build_dataclass, typed_values
from xlnet.config import XLNetConfig, read_config_json
from xlnet.errors import XLNetError
from xlnet.evaluate import evaluate_predictions, format_table
from xlnet.fileio import DirKind, DirLock, atomic_dir, atomic_write, check_replaceable, sha256_file
from xlnet.heads import (
    XLNetForMultipleChoice,
    XLNetForQuestionAnswering,
    XLNetForSequenceClassification,
    XLNetForTokenClassification,
)
from xlnet.tokenizer import MODEL_FILE, Tokenizer

HEADS: dict[str, type[nn.Module]] = {
    "classification": XLNetForSequenceClassification, "regression": XLNetForSequenceClassification,
    "race": XLNetForMultipleChoice, "squad": XLNetForQuestionAnswering, "tokens": XLNetForTokenClassification}
# Lengths when the config leaves them at 0: the paper's fine-tuning settings (GLUE/CoNLL 128; SQuAD 512 with a
# 64-token question; RACE 512 with the question+option's last 128 tokens, as run_race.py).
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"max_seq_len": 128}, "regression": {"max_seq_len": 128}, "tokens": {"max_seq_len": 128},
    "squad": {"max_seq_len": 512, "max_query_len": 64, "doc_stride": 128},
    "race": {"max_seq_len": 512, "max_query_len": 128}}
# Tensors that describe a row but are not model inputs.
NOT_INPUTS = ("window_index", "word_ids")
# What a fine-tuned directory records beside the weights (read back by `xlnet evaluate --model`).
META_FILE = "finetune.json"
DEV_DIR = DirKind("predictions.*", "a predictions directory")  # what <out>/dev may replace
# Everything a run writes into its output directory (`xlnet distill` adds its teacher's predictions)
RUN_OUTPUTS = ("best", "dev", "test", "summary.json", "metrics.jsonl", "tensorboard", "loss.png", "dev.png")
META_FIELDS = ("task", "max_seq_len", "doc_stride", "max_query_len")
# SQuAD's tensors that hold positions (shifted when a batch drops its leading padding): inputs, then outputs
SQUAD_POSITIONS = ("cls_index", "start_positions", "end_positions")
SQUAD_POSITION_OUTPUTS = ("start_top_index", "end_top_index")
# per task kind, how its batches' trimming touches more than the per-position inputs (Split's fields)
TRIM_SPECS = {"squad": dict(positions=SQUAD_POSITIONS, position_outputs=SQUAD_POSITION_OUTPUTS),
              "tokens": dict(per_position=("logits",))}
# Tokenizer settings that travel with spiece.model (ours, then HF's).
TOKENIZER_SETTINGS = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class FinetuneConfig:
    task: str = "supersense"  # GLUE (sst2, mnli ...), squad1/2, race, conll, classification, regression, supersense
    model: str = ""  # pretrained directory (ours or HF); "" = random initialisation from `preset`
    preset: str = "tiny"  # model size when training from scratch
    random_init: bool = False  # with --model: its architecture and tokenizer, but random weights (baseline)
    data: str = ""  # directory with train/dev[/test] files; "" = the embedded WordNet supersense task
    tokenizer: str = ""  # "" = the model directory's spiece.model, else its pretraining run's, else the embedded one
    out_dir: str = "runs/finetune"  # best/ (the best dev epoch's model), dev/, test/, summary.json, curves
    labels: str = ""  # comma-separated label set for generic classification data; "" = the labels in the data
    max_seq_len: int = 0  # 0 = the task's default (128; SQuAD and RACE 512)
    doc_stride: int = 0  # SQuAD: step between windows over a long context; 0 = the task's default (128)
    max_query_len: int = 0  # SQuAD question / RACE question+option tokens; 0 = the task's default (64 / 128)
    batch_size: int = 32  # training rows per step
    eval_batch_size: int = 64  # rows per prediction pass
    # each training batch from rows of similar length (shuffled runs of 50 batches' worth of rows, each sorted by
    # length): cheaper batches, a less random order; off = uniformly shuffled batches
    group_by_length: bool = False
    epochs: int = 3  # dev is scored after each; the best epoch's model is kept
    max_steps: int = 0  # 0 = run `epochs`
    lr: float = 5e-5  # AdamW peak, linear warm-up over warmup_frac of the steps, then linear decay to 0
    layer_decay: float = 1.0  # layer l of L gets lr * layer_decay**(L - l) (paper: 0.75 for SQuAD)
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    adam_eps: float = 1e-6
    clip: float = 1.0
    dropout: float = 0.1
    max_train_examples: int = 0  # deterministic subsample (0 = all)
    max_eval_examples: int = 0  # deterministic subsample of dev and test (0 = all)
    seed: int = 42  # head initialisation, subsamples, batch order, dropout
    # the subsamples' own seed (None = seed): another --seed then trains on the same examples (students against
    # their teacher, seed-to-seed spreads of one data set)
    subsample_seed: int | None = None
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu, cuda, cuda:1 ...
    precision: str = "auto"  # auto = bf16 autocast on a GPU, fp32 on CPU; or fp32, bf16
    # torch.compile every block (training and evaluation): on an H200 base-model training steps ran 1.9x faster
    # (measured compiling the whole model as one graph);
    # auto = on a GPU (eager on CPU, where inductor's backward was slower), as pretraining does
    compile: str = "auto"
    attn_impl: str = ""  # "" = the checkpoint's own setting
    quiet: bool = False  # no progress bar or per-epoch lines


def resolve_config(cfg: FinetuneConfig, spec: T.TaskSpec) -> FinetuneConfig:
    """Fill the task defaults (so summary.json records what ran) and reject values that cannot train."""
    filled = {k: v for k, v in TASK_DEFAULTS[spec.kind].items() if getattr(cfg, k) == 0}
    if "max_query_len" in filled:  # leave the text at least half of a short sequence
        filled["max_query_len"] = min(filled["max_query_len"], filled.get("max_seq_len", cfg.max_seq_len) // 2)
    cfg = dataclasses.replace(cfg, task=spec.name, **filled)
    checks = [(cfg.batch_size > 0 and cfg.eval_batch_size > 0, "batch sizes must be positive"),
              *((getattr(cfg, k) > 0, f"{k} must be positive, got {getattr(cfg, k)}")
                for k in TASK_DEFAULTS[spec.kind]),
              (cfg.epochs > 0 or cfg.max_steps > 0, "needs epochs > 0 or max_steps > 0"),
              (min(cfg.epochs, cfg.max_steps, cfg.max_train_examples, cfg.max_eval_examples) >= 0,
               "epochs, max_steps, max_train_examples and max_eval_examples must be >= 0"),
              (0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}"),
              (0 < cfg.layer_decay <= 1, f"layer_decay must be in (0, 1], got {cfg.layer_decay}"),
              (0 <= cfg.warmup_frac < 1, f"warmup_frac must be in [0, 1), got {cfg.warmup_frac}"),
              (cfg.lr > 0, f"lr must be positive, got {cfg.lr}")]
    for ok, message in checks:
        if not ok:
            raise XLNetError(f"invalid FinetuneConfig: {message}")
    TR.resolve_compile(cfg.compile, torch.device("cpu"))  # the value only: a typo fails before any work
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# data


def split_file(spec: T.TaskSpec, data_dir: Path, split: str) -> Path | None:
    """The file (or RACE folder) for a split, by the names the public releases use."""
    names = {"train": ("train",), "dev": spec.dev_names, "test": spec.test_names}[split]
    for name in names:
        if spec.fmt == "race":
            candidates = [data_dir / name]
        elif spec.fmt == "squad":  # train-v2.0.json for squad2 even when train-v1.1.json sits beside it
            candidates = sorted(data_dir.glob(f"{name}-v{spec.squad_version}*.json")) + sorted(
                data_dir.glob(f"{name}.*"))
        else:  # train.tsv, dev.jsonl.gz, train.txt ...
            candidates = sorted(data_dir.glob(f"{name}.*"))
        found = next((p for p in candidates if p.exists()), None)
        if found is not None:
            return found
    return None


def data_files(spec: T.TaskSpec, data: str) -> dict[str, Path | None]:
    """{split: path}; train and dev must exist."""
    if data:
        data_dir = Path(data)
    elif spec.name == "supersense":
        data_dir = Path(supersense_path("train")).parent
    else:
        raise XLNetError(f"task {spec.name!r} needs --data DIR (only 'supersense' ships with the package)")
    if not data_dir.is_dir():
        raise XLNetError(f"{data_dir}: no such data directory")
    files = {s: split_file(spec, data_dir, s) for s in ("train", "dev", "test")}
    for split in ("train", "dev"):
        if files[split] is None:
            raise XLNetError(f"{data_dir / split}: no {split} split (expected {split}.* or, for RACE, {split}/)")
    return files


@dataclass
class Split:
    """One split's features (tensors, row-aligned) plus what turns model outputs into a predictions file."""

    path: Path
    ids: list[str]  # gold ids of the examples kept, as the scorer names them
    subsampled: bool  # scoring must then be restricted to `ids`
    tensors: dict[str, Tensor]
    labeled: bool
    write_predictions: Callable[[dict[str, Tensor], Path], dict[str, Path]]
    # How batches may drop the positions that are padding in every row (`trim_padding`): whether they may, the
    # tensors holding positions (shifted), the outputs with a position dim (tagging's logits: padded back to the
    # full width) and the outputs holding positions (SQuAD's beam: shifted back)
    trimmable: bool = False
    positions: tuple[str, ...] = ()
    per_position: tuple[str, ...] = ()
    position_outputs: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


def sample_seed(cfg: FinetuneConfig) -> int:
    return cfg.seed if cfg.subsample_seed is None else cfg.subsample_seed


def subsample(items: list, limit: int, seed: int) -> list:
    """A deterministic subset of `limit` items, in file order (0 = all)."""
    if limit <= 0 or len(items) <= limit:
        return items
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(items), generator=g)[:limit].tolist())
    return [items[i] for i in keep]


def load_split(spec: T.TaskSpec, path: Path, tok: Tokenizer, cfg: FinetuneConfig, labels: list[str] | None,
               limit: int) -> Split:
    """Read, subsample and featurize one split; the returned Split knows how to write its predictions."""
    if spec.kind in ("classification", "regression"):
        everything: list = T.read_text_examples(spec, path, labels)
        examples = subsample(everything, limit, sample_seed(cfg))
        tensors = T.featurize_text(examples, tok, spec, cfg.max_seq_len, labels)
        ids = [e.id for e in examples]
        writer: Callable = lambda out, d: write_text(examples, spec, labels, out, d)
    elif spec.kind == "race":
        everything = T.read_race(path)
        examples = subsample(everything, limit, sample_seed(cfg))
        tensors = T.featurize_race(examples, tok, cfg.max_seq_len, cfg.max_query_len)
        ids = [e.id for e in examples]
        writer = lambda out, d: write_race(examples, out, d)
    elif spec.kind == "tokens":
        everything = T.read_conll(path)
        examples = subsample(everything, limit, sample_seed(cfg))
        tensors = T.featurize_tokens(examples, tok, cfg.max_seq_len, labels)
        ids = [e.id for e in examples]
        writer = lambda out, d: write_conll(examples, labels or [], tensors, out, d)
    else:
        everything = T.read_squad(path)
        examples = subsample(everything, limit, sample_seed(cfg))
        feats = T.featurize_squad(examples, tok, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
        tensors = feats.tensors
        ids = [e.qid for e in examples]
        writer = lambda out, d: write_squad(feats, out, d, no_answers=spec.squad_version == 2)
    labeled = is_labeled(spec, examples, tensors)
    return Split(path, ids, len(examples) < len(everything), tensors, labeled, writer, trimmable=True,
                 **TRIM_SPECS.get(spec.kind, {}))


def is_labeled(spec: T.TaskSpec, examples: list, tensors: dict[str, Tensor]) -> bool:
    """Unlabeled copies (GLUE/RACE test files, SQuAD files without answers) are predicted but not scored."""
    if spec.kind == "squad":
        return any(e.answers or e.is_impossible for e in examples)
    return "labels" in tensors  # the featurizers leave labels out when any example lacks one


def write_text(examples: list[T.TextExample], spec: T.TaskSpec, labels: list[str] | None,
               out: dict[str, Tensor], directory: Path) -> dict[str, Path]:
    """GLUE: the submission TSV (index<TAB>prediction); CSV/JSONL data: JSONL {"id", "prediction"}."""
    logits = out["logits"]
    if spec.kind == "regression":
        preds: list[Any] = logits.squeeze(-1).tolist()
    else:
        names = labels or list(spec.labels or [])
        preds = [names[i] for i in logits.argmax(-1).tolist()]
    if spec.fmt == "glue":
        path = directory / "predictions.tsv"
        lines = ["index\tprediction"] + [f"{e.id}\t{p}" for e, p in zip(examples, preds)]
    else:
        path = directory / "predictions.jsonl"
        lines = [json.dumps({"id": e.id, "prediction": p}) for e, p in zip(examples, preds)]
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"predictions": path}


def write_race(examples: list[T.RaceExample], out: dict[str, Tensor], directory: Path) -> dict[str, Path]:
    path = directory / "predictions.json"
    answers = {e.id: "ABCD"[i] for e, i in zip(examples, out["logits"].argmax(-1).tolist())}
    with atomic_write(path, "w") as f:
        json.dump(answers, f, indent=1)
    return {"predictions": path}


def write_conll(examples: list[T.TokenExample], labels: list[str], tensors: dict[str, Tensor],
                out: dict[str, Tensor], directory: Path) -> dict[str, Path]:
    pred_ids = out["logits"].argmax(-1)
    path = directory / "predictions.conll"
    with atomic_write(path, "w") as f:
        for row, e in enumerate(examples):
            tags = ["O"] * len(e.words)  # words cut off by max_seq_len are predicted "O"
            for pos, w in enumerate(tensors["word_ids"][row].tolist()):
                if w >= 0:
                    tags[w] = labels[int(pred_ids[row, pos])]
            f.write("".join(f"{w} {t}\n" for w, t in zip(e.words, tags)) + "\n")
    return {"predictions": path}


def write_squad(feats: T.SquadFeatures, out: dict[str, Tensor], directory: Path,
                no_answers: bool) -> dict[str, Path]:
    """predictions.json, and na_probs.json for SQuAD 2.0 (no_answers; v1.1 has no unanswerable questions)."""
    preds, na = T.squad_predictions(feats, out["start_top_log_probs"], out["start_top_index"],
                                    out["end_top_log_probs"], out["end_top_index"], out["cls_logits"])
    paths = {"predictions": directory / "predictions.json"}
    if no_answers:
        paths["na_probs"] = directory / "na_probs.json"
    T.write_squad_predictions(preds, na, paths["predictions"], paths.get("na_probs"))
    return paths


def task_labels(spec: T.TaskSpec, cfg: FinetuneConfig, train_path: Path) -> list[str] | None:
    """The label set, in id order: the registry's, --labels, labels.txt beside the data, or the training data's."""
    if spec.kind in ("regression", "squad", "race"):
        return None  # race scores 4 options with one logit each; its letters live in the writer
    given = [s.strip() for s in cfg.labels.split(",") if s.strip()] or None
    if spec.kind == "tokens":
        return given or sorted({t for e in T.read_conll(train_path) for t in e.tags})
    return T.resolve_labels(spec, train_path, given) or T.labels_from_examples(T.read_text_examples(spec, train_path))


# ---------------------------------------------------------------------------------------------------------------
# model, tokenizer, optimizer


def build_model(cfg: FinetuneConfig, spec: T.TaskSpec, labels: list[str] | None) -> nn.Module:
    """The task head on the pretrained body (`cfg.model`) or on a fresh `cfg.preset` body."""
    head = HEADS[spec.kind]
    overrides: dict[str, Any] = dict(num_labels=len(labels) if labels else 1, label_names=list(labels or []),
                                     dropout=cfg.dropout, dropatt=cfg.dropout, summary_last_dropout=cfg.dropout,
                                     mem_len=0, reuse_len=0, bi_data=False)
    if cfg.attn_impl:
        overrides["attn_impl"] = cfg.attn_impl
    if cfg.model and cfg.random_init:  # the checkpoint's architecture, fresh weights: what pretraining buys
        return head(XLNetConfig(**{**XLNetConfig.load(cfg.model).to_dict(), **overrides}))
    if cfg.model:  # a fine-tuned --model's head that does not fit this task (MNLI's 3 labels for RTE) starts fresh
        return head.from_pretrained(cfg.model, verbose=not cfg.quiet, reinit_head=True, **overrides)
    return head(XLNetConfig.from_preset(cfg.preset, **overrides))


def load_tokenizer(cfg: FinetuneConfig) -> Tokenizer:
    """--tokenizer, else the model directory's own, else (a pretraining checkpoint) the one its run recorded, else
    the embedded one. A pretraining checkpoint also records its tokenizer's sha256: another tokenizer with as many
    pieces would give the embeddings other meanings and train without a word. The embedded one is refused for a
    model with another vocabulary size."""
    model_dir = Path(cfg.model) if cfg.model else None
    recorded = pretraining_tokenizer(model_dir) if model_dir else None
    fell_back = False
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    elif model_dir and (model_dir / MODEL_FILE).is_file():
        tok = Tokenizer.load(model_dir)
    elif recorded and (Path(recorded[0]) / MODEL_FILE).is_file():
        tok = Tokenizer.load(recorded[0])
    else:
        tok, fell_back = Tokenizer.load(default_tokenizer_dir()), True
        # a model with another vocabulary was not trained on the embedded tokenizer (a missing directory is
        # build_model's to report)
        vocab = XLNetConfig.load(model_dir).vocab_size if model_dir and model_dir.is_dir() and not recorded else None
        if vocab is not None and vocab != tok.vocab_size:
            raise XLNetError(f"{model_dir} holds no tokenizer (spiece.model) and its vocabulary ({vocab} pieces) is "
                             f"not the embedded tokenizer's ({tok.vocab_size}): pass the tokenizer it was trained "
                             f"with as --tokenizer")
    if recorded and sha256_file(tok.model_path) != recorded[1]:
        if fell_back:  # the recorded tokenizer is missing
            raise XLNetError(f"{model_dir} was pretrained with the tokenizer in {recorded[0]} (its "
                             f"{TR.TRAINER_STATE}), which is not found from here: pass it as --tokenizer")
        raise XLNetError(f"{model_dir} was pretrained with another tokenizer than {tok.model_path} (sha256 "
                         f"differs): pass the pretraining run's --tokenizer")
    return tok


def pretraining_tokenizer(model_dir: Path) -> tuple[str, str] | None:
    """(tokenizer directory, sha256 of its spiece.model) recorded by the pretraining run that wrote `model_dir`;
    None for other directories."""
    if not (model_dir / TR.TRAINER_STATE).is_file():
        return None
    state = TR.read_trainer_state(model_dir)
    where, sha = state.get("config", {}).get("tokenizer_dir"), state.get("identity", {}).get("tokenizer_dir")
    return (where, sha) if isinstance(where, str) and isinstance(sha, str) else None


def check_vocab(model: nn.Module, tok: Tokenizer, cfg: FinetuneConfig) -> None:
    if model.config.vocab_size < tok.vocab_size:
        raise XLNetError(f"{tok.model_path}: tokenizer has {tok.vocab_size} pieces but the model "
                         f"({cfg.model or 'preset ' + cfg.preset}) only {model.config.vocab_size}")


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with layer-wise lr decay (each group's lr is cfg.lr * layer_decay**depth) and warmup + linear decay."""
    groups = TR.layerwise_lr_groups(model, cfg.weight_decay, cfg.layer_decay, model.config.n_layer)
    optimizer = TR.build_optimizer(groups, cfg.lr, eps=cfg.adam_eps)
    return optimizer, TR.build_scheduler(optimizer, int(cfg.warmup_frac * total_steps), total_steps)


def model_meta(spec: T.TaskSpec, cfg: FinetuneConfig, labels: list[str] | None) -> dict[str, Any]:
    """finetune.json: what `xlnet evaluate --model` (and `xlnet distill`) need to featurize as training did."""
    return {"task": spec.name, "labels": labels, **{k: getattr(cfg, k) for k in META_FIELDS}}


def check_outputs(out_dir: Path, inputs: Mapping[str, str] | None = None,
                  outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Fail before featurizing and training, not at the first dev epoch, if best/ or dev/ is not ours to replace,
    or if one of `inputs` ({flag: path}) lies in `outputs`, which `clear_outputs` deletes before training."""
    if out_dir.exists() and not out_dir.is_dir():
        raise XLNetError(f"{out_dir}: exists and is not a directory; choose another --out-dir")
    check_replaceable(out_dir / "best", MODEL_DIR)
    check_replaceable(out_dir / "dev", DEV_DIR)
    for flag, given in (inputs or {}).items():
        if not given:
            continue
        path = Path(given).resolve()
        for name in outputs:
            output = (out_dir / name).resolve()
            if path == output or output in path.parents:
                raise XLNetError(f"{flag} {given} is inside {out_dir / name}, which this run replaces; "
                                 "choose another --out-dir")


def clear_outputs(out_dir: Path, outputs: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Delete an earlier run's outputs before this run writes its own (`check_outputs` has allowed replacing
    them): an interrupted run must not leave its best/ beside another run's summary.json, test/ or curves."""
    for name in outputs:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def interrupted_note(out_dir: Path) -> str:
    """What an interrupted run leaves in out_dir (nothing of an earlier run: `clear_outputs`)."""
    held = (f"{out_dir / 'best'} holds this run's best model so far" if (out_dir / "best").is_dir()
            else f"{out_dir} holds no model yet (no dev evaluation finished)")
    return held + ("" if (out_dir / "summary.json").is_file() else "; no summary.json")


@contextlib.contextmanager
def run_in(out_dir: Path, is_main: bool, outputs: tuple[str, ...] = RUN_OUTPUTS) -> Iterator[None]:
    """A run's hold on its output directory (finetune, distill): made if missing; rank 0, which alone writes,
    locks it (a second run would delete this one's outputs) and clears an earlier run's outputs; Ctrl-C inside
    carries `interrupted_note`, which the CLI prints after "interrupted"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with DirLock(out_dir, enabled=is_main):
        try:
            if is_main:
                clear_outputs(out_dir, outputs)
            yield
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interrupted_note(out_dir)) from None


def save_model_dir(model: nn.Module, directory: Path, tok: Tokenizer, meta: dict[str, Any]) -> Path:
    """Weights, tokenizer and finetune.json swapped in as one directory: a crash never leaves half of them."""
    with atomic_dir(directory, replaces=MODEL_DIR) as tmp:
        TR.unwrap(model).save_pretrained(tmp)  # replaces `tmp` itself, which is still our private temp name
        shutil.copyfile(tok.model_path, tmp / MODEL_FILE)
        for name in TOKENIZER_SETTINGS:  # the flags (lowercase, accents) the pieces were trained with
            if (tok.model_path.parent / name).is_file():
                shutil.copyfile(tok.model_path.parent / name, tmp / name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# prediction and scoring (shared with `xlnet evaluate --model`)


def batches(tensors: dict[str, Tensor], size: int, generator: torch.Generator | None = None,
            order: Tensor | None = None, trim: bool = False, positions: tuple[str, ...] = ()):
    """Rows in `order` (default: shuffled by generator, else in order), `size` at a time; trim: without the
    positions that are padding in every row of the batch (`trim_padding`, shifting the `positions` tensors)."""
    n = next(iter(tensors.values())).shape[0]
    if order is None:
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, size):
        idx = order[start : start + size]
        batch = {k: v[idx] for k, v in tensors.items()}
        yield trim_padding(batch, positions) if trim else batch


def trim_padding(batch: dict[str, Tensor], positions: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Drop the leading positions that are padding in every row (features are left-padded, `<cls>` last) from
    every per-position tensor (those shaped as attention_mask: ids, segments, SQuAD's p_mask, tagging labels),
    and shift the tensors that hold positions (SQuAD's cls_index and answer span). Each real token's output is
    then the full width's (no real token attends to a padded key, and positions are relative), at the cost of the
    batch's longest row instead of max_seq_len."""
    mask = batch["attention_mask"]
    first = int(mask.reshape(-1, mask.shape[-1]).amax(0).argmax())  # the first position holding a real token
    if first == 0:
        return batch
    return {k: v[..., first:] if v.shape == mask.shape else v - first if k in positions else v
            for k, v in batch.items()}


def length_grouped_order(lengths: Tensor, batch_size: int, generator: torch.Generator, group: int = 50) -> Tensor:
    """A shuffled order whose consecutive batches hold rows of similar length: the shuffled rows cut into runs of
    `group` batches' worth, each run sorted longest first (every run but the last is whole batches, so the
    batches do not straddle runs)."""
    runs = torch.randperm(len(lengths), generator=generator).split(group * batch_size)
    return torch.cat([run[torch.sort(lengths[run], descending=True, stable=True).indices] for run in runs])


def row_lengths(split: Split) -> Tensor:
    """Real tokens per row (over all choices of a RACE row)."""
    return split.tensors["attention_mask"].flatten(1).sum(1)


def trims(model: nn.Module, split: Split) -> bool:
    """Whether batches of this split drop their all-padding positions: not under compiled blocks (every new
    length would compile them again)."""
    return split.trimmable and not getattr(getattr(model, "transformer", model), "blocks_compiled", False)


def model_inputs(batch: dict[str, Tensor], device: torch.device, train: bool) -> dict[str, Tensor]:
    """The batch's model inputs on `device`. To a GPU through pinned memory, asynchronously: a copy from pageable
    memory would wait for every step queued before it (the loops queue a step before reading the last)."""
    pinned = device.type == "cuda"
    out = {k: (v.pin_memory() if pinned else v).to(device, non_blocking=pinned)
           for k, v in batch.items() if k not in NOT_INPUTS}
    if not train:  # the QA head decodes a beam only when no gold positions are given
        for key in ("labels", "start_positions", "end_positions", "is_impossible"):
            out.pop(key, None)
    return out


@torch.no_grad()
def predict(model: nn.Module, split: Split, cfg: FinetuneConfig, device: torch.device) -> dict[str, Tensor]:
    was_training = model.training
    model.eval()
    keep = ("logits", "start_top_log_probs", "start_top_index", "end_top_log_probs", "end_top_index", "cls_logits")
    parts: dict[str, list[Tensor]] = {}
    trim = trims(model, split)
    order = None
    if trim:  # longest first, so that each batch's rows are of about one length; outputs are put back in order
        order = torch.sort(row_lengths(split), descending=True, stable=True).indices
    width = split.tensors["attention_mask"].shape[-1]
    for batch in batches(split.tensors, cfg.eval_batch_size, order=order, trim=trim, positions=split.positions):
        with TR.autocast(device, cfg.precision):
            out = model(**model_inputs(batch, device, train=False))
        dropped = width - batch["attention_mask"].shape[-1]  # leading positions trimmed off this batch
        for key in keep:
            value = getattr(out, key)
            if value is None:
                continue
            if key in split.per_position:  # back to the full width (zeros where the batch was trimmed)
                value = F.pad(value, (0, 0, dropped, 0))
            elif key in split.position_outputs:
                value = value + dropped
            parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
    model.train(was_training)
    result = {k: torch.cat(v) for k, v in parts.items()}
    if order is not None:
        result = {k: torch.empty_like(v).index_copy_(0, order, v) for k, v in result.items()}
    return result


def score(model: nn.Module, split: Split, spec: T.TaskSpec, cfg: FinetuneConfig, labels: list[str] | None,
          device: torch.device, directory: Path) -> dict[str, Any] | None:
    """Predict a split, write its predictions files and, when it is labeled, score them officially."""
    paths = split.write_predictions(predict(model, split, cfg, device), directory)
    if not split.labeled:
        return None
    return evaluate_predictions(spec.name, split.path, paths["predictions"], paths.get("na_probs"), labels=labels,
                                ids=split.ids if split.subsampled else None)


# ---------------------------------------------------------------------------------------------------------------
# the loop


# Under torchrun the other ranks wait in a collective while rank 0 alone scores dev (after each epoch) and test:
# longer than NCCL's default 10 minutes on a large split must not end the run.
EVAL_WAIT_S = 6 * 3600


def finetune(cfg: FinetuneConfig, info: TR.DistInfo | None = None) -> dict[str, Any]:
    """Fine-tune and score; returns the summary (under torchrun: rank 0's; the other ranks return
    {"rank": r, "steps": n} and write nothing)."""
    info = info or TR.init_distributed(cfg.device)
    spec = T.get_task(cfg.task)
    cfg = resolve_config(cfg, spec)
    files = data_files(spec, cfg.data)
    check_outputs(Path(cfg.out_dir), {"--model": cfg.model, "--tokenizer": cfg.tokenizer, "--data": cfg.data})
    TR.set_seed(cfg.seed)
    device = info.device
    cfg = dataclasses.replace(cfg, precision=TR.resolve_precision(cfg.precision, device))
    labels = task_labels(spec, cfg, files["train"])
    tok = load_tokenizer(cfg)
    model = build_model(cfg, spec, labels).to(device)  # before featurizing: a bad --model fails fast
    check_vocab(model, tok, cfg)

    train, dev, test = load_splits(spec, files, tok, cfg, labels)
    out_dir = Path(cfg.out_dir)
    with run_in(out_dir, info.is_main):
        meta = model_meta(spec, cfg, labels)
        start = time.time()
        best, steps = train_loop(model, train, dev, spec, cfg, labels, device, out_dir,
                                 lambda m: save_model_dir(m, out_dir / "best", tok, meta), info=info)
        if not info.is_main:
            return {"rank": info.rank, "steps": steps}
        return finish(cfg, spec, labels, test, device, out_dir, best, steps, time.time() - start)


def load_splits(spec: T.TaskSpec, files: dict[str, Path | None], tok: Tokenizer, cfg: FinetuneConfig,
                labels: list[str] | None) -> tuple[Split, Split, Split | None]:
    """train, dev (labeled: the best epoch is chosen by it) and test when there is one."""
    train = load_split(spec, files["train"], tok, cfg, labels, cfg.max_train_examples)  # type: ignore[arg-type]
    if not train.labeled:
        raise XLNetError(f"{train.path}: the training split has no labels (is its label column named as the task "
                         f"expects?)")
    dev = load_split(spec, files["dev"], tok, cfg, labels, cfg.max_eval_examples)  # type: ignore[arg-type]
    if not dev.labeled:
        raise XLNetError(f"{dev.path}: the dev split has no labels, and the best epoch is chosen by its score")
    test = load_split(spec, files["test"], tok, cfg, labels, cfg.max_eval_examples) if files["test"] else None
    return train, dev, test


# A training step's loss from the model and a batch of its inputs, plus named parts to log (distillation's).
# (loss, named terms to log, detached, on the device: read with the step's other scalars)
StepLoss = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


def task_loss(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The head's own loss on the gold labels."""
    return model(**inputs).loss, {}


def rank_rows(batch: dict[str, Tensor], info: TR.DistInfo) -> tuple[dict[str, Tensor], float]:
    """This rank's share of a global batch (consecutive rows; shares differ by at most one row) and the weight of
    its mean loss: n_rank * world / n, so that DDP's mean over the ranks' gradients is the gradient of the whole
    batch's mean loss (exactly so for losses that are means over rows). A rank left without a row (a last batch
    smaller than the world) runs the first row at weight 0: every rank must take part in each backward."""
    if not info.distributed:
        return batch, 1.0
    n = len(next(iter(batch.values())))
    per, extra = divmod(n, info.world_size)
    start = info.rank * per + min(info.rank, extra)
    rows = per + (info.rank < extra)
    weight = rows * info.world_size / n
    share = slice(start, start + rows) if rows else slice(0, 1)
    return {k: v[share] for k, v in batch.items()}, weight


def batch_means(values: dict[str, Tensor], weight: float, info: TR.DistInfo) -> dict[str, Tensor]:
    """The whole batch's means of a step's logged scalars from each rank's weighted ones (one all-reduce)."""
    if not info.distributed:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]) * weight
    return dict(zip(values, TR.all_reduce(stacked, "mean")))


def queue_step(wrapped: nn.Module, model: nn.Module, batch: dict[str, Tensor], step_loss: StepLoss,
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: FinetuneConfig,
               device: torch.device, info: TR.DistInfo) -> tuple[TR.PendingScalars, float]:
    """One optimizer step on this rank's share of `batch`; its logged scalars come back pending (not read yet,
    so the host can queue the next step first) with the head's learning rate."""
    rows, weight = rank_rows(batch, info)
    with TR.autocast(device, cfg.precision):
        loss, parts = step_loss(wrapped, model_inputs(rows, device, train=True))
    (loss * weight if info.distributed else loss).backward()
    TR.clip_grad_norm(model, cfg.clip)
    lr = max(scheduler.get_last_lr())  # the head's, as this step uses it
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return TR.PendingScalars(**batch_means({"loss": loss, **parts}, weight, info)), lr


def train_loop(model: nn.Module, train: Split, dev: Split, spec: T.TaskSpec, cfg: FinetuneConfig,
               labels: list[str] | None, device: torch.device, out_dir: Path,
               save_best: Callable[[nn.Module], Path], step_loss: StepLoss = task_loss,
               desc: str = "finetune", info: TR.DistInfo | None = None) -> tuple[dict[str, Any] | None, int]:
    """Train for max_steps (or epochs), scoring dev after every epoch; returns (best dev result, steps). Under
    torchrun (`info`) every rank trains on its share of each batch of cfg.batch_size rows through DDP, and rank 0
    alone scores dev, keeps the best model and logs (the others then wait in the next step's all-reduce)."""
    info = info or TR.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    steps_per_epoch = math.ceil(train.rows / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg, total)
    logger = TR.MetricsLogger(out_dir, enabled=info.is_main)
    progress = TR.Progress(total, enabled=not cfg.quiet and info.is_main, desc=f"{desc} {spec.name}")
    gen = torch.Generator().manual_seed(cfg.seed)
    best: dict[str, Any] | None = None
    step = 0
    TR.maybe_compile(model, cfg.compile, device)
    # find_unused: mask_emb (the query stream's input) never gets a gradient here, nor do some heads' parts
    wrapped = TR.wrap_ddp(model, info, find_unused=True) if info.distributed else model
    trim = trims(model, train)
    lengths = row_lengths(train) if trim and cfg.group_by_length else None

    def read(pending: tuple[TR.PendingScalars, float]) -> None:
        """Log a queued step once its scalars arrive: the same values on every rank, so a non-finite loss stops
        them all (before anything more is saved: the best model is saved only after an epoch's step is read)."""
        nonlocal step
        parts = pending[0].read()
        loss_value = parts.pop("loss")
        if not math.isfinite(loss_value):
            raise XLNetError(f"loss became {loss_value} at step {step + 1}; lower --lr or check the data")
        step += 1
        logger.log("train", step, loss=loss_value, lr=pending[1], **parts)
        progress.update(loss=f"{loss_value:.4f}")

    model.train()
    launched, queued = 0, None  # steps queued; the one queued but not read yet (read after the next is queued)
    try:
        while launched < total:
            order = None if lengths is None else length_grouped_order(lengths, cfg.batch_size, gen)
            for batch in batches(train.tensors, cfg.batch_size, gen, order=order, trim=trim,
                                 positions=train.positions):
                ahead = queue_step(wrapped, model, batch, step_loss, optimizer, scheduler, cfg, device, info)
                launched += 1
                if queued is not None:
                    read(queued)
                queued = ahead
                if launched % steps_per_epoch == 0 or launched == total:  # dev sees the model this step left
                    read(queued)
                    queued = None
                    if info.is_main:
                        best = evaluate_epoch(model, dev, spec, cfg, labels, device, out_dir, step, logger,
                                              progress, best, save_best)
                if launched >= total:
                    break
    finally:
        progress.close()
        logger.close()
    return best, step


def evaluate_epoch(model: nn.Module, dev: Split, spec: T.TaskSpec, cfg: FinetuneConfig, labels: list[str] | None,
                   device: torch.device, out_dir: Path, step: int, logger: TR.MetricsLogger, progress: TR.Progress,
                   best: dict[str, Any] | None, save_best: Callable[[nn.Module], Path]) -> dict[str, Any] | None:
    """Score dev; when it beats the best so far, keep the model in best/ and its predictions in dev/."""
    with tempfile.TemporaryDirectory(prefix=".dev-epoch.", dir=out_dir) as scratch:
        result = score(model, dev, spec, cfg, labels, device, Path(scratch))
        assert result is not None  # finetune() refuses an unlabeled dev split
        logger.log("valid", step, **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))})
        if not cfg.quiet:
            progress.write(f"step {step}: dev {result['main_metric']} = {result['main']:.4f}")
        if best is not None and not result["main"] > best["main"]:
            return best
        save_best(model)
        with atomic_dir(out_dir / "dev", replaces=DEV_DIR) as final:
            for f in Path(scratch).iterdir():
                os.replace(f, final / f.name)
    return {**result, "step": step}


def finish(cfg: FinetuneConfig, spec: T.TaskSpec, labels: list[str] | None, test: Split | None,
           device: torch.device, out_dir: Path, best: dict[str, Any] | None, steps: int, seconds: float,
           what: str = "fine-tuning", extra: dict[str, Any] | None = None) -> dict:
    """Score test with the best model, write summary.json (with `extra`'s entries) and the curves."""
    summary: dict[str, Any] = {"task": spec.name, "steps": steps, "seconds": round(seconds, 1),
                               "config": asdict(cfg), "dev": best, "test": None, "best": str(out_dir / "best")}
    if best is not None and test is not None:  # (run_in has removed an earlier run's test/)
        model = HEADS[spec.kind].from_pretrained(out_dir / "best", verbose=False).to(device)
        summary["test"] = score(model, test, spec, cfg, labels, device, out_dir / "test")
    summary.update(extra or {})
    with atomic_write(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    from xlnet.plots import plot_loss_curves  # matplotlib is slow to import; only needed here

    rows = TR.read_metrics(out_dir / "metrics.jsonl")
    plot_loss_curves(rows, out_dir / "loss.png", title=f"{what} {spec.name} (loss)")
    if best is not None:
        plot_loss_curves(rows, out_dir / "dev.png", title=f"{what} {spec.name} (dev {best['main_metric']})",
                         key=best["main_metric"])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# a fine-tuned directory on one data file (`xlnet evaluate --model`)


def evaluate_model(task: str, model_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
                   labels: list[str] | None = None, device: str = "auto",
                   batch_size: int = 64) -> dict[str, Any] | None:
    """Featurize `data` as the model was trained (finetune.json; else the task defaults), predict, write the
    predictions into `out_dir` and score them; None when the file is unlabeled (predictions only)."""
    spec = T.get_task(task)
    model_dir = Path(model_dir)
    model = load_model(model_dir, verbose=False)
    if not isinstance(model, HEADS[spec.kind]):
        raise XLNetError(f"{model_dir}: holds a {type(model).__name__}, task {spec.name!r} needs "
                         f"{HEADS[spec.kind].__name__}")
    meta = read_meta(model_dir)
    if meta.get("task", spec.name) != spec.name:
        raise XLNetError(f"{model_dir} was fine-tuned on {meta['task']}, not {spec.name} (its {META_FILE})")
    dev = TR.resolve_device(device)
    lengths = {k: meta[k] for k in META_FIELDS if k in meta and k != "task"}
    cfg = resolve_config(FinetuneConfig(task=spec.name, model=str(model_dir), eval_batch_size=batch_size,
                                        precision=TR.resolve_precision("auto", dev), **lengths), spec)
    labels = labels or meta.get("labels") or model.config.label_names or (list(spec.labels) if spec.labels else None)
    if spec.kind in ("classification", "tokens") and len(labels or []) != model.config.num_labels:
        raise XLNetError(f"{model_dir}: the model has {model.config.num_labels} labels but the label set is "
                         f"{labels} (pass --labels)")
    tok = load_tokenizer(cfg)
    check_vocab(model, tok, cfg)
    split = load_split(spec, Path(data), tok, cfg, labels, 0)
    return score(model.to(dev), split, spec, cfg, labels, dev, Path(out_dir))


def read_meta(model_dir: Path) -> dict[str, Any]:
    """finetune.json of a directory written by `xlnet finetune` ({} for other directories, e.g. HF's)."""
    path = model_dir / META_FILE
    if not path.is_file():
        return {}
    meta = read_config_json(path)[0]
    fields = typed_values(FinetuneConfig, {k: meta[k] for k in META_FIELDS if k in meta}, str(path))
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise XLNetError(f"{path}: labels must be a list of strings, not {labels!r}")
    if "task" in fields:
        try:
            T.get_task(fields["task"])
        except XLNetError as e:
            raise XLNetError(f"{path}: {e}") from None
    return {**meta, **fields}


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_dataclass_arguments(parser, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    cfg = build_dataclass(FinetuneConfig, args.config, args)
    info, summary = TR.run_on_ranks(cfg.device, lambda info: finetune(cfg, info), timeout_s=EVAL_WAIT_S)
    if not info.is_main:
        return 0
    for split in ("dev", "test"):
        if summary.get(split):
            print(f"[{split}] " + format_table(summary[split]))
    print(f"best model: {summary['best']}; summary: {Path(cfg.out_dir) / 'summary.json'}")
    return 0
