"""`xlnet finetune`: fine-tune a pretrained XLNet (ours or an HF directory) on a task and score it.

Flow: task files -> features (xlnet.tasks) -> head model -> AdamW with layer-wise lr decay, warmup + linear decay
-> evaluation on dev after every epoch through the official scorer (xlnet.evaluate) -> best checkpoint kept ->
test scores (when the test split is labeled), predictions files, metrics.jsonl/TensorBoard and PNG curves.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from xlnet import tasks as T
from xlnet.cliconf import add_dataclass_arguments, build_dataclass
from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.evaluate import evaluate_predictions, format_table
from xlnet.fileio import atomic_write
from xlnet.heads import (
    XLNetForMultipleChoice,
    XLNetForQuestionAnswering,
    XLNetForSequenceClassification,
    XLNetForTokenClassification,
)
from xlnet.assets import default_tokenizer_dir, supersense_path
from xlnet.tokenizer import Tokenizer
from xlnet import training as TR

HEADS = {"classification": XLNetForSequenceClassification, "regression": XLNetForSequenceClassification,
         "race": XLNetForMultipleChoice, "squad": XLNetForQuestionAnswering, "tokens": XLNetForTokenClassification}
# Tensors that describe a row but are not model inputs.
NOT_INPUTS = ("window_index", "word_ids")


@dataclass
class FinetuneConfig:
    task: str = "supersense"
    model: str = ""  # pretrained directory (ours or HF); "" = random initialisation from `preset`
    preset: str = "tiny"  # model size when training from scratch
    data: str = ""  # directory with train/dev[/test] files; "" = the embedded WordNet supersense task
    tokenizer: str = ""  # "" = spiece.model in the model directory, else the embedded tokenizer
    out_dir: str = "runs/finetune"
    labels: str = ""  # comma-separated label set for generic classification data (default: from the data)
    max_seq_len: int = 128
    doc_stride: int = 128  # SQuAD
    max_query_len: int = 64  # SQuAD
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 3
    max_steps: int = 0  # 0 = run `epochs`
    lr: float = 5e-5
    layer_decay: float = 1.0  # layer l of L gets lr * layer_decay**(L - l) (paper: 0.75 for SQuAD)
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    adam_eps: float = 1e-6
    clip: float = 1.0
    dropout: float = 0.1
    max_train_examples: int = 0  # deterministic subsample (0 = all)
    max_eval_examples: int = 0
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    attn_impl: str = ""  # "" = the checkpoint's own setting
    quiet: bool = False


# ---------------------------------------------------------------------------------------------------------------
# data


def split_file(spec: T.TaskSpec, data_dir: Path, split: str) -> Path | None:
    """The file (or RACE folder) for a split, by the names the public releases use."""
    names = {"train": ["train"], "dev": ["dev", "valid", "validation", "dev_matched"], "test": ["test"]}[split]
    for name in names:
        candidates = [data_dir / name] if spec.fmt == "race" else sorted(data_dir.glob(f"{name}.*")) + sorted(
            data_dir.glob(f"{name}-v*.json"))
        for path in candidates:
            if path.exists() and not path.name.endswith(".txt.labels"):
                return path
    return None


def default_data_dir(spec: T.TaskSpec) -> Path:
    if spec.name != "supersense":
        raise XLNetError(f"task {spec.name!r} needs --data DIR (only 'supersense' ships with the package)")
    return Path(supersense_path("train")).parent


@dataclass
class Split:
    """One split's features (tensors, row-aligned) plus what turns model outputs into a predictions file."""

    name: str
    path: Path
    tensors: dict[str, Tensor]
    labeled: bool
    write_predictions: Callable[[dict[str, Tensor], Path], dict[str, Path]]


def subsample(items: list, limit: int, seed: int) -> list:
    if limit <= 0 or len(items) <= limit:
        return items
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(items), generator=g)[:limit].tolist())
    return [items[i] for i in keep]


