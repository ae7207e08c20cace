"""`xlnet distill`: compress a fine-tuned XLNet into a shallower student with Patient Knowledge Distillation.

PKD (Sun et al. 2019, "Patient Knowledge Distillation for BERT Model Compression"): the student, initialised from
the first M layers of a checkpoint, learns

    (1 - alpha) * CE(gold labels) + alpha * T^2 * KL(teacher || student at temperature T)
    + beta * sum over matched layers of || h_s / |h_s| - h_t / |h_t| ||^2

where h are the summary token's (`<cls>`, XLNet's last position) states after the student's layers 1..M-1 and
the teacher's layers they are matched to: PKD-skip takes every (N/M)-th teacher layer, PKD-last the teacher's
last M-1 layers below its top (the top layers meet through the soft labels). `--pkd none` is plain knowledge
distillation (Hinton et al. 2015); `--alpha 0 --pkd none` fine-tunes the shallow model on the labels alone, the
baseline a distilled student must beat. The T^2 factor keeps the soft term's gradients at the scale of the hard
term's as T changes (Hinton et al.). Every fine-tuning head distills: classification and multiple choice (soft
labels over the classes / choices), regression (squared error to the teacher's prediction), tagging (soft labels
per labeled token) and SQuAD (soft start, end-given-the-gold-start and answerability distributions).

`--transfer FILE` (classification and regression) adds inputs without labels, Hinton's transfer set: on those
rows the student learns only from the teacher (soft labels, patient term); the hard term averages over the
labeled rows of each batch. An epoch then passes over both.

The teacher is a directory written by `xlnet finetune` (its finetune.json fixes the task, labels and lengths,
so the student sees the same features). The run writes what `xlnet finetune` writes (best/, dev/, test/,
summary.json with a "distill" entry, metrics.jsonl with the loss terms, curves) and prints the teacher and the
student side by side: layers, parameters, dev/test scores and dev-set inference time.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlnet import finetune as FT
from xlnet import tasks as T
from xlnet import training as TR
from xlnet.checkpoint import BODY, load_into, load_model, normalize_keys, read_weights
from xlnet.cliconf import add_dataclass_arguments, build_dataclass
from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.model import XLNetOutput

KINDS = ("classification", "regression", "race", "tokens", "squad")
IGNORE = T.IGNORE_INDEX  # tagging labels of positions that are not a word's first piece; transfer rows' labels
TRANSFER_KINDS = ("classification", "regression")  # heads whose examples are single rows read without labels
# what a run writes into --out-dir, deleted before training (finetune.clear_outputs): fine-tuning's and the teacher's
# predictions
OUTPUTS = (*FT.RUN_OUTPUTS, "teacher/dev", "teacher/test")


@dataclass
class DistillConfig(FT.FinetuneConfig):
    task: str = ""  # "" = the teacher's (finetune.json)
    out_dir: str = "runs/distill"
    teacher: str = ""  # a fine-tuned directory (`xlnet finetune`'s best/)
    student_layers: int = 0  # 0 = half the teacher's layers, rounded up
    # where the student's embeddings and first layers come from: "teacher" (its fine-tuned weights, head included),
    # a pretrained directory (ours or HF; the head starts fresh) or "random"
    student_init: str = "teacher"
    pkd: Literal["skip", "last", "none"] = "skip"  # which teacher layers the intermediate <cls> states learn from
    alpha: float = 0.5  # weight of the soft-label term against the gold-label cross-entropy
    temperature: float = 10.0  # softens both distributions in the soft-label term
    beta: float = 100.0  # weight of the patient (intermediate <cls> state) term
    # a file in the task's format whose inputs the student also learns from the teacher on, without labels (any in
    # it are ignored; inputs identical to a training example's are dropped): classification and regression tasks
    transfer: str = ""
    max_transfer_examples: int = 0  # deterministic subsample of the transfer file (0 = all)


# Fine-tuning options that `xlnet distill` decides itself (the student's source is --student-init, the label set
# and the lengths the teacher's).
NOT_FLAGS = ("model", "preset", "random_init", "labels")


def layer_pairs(n_teacher: int, n_student: int, pkd: str) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 1-based, for the student's layers below its top."""
    if pkd == "none":
        return []
    if pkd == "skip":
        return [(j, round(j * n_teacher / n_student)) for j in range(1, n_student)]
    return [(j, n_teacher - n_student + j) for j in range(1, n_student)]


def soft_label_loss(student: Tensor, teacher: Tensor, kind: str, temperature: float,
                    keep: Tensor | None = None) -> Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over rows (tagging: over the labeled tokens);
    regression: the squared error to the teacher's prediction."""
    if kind == "regression":
        return F.mse_loss(student.float(), teacher.float())
    student, teacher = student.float().flatten(0, -2), teacher.float().flatten(0, -2)
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher / temperature, dim=-1)
    if keep is None:
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2
    # a mean over the kept rows as masked sums: indexing by a mask would wait for the device to count them
    per_row = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_row, keep.flatten()) * temperature**2


def squad_soft_loss(student: XLNetOutput, teacher: XLNetOutput, temperature: float) -> Tensor:
    """The soft-label term of the SQuAD head, weighted as its hard loss weights its terms: the start distribution
    and the end distribution (both models conditioned on the same gold start) at half weight each, plus half the
    answerability term (SQuAD 2.0), a Bernoulli(sigmoid(logit)) written as the two-way softmax over [0, logit]."""
    def two_way(logit: Tensor) -> Tensor:
        return torch.stack([torch.zeros_like(logit), logit], dim=-1)

    loss = sum(soft_label_loss(getattr(student, k), getattr(teacher, k), "classification", temperature)
               for k in ("start_logits", "end_logits")) / 2
    if student.cls_logits is not None:
        loss = loss + 0.5 * soft_label_loss(two_way(student.cls_logits), two_way(teacher.cls_logits),
                                            "classification", temperature)
    return loss


def labeled_rows(labels: Tensor, kind: str) -> Tensor:
    """Rows (tagging: tokens) with a gold label: transfer rows carry IGNORE (classification) or NaN (regression),
    tagging IGNORE at the pieces that do not start a word."""
    return labels.isfinite() if kind == "regression" else labels != IGNORE


def hard_label_loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """The head's own loss (cross-entropy, or squared error for regression) averaged over the labeled rows only;
    0 for a batch of transfer rows alone."""
    known = labeled_rows(labels, kind)
    logits = logits.float()
    if kind == "regression":  # (transfer rows' NaN labels replaced first: NaN times 0 is NaN)
        per_row = (logits.squeeze(-1) - labels.float().where(known, 0.0)).pow(2)
    else:
        per_row = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return masked_mean(per_row, known.flatten())


def masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """The mean of `values` where `keep`, without a host sync (no mask indexing, no .any()); 0 where nothing is
    kept, with the graph whole (DDP's reducer needs every gradient)."""
    return (values * keep).sum() / keep.sum().clamp(min=1)


def patient_loss(student_states: list[Tensor], teacher_states: list[Tensor],
                 pairs: list[tuple[int, int]]) -> Tensor:
    """Sum over the pairs of the mean (over rows) squared distance between the unit-length <cls> states."""
    terms = [(F.normalize(student_states[s][:, -1].float(), dim=-1)
              - F.normalize(teacher_states[t][:, -1].float(), dim=-1)).pow(2).sum(-1).mean() for s, t in pairs]
    return torch.stack(terms).sum()