def load_split(spec: T.TaskSpec, path: Path, tok: Tokenizer, cfg: FinetuneConfig, labels: list[str] | None,
               limit: int) -> Split:
    name = path.stem
    if spec.kind in ("classification", "regression"):
        examples = subsample(T.read_text_examples(spec, path, labels), limit, cfg.seed)
        tensors = T.featurize_text(examples, tok, spec, cfg.max_seq_len, labels)
        return Split(name, path, tensors, "labels" in tensors, lambda out, d: write_text(examples, spec, labels, out, d))
    if spec.kind == "race":
        examples = subsample(T.read_race(path), limit, cfg.seed)
        tensors = T.featurize_race(examples, tok, cfg.max_seq_len)
        return Split(name, path, tensors, "labels" in tensors, lambda out, d: write_race(examples, out, d))
    if spec.kind == "tokens":
        examples = subsample(T.read_conll(path), limit, cfg.seed)
        tensors = T.featurize_tokens(examples, tok, cfg.max_seq_len, labels)
        return Split(name, path, tensors, True, lambda out, d: write_conll(examples, labels or [], tensors, out, d))
    examples = subsample(T.read_squad(path), limit, cfg.seed)
    feats = T.featurize_squad(examples, tok, cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len)
    labeled = any(e.answers for e in examples) or spec.squad_version == 2
    return Split(name, path, feats.tensors, labeled, lambda out, d: write_squad(feats, out, d))


def write_text(examples: list, spec: T.TaskSpec, labels: list[str] | None, out: dict[str, Tensor],
               directory: Path) -> dict[str, Path]:
    logits = out["logits"]
    if spec.kind == "regression":
        preds: list[Any] = logits.squeeze(-1).tolist()
    else:
        names = labels or list(spec.labels or [])
        preds = [names[i] for i in logits.argmax(-1).tolist()]
    path = directory / "predictions.jsonl"
    with atomic_write(path, "w") as f:
        for e, p in zip(examples, preds):
            f.write(json.dumps({"id": e.id, "prediction": p}) + "\n")
    return {"predictions": path}


def write_race(examples: list, out: dict[str, Tensor], directory: Path) -> dict[str, Path]:
    path = directory / "predictions.json"
    answers = {e.id: "ABCD"[i] for e, i in zip(examples, out["logits"].argmax(-1).tolist())}
    with atomic_write(path, "w") as f:
        json.dump(answers, f, indent=1)
    return {"predictions": path}


def write_conll(examples: list, labels: list[str], tensors: dict[str, Tensor], out: dict[str, Tensor],
                directory: Path) -> dict[str, Path]:
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


def write_squad(feats: T.SquadFeatures, out: dict[str, Tensor], directory: Path) -> dict[str, Path]:
    preds, na = T.squad_predictions(feats, out["start_top_log_probs"], out["start_top_index"],
                                    out["end_top_log_probs"], out["end_top_index"], out["cls_logits"])
    paths = {"predictions": directory / "predictions.json", "na_probs": directory / "na_probs.json"}
    T.write_squad_predictions(preds, na, paths["predictions"], paths["na_probs"])
    return paths


# ---------------------------------------------------------------------------------------------------------------
# model, batches, evaluation


def build_model(cfg: FinetuneConfig, spec: T.TaskSpec, num_labels: int) -> nn.Module:
    head = HEADS[spec.kind]
    overrides: dict[str, Any] = dict(num_labels=num_labels, dropout=cfg.dropout, dropatt=cfg.dropout,
                                     summary_last_dropout=cfg.dropout, mem_len=0, reuse_len=0, bi_data=False)
    if cfg.attn_impl:
        overrides["attn_impl"] = cfg.attn_impl
    if cfg.model:
        return head.from_pretrained(cfg.model, verbose=not cfg.quiet, **overrides)
    return head(XLNetConfig.from_preset(cfg.preset, **overrides))


def load_tokenizer(cfg: FinetuneConfig) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.model and (Path(cfg.model) / "spiece.model").is_file():
        return Tokenizer.load(cfg.model)
    return Tokenizer.load(default_tokenizer_dir())


def batches(tensors: dict[str, Tensor], size: int, generator: torch.Generator | None = None):
    n = next(iter(tensors.values())).shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, size):
        idx = order[start : start + size]
        yield {k: v[idx] for k, v in tensors.items()}