@dataclass
class Distiller:
    """The step loss (finetune.StepLoss): the teacher runs in eval mode without gradients on the same batch."""

    teacher: nn.Module
    kind: str
    pairs: list[tuple[int, int]]
    alpha: float
    temperature: float
    beta: float

    def __call__(self, student: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        states = bool(self.pairs)
        # SQuAD's teacher needs its labels (the end logits are conditioned on the gold start); the others' would only
        # make it compute a loss nobody reads
        teacher_inputs = inputs if self.kind == "squad" else {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            t = self.teacher(**teacher_inputs, output_hidden_states=states)
        if self.kind in TRANSFER_KINDS:  # batches may mix in unlabeled transfer rows: the hard term skips them
            s = student(**teacher_inputs, output_hidden_states=states)
            hard = hard_label_loss(s.logits, inputs["labels"], self.kind)
        else:
            s = student(**inputs, output_hidden_states=states)
            hard = s.loss
        if self.kind == "squad":
            soft = squad_soft_loss(s, t, self.temperature)
        else:
            keep = labeled_rows(inputs["labels"], self.kind) if self.kind == "tokens" else None
            soft = soft_label_loss(s.logits, t.logits, self.kind, self.temperature, keep)
        loss = (1 - self.alpha) * hard + self.alpha * soft
        parts = {"ce": hard.detach(), "soft": soft.detach()}
        if states:
            patient = patient_loss(s.hidden_states, t.hidden_states, self.pairs)
            loss = loss + self.beta * patient
            parts["patient"] = patient.detach()
        return loss, parts


# ---------------------------------------------------------------------------------------------------------------
# teacher and student


def load_teacher(cfg: DistillConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned teacher (eval mode, frozen) and its finetune.json (for another fine-tuned directory, a
    Hugging Face one say: the --task given)."""
    if not cfg.teacher:
        raise XLNetError("distill needs --teacher DIR (a directory written by `xlnet finetune`, e.g. runs/x/best)")
    directory = Path(cfg.teacher)
    overrides: dict[str, Any] = dict(mem_len=0, reuse_len=0, bi_data=False)
    if cfg.attn_impl:
        overrides["attn_impl"] = cfg.attn_impl
    teacher = load_model(directory, verbose=False, **overrides)
    meta = FT.read_meta(directory) or ({"task": cfg.task} if cfg.task else {})
    if not meta:
        raise XLNetError(f"{directory}: no {FT.META_FILE} (not written by `xlnet finetune`); pass --task and, "
                         "unless they are the task's defaults, the lengths it was fine-tuned with")
    teacher.eval().requires_grad_(False)
    return teacher, meta


def resolve_config(cfg: DistillConfig, meta: dict[str, Any], n_teacher: int) -> tuple[DistillConfig, T.TaskSpec]:
    """The teacher's task and lengths (unless given), the student's depth, and checks of the PKD settings."""
    given = [f"--{k.replace('_', '-')}" for k in ("model", "random_init", "labels") if getattr(cfg, k)]
    if given:
        raise XLNetError(f"distill takes no {', '.join(given)}: the teacher fixes the labels and "
                         "--student-init says where the student's layers come from")
    task = cfg.task or meta["task"]
    if task != meta["task"]:
        raise XLNetError(f"--task {cfg.task} but the teacher {cfg.teacher} was fine-tuned on {meta['task']}")
    spec = T.get_task(task)
    if spec.kind not in KINDS:
        raise XLNetError(f"distill supports {', '.join(KINDS)} tasks; {task} is {spec.kind}")
    lengths = {k: meta[k] for k in FT.META_FIELDS if k != "task" and k in meta and getattr(cfg, k) == 0}
    layers = cfg.student_layers or math.ceil(n_teacher / 2)
    cfg = dataclasses.replace(cfg, task=task, student_layers=layers, **lengths)
    checks = [(1 <= layers <= n_teacher, f"student_layers must be in [1, {n_teacher}] (the teacher's), got {layers}"),
              (0 <= cfg.alpha <= 1, f"alpha must be in [0, 1], got {cfg.alpha}"),
              (cfg.temperature > 0, f"temperature must be positive, got {cfg.temperature}"),
              (cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}"),
              (not cfg.transfer or spec.kind in TRANSFER_KINDS,
               f"--transfer works for {' and '.join(TRANSFER_KINDS)} tasks; {task} is {spec.kind}"),
              (not cfg.transfer or cfg.alpha > 0 or (cfg.beta > 0 and cfg.pkd != "none"),
               "--transfer rows have no labels, so they teach nothing at alpha 0 without the patient term")]
    for ok, message in checks:
        if not ok:
            raise XLNetError(f"invalid DistillConfig: {message}")
    return FT.resolve_config(cfg, spec), spec  # type: ignore[return-value]


def build_student(teacher: nn.Module, cfg: DistillConfig) -> nn.Module:
    """The teacher's head class and config cut to student_layers, initialised per cfg.student_init."""
    config = XLNetConfig(**{**teacher.config.to_dict(), "n_layer": cfg.student_layers, "dropout": cfg.dropout,
                            "dropatt": cfg.dropout, "summary_last_dropout": cfg.dropout})
    student = type(teacher)(config)
    if cfg.student_init == "random":
        return student
    source = Path(cfg.teacher if cfg.student_init == "teacher" else cfg.student_init)
    if not source.is_dir():
        raise XLNetError(f"--student-init {cfg.student_init}: not 'teacher', 'random' or a model directory")
    check_same_width(XLNetConfig.load(source), config, source)
    fresh = load_first_layers(student, source)
    if fresh and not cfg.quiet:
        print(f"note: the student's {', '.join(sorted(fresh))} start fresh ({source} has no such tensors)",
              file=sys.stderr)
    return student


WIDTH_FIELDS = ("vocab_size", "d_model", "n_head", "d_head", "d_inner")


def check_same_width(source: XLNetConfig, student: XLNetConfig, where: Path) -> None:
    """The student has the teacher's width; a --student-init of another width cannot fill its layers."""
    differ = [f"{k} {getattr(source, k)} (the teacher's {getattr(student, k)})" for k in WIDTH_FIELDS
              if getattr(source, k) != getattr(student, k)]
    if differ:
        raise XLNetError(f"--student-init {where}: another width than the teacher's, whose shape the student takes: "
                         f"{', '.join(differ)}")


def load_first_layers(student: nn.Module, source: Path) -> list[str]:
    """Copy the embeddings, the first n_layer layers and any matching head tensors of `source` into `student`;
    returns the head tensors left at their fresh initialisation."""
    weights, path = read_weights(source)
    weights = normalize_keys(weights, student)
    depth = student.config.n_layer
    prefix = BODY + "layer."
    kept = {k: v for k, v in weights.items() if not k.startswith(prefix) or int(k[len(prefix):].split(".")[0]) < depth}
    return load_into(student, kept, path)


def add_transfer(train: FT.Split, spec: T.TaskSpec, cfg: DistillConfig, tok: Any,
                 labels: list[str] | None) -> tuple[FT.Split, int]:
    """The training split with the transfer file's inputs appended as unlabeled rows; returns it and how many
    rows were added (inputs that tokenize to a training row's are dropped, then the rest subsampled)."""
    path = Path(cfg.transfer)
    # inputs only: any labels in the file are neither parsed nor checked
    examples = T.read_text_examples(spec, path, labels, read_labels=False)
    seen = {tuple(row) for row in train.tensors["input_ids"].tolist()}
    features = T.featurize_text(examples, tok, spec, cfg.max_seq_len, labels)
    fresh = [i for i, row in enumerate(features["input_ids"].tolist()) if tuple(row) not in seen]
    keep = torch.tensor(FT.subsample(fresh, cfg.max_transfer_examples, FT.sample_seed(cfg)), dtype=torch.long)
    if not len(keep):
        raise XLNetError(f"{path}: no transfer example left (each is identical to a training example)")
    rows = {k: v[keep] for k, v in features.items()}
    gold = train.tensors["labels"]
    rows["labels"] = torch.full((len(keep),), math.nan if gold.is_floating_point() else IGNORE, dtype=gold.dtype)
    tensors = {k: torch.cat([v, rows[k]]) for k, v in train.tensors.items()}
    ids = train.ids + [f"transfer:{examples[i].id}" for i in keep.tolist()]
    return dataclasses.replace(train, tensors=tensors, ids=ids), len(keep)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


def inference_seconds(model: nn.Module, split: FT.Split, cfg: DistillConfig, device: torch.device) -> float:
    """Wall time of one prediction pass over `split` (the trained architecture's cost, not its weights')."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    FT.predict(model, split, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# the run


def distill(cfg: DistillConfig, info: TR.DistInfo | None = None) -> dict[str, Any]:
    """Distill and compare; returns the summary (under torchrun: rank 0's, as `finetune.finetune`)."""
    info = info or TR.init_distributed(cfg.device)
    teacher, meta = load_teacher(cfg)
    cfg, spec = resolve_config(cfg, meta, teacher.config.n_layer)
    files = FT.data_files(spec, cfg.data)
    init_dir = cfg.student_init if cfg.student_init not in ("teacher", "random") else ""
    FT.check_outputs(Path(cfg.out_dir), {"--teacher": cfg.teacher, "--student-init": init_dir,
                                         "--tokenizer": cfg.tokenizer, "--data": cfg.data,
                                         "--transfer": cfg.transfer}, OUTPUTS)
    TR.set_seed(cfg.seed)
    device = info.device
    cfg = dataclasses.replace(cfg, precision=TR.resolve_precision(cfg.precision, device),
                              tokenizer=cfg.tokenizer or cfg.teacher)
    labels = meta.get("labels") or teacher.config.label_names or (list(spec.labels) if spec.labels else None)
    tok = FT.load_tokenizer(cfg)
    FT.check_vocab(teacher, tok, cfg)
    student = build_student(teacher, cfg)
    teacher, student = teacher.to(device), student.to(device)
    train, dev, test = FT.load_splits(spec, files, tok, cfg, labels)
    n_transfer = 0
    if cfg.transfer:
        labeled = train.rows
        train, n_transfer = add_transfer(train, spec, cfg, tok, labels)
        if not cfg.quiet and info.is_main:
            print(f"training on {labeled:,} labeled examples and {n_transfer:,} transfer examples from "
                  f"{cfg.transfer}", file=sys.stderr)

    out_dir = Path(cfg.out_dir)
    student_meta = FT.model_meta(spec, cfg, labels)
    pairs = layer_pairs(teacher.config.n_layer, cfg.student_layers, cfg.pkd)
    step_loss = Distiller(teacher, spec.kind, pairs, cfg.alpha, cfg.temperature, cfg.beta)
    start = time.time()
    with FT.run_in(out_dir, info.is_main, OUTPUTS):
        best, steps = FT.train_loop(student, train, dev, spec, cfg, labels, device, out_dir,
                                    lambda m: FT.save_model_dir(m, out_dir / "best", tok, student_meta),
                                    step_loss, "distill", info)
        if not info.is_main:
            return {"rank": info.rank, "steps": steps}
        seconds = time.time() - start
        report = {"teacher": str(cfg.teacher), "layer_pairs": pairs, "transfer_examples": n_transfer,
                  "teacher_dev": FT.score(teacher, dev, spec, cfg, labels, device, out_dir / "teacher" / "dev"),
                  "teacher_test": test and FT.score(teacher, test, spec, cfg, labels, device,
                                                    out_dir / "teacher" / "test"),
                  "layers": {"teacher": teacher.config.n_layer, "student": cfg.student_layers},
                  "parameters": {"teacher": count_parameters(teacher), "student": count_parameters(student)},
                  "dev_inference_seconds": {"teacher": inference_seconds(teacher, dev, cfg, device),
                                            "student": inference_seconds(student, dev, cfg, device)}}
        return FT.finish(cfg, spec, labels, test, device, out_dir, best, steps, seconds, what="distillation",
                         extra={"distill": report})


def comparison_table(summary: dict[str, Any]) -> str:
    """Teacher and student side by side: depth, size, main metric on dev/test, dev inference time."""
    d = summary["distill"]
    metric = d["teacher_dev"]["main_metric"]

    def main(result: dict[str, Any] | None) -> str:
        return "-" if not result else f"{result['main']:.4f}"

    cfg = summary["config"]
    name = "student, " + (f"PKD-{cfg['pkd']}" if cfg["pkd"] != "none" else "KD" if cfg["alpha"] > 0 else "labels only")
    name += " + transfer" if cfg.get("transfer") else ""
    rows = [("teacher", "teacher", d["teacher_dev"], d["teacher_test"]),
            (name, "student", summary["dev"], summary["test"])]
    seconds = d["dev_inference_seconds"]
    lines = [f"{'model':<30} {'layers':>6} {'params':>10} {'dev ' + metric:>14} {'test ' + metric:>14} "
             f"{'dev inference':>14}"]
    for label, who, dev, test in rows:
        speed = "" if who == "teacher" else f" ({seconds['teacher'] / seconds['student']:.1f}x)"
        lines.append(f"{label:<30} {d['layers'][who]:>6} {d['parameters'][who]:>10,} {main(dev):>14} "
                     f"{main(test):>14} {seconds[who]:>8.2f} s{speed}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the options below")
    add_dataclass_arguments(parser, DistillConfig, skip=NOT_FLAGS)


def run(args: argparse.Namespace) -> int:
    cfg = build_dataclass(DistillConfig, args.config, args)
    info, summary = TR.run_on_ranks(cfg.device, lambda info: distill(cfg, info), timeout_s=FT.EVAL_WAIT_S)
    if not info.is_main:
        return 0
    print(comparison_table(summary))
    print(f"best student: {summary['best']}; summary: {Path(cfg.out_dir) / 'summary.json'}")
    return 0