def model_inputs(batch: dict[str, Tensor], device: torch.device, train: bool) -> dict[str, Tensor]:
    out = {k: v.to(device) for k, v in batch.items() if k not in NOT_INPUTS}
    if not train:  # the QA head decodes a beam only when no gold positions are given
        for key in ("labels", "start_positions", "end_positions", "is_impossible"):
            out.pop(key, None)
    return out


@torch.no_grad()
def predict(model: nn.Module, split: Split, cfg: FinetuneConfig, device: torch.device) -> dict[str, Tensor]:
    model.eval()
    keep = ("logits", "start_top_log_probs", "start_top_index", "end_top_log_probs", "end_top_index", "cls_logits")
    parts: dict[str, list[Tensor]] = {}
    for batch in batches(split.tensors, cfg.eval_batch_size):
        with TR.autocast(device, cfg.precision):
            out = model(**model_inputs(batch, device, train=False))
        for key in keep:
            value = getattr(out, key)
            if value is not None:
                parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
    model.train()
    return {k: torch.cat(v) for k, v in parts.items()}


def score(model: nn.Module, split: Split, spec: T.TaskSpec, cfg: FinetuneConfig, labels: list[str] | None,
          device: torch.device, directory: Path) -> dict[str, Any] | None:
    """Predict a split, write its predictions files and, when it is labeled, score them officially."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = split.write_predictions(predict(model, split, cfg, device), directory)
    if not split.labeled:
        return None
    if cfg.max_eval_examples and spec.kind != "classification" and spec.kind != "regression":
        return None  # the official scorers want every gold question answered
    gold = split.path
    if cfg.max_eval_examples and spec.kind in ("classification", "regression"):
        return subsampled_text_scores(spec, split, labels, paths["predictions"])
    return evaluate_predictions(spec.name, gold, paths["predictions"], paths.get("na_probs"), labels=labels)


def subsampled_text_scores(spec: T.TaskSpec, split: Split, labels: list[str] | None, preds: Path) -> dict[str, Any]:
    """Score a subsample through the official path: write the gold rows we kept as JSONL beside the predictions."""
    examples = {json.loads(line)["id"] for line in preds.read_text().splitlines()}
    gold_rows = [e for e in T.read_text_examples(spec, split.path, labels) if e.id in examples]
    gold = preds.with_name("gold.jsonl")
    with atomic_write(gold, "w") as f:
        for e in gold_rows:
            f.write(json.dumps({"id": e.id, "text": e.text_a, "label": e.label}) + "\n")
    generic = "regression" if spec.kind == "regression" else "classification"
    result = evaluate_predictions(generic, gold, preds, labels=labels or list(spec.labels or []) or None)
    return {**result, "task": spec.name}


# ---------------------------------------------------------------------------------------------------------------
# the loop


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    spec = T.get_task(cfg.task)
    data_dir = Path(cfg.data) if cfg.data else default_data_dir(spec)
    files = {s: split_file(spec, data_dir, s) for s in ("train", "dev", "test")}
    if files["train"] is None or files["dev"] is None:
        raise XLNetError(f"{data_dir}: needs a train and a dev file (train.* / dev.*)")
    out_dir = Path(cfg.out_dir)
    TR.set_seed(cfg.seed)
    device = TR.resolve_device(cfg.device)
    cfg.precision = TR.resolve_precision(cfg.precision, device)
    tok = load_tokenizer(cfg)

    labels = task_labels(spec, cfg, files["train"])
    train = load_split(spec, files["train"], tok, cfg, labels, cfg.max_train_examples)
    dev = load_split(spec, files["dev"], tok, cfg, labels, cfg.max_eval_examples)
    test = load_split(spec, files["test"], tok, cfg, labels, cfg.max_eval_examples) if files["test"] else None

    num_labels = 1 if spec.kind in ("regression", "race", "squad") else len(labels or [])
    model = build_model(cfg, spec, max(num_labels, 1)).to(device)
    if model.config.vocab_size < tok.vocab_size:
        raise XLNetError(f"tokenizer has {tok.vocab_size} pieces but the model only {model.config.vocab_size}")
    n_train = next(iter(train.tensors.values())).shape[0]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    groups = TR.layerwise_lr_groups(model, cfg.weight_decay, cfg.layer_decay, model.config.n_layer)
    optimizer = TR.build_optimizer(groups, cfg.lr, eps=cfg.adam_eps)
    scheduler = TR.build_scheduler(optimizer, int(cfg.warmup_frac * total), total)

    out_dir.mkdir(parents=True, exist_ok=True)
    logger = TR.MetricsLogger(out_dir)
    progress = TR.Progress(total, enabled=not cfg.quiet, desc=f"finetune {spec.name}")
    gen = torch.Generator().manual_seed(cfg.seed)
    best: dict[str, Any] | None = None
    step, start = 0, time.time()
    model.train()
    while step < total:
        for batch in batches(train.tensors, cfg.batch_size, gen):
            with TR.autocast(device, cfg.precision):
                loss = model(**model_inputs(batch, device, train=True)).loss
            if not torch.isfinite(loss):
                raise XLNetError(f"loss became {loss.item()} at step {step + 1}; lower --lr or check the data")
            loss.backward()
            TR.clip_grad_norm(model, cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logger.log("train", step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
            progress.update(loss=f"{loss.item():.4f}")
            if step % steps_per_epoch == 0 or step == total:
                best = evaluate_epoch(model, dev, spec, cfg, labels, device, out_dir, step, logger, progress, best)
            if step >= total:
                break
    progress.close()
    logger.close()
    return finish(cfg, spec, labels, dev, test, device, out_dir, best, step, time.time() - start)


def task_labels(spec: T.TaskSpec, cfg: FinetuneConfig, train_path: Path) -> list[str] | None:
    if spec.kind in ("regression", "squad"):
        return None
    if spec.kind == "race":
        return list(spec.labels or [])
    given = [s.strip() for s in cfg.labels.split(",") if s.strip()] or None
    if spec.kind == "tokens":
        return given or sorted({t for e in T.read_conll(train_path) for t in e.tags})
    return T.resolve_labels(spec, train_path, given) or list(spec.labels or []) or T.labels_from_examples(
        T.read_text_examples(spec, train_path))


def evaluate_epoch(model: nn.Module, dev: Split, spec: T.TaskSpec, cfg: FinetuneConfig, labels: list[str] | None,
                   device: torch.device, out_dir: Path, step: int, logger: TR.MetricsLogger, progress: TR.Progress,
                   best: dict[str, Any] | None) -> dict[str, Any] | None:
    result = score(model, dev, spec, cfg, labels, device, out_dir / "dev")
    if result is None:
        return best
    logger.log("valid", step, **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))})
    progress.write(f"step {step}: dev {result['main_metric']} = {result['main']:.4f}")
    if best is None or result["main"] > best["main"]:
        TR.unwrap(model).save_pretrained(out_dir / "best")
        best = {**result, "step": step}
    return best


def finish(cfg: FinetuneConfig, spec: T.TaskSpec, labels: list[str] | None, dev: Split, test: Split | None,
           device: torch.device, out_dir: Path, best: dict[str, Any] | None, steps: int, seconds: float) -> dict:
    summary: dict[str, Any] = {"task": spec.name, "steps": steps, "seconds": round(seconds, 1),
                               "config": asdict(cfg), "dev": best}
    if best is not None and test is not None:
        model = HEADS[spec.kind].from_pretrained(out_dir / "best", verbose=False).to(device)
        summary["test"] = score(model, test, spec, cfg, labels, device, out_dir / "test")
    with atomic_write(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    from xlnet.plots import plot_loss_curves

    rows = TR.read_metrics(out_dir / "metrics.jsonl")
    plot_loss_curves(rows, out_dir / "loss.png", title=f"fine-tuning {spec.name} (loss)")
    if best is not None:
        plot_loss_curves(rows, out_dir / "dev.png", title=f"fine-tuning {spec.name} (dev {best['main_metric']})",
                         key=best["main_metric"])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_dataclass_arguments(parser, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    cfg = build_dataclass(FinetuneConfig, args.config, args)
    summary = finetune(cfg)
    for split in ("dev", "test"):
        if summary.get(split):
            print(f"[{split}] " + format_table(summary[split]))
    print(f"best model: {Path(cfg.out_dir) / 'best'}; summary: {Path(cfg.out_dir) / 'summary.json'}")
    return 0
