"""`xlnet evaluate`: score a predictions file, or a fine-tuned model directory, against gold data with the
official metrics.

  xlnet evaluate --task T --data GOLD --predictions PRED [--na-probs NA]
  xlnet evaluate --task T --data FILE --model DIR [--out OUT]   (predicts FILE with DIR, writes the predictions
                                                                  into OUT, then scores them as above)

Prediction file formats (ids as defined by the gold reader in xlnet.tasks):
  classification / regression (GLUE, CSV, JSONL, supersense):
    * TSV with a header `index<TAB>prediction` (GLUE's submission format; `id` is accepted for `index`), or
    * JSONL, one {"id": ..., "prediction": ...} per line, or
    * JSON object {id: prediction}.
    Ids are 0-based row numbers of the gold file, or its `id` field for CSV/JSONL data that has one.
    Predictions are label strings ("entailment", "1") or numbers for regression.
  squad1 / squad2: the official {qid: answer text} JSON; --na-probs {qid: probability} enables best_*.
  race: JSON {question id: "A".."D"}, ids "<level>-<file stem>-<question index>" (e.g. "high-123-0").
  conll: a CoNLL file with the same tokens and sentences as the gold file; predicted tag in the last column.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from xlnet import metrics as M
from xlnet import tasks as T
from xlnet.errors import XLNetError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(sorted(T.TASKS))}")
    parser.add_argument("--data", required=True, help="gold file (RACE: a split folder or one file)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="predictions file (formats below)")
    source.add_argument("--model", help="fine-tuned model directory (e.g. runs/finetune/best) to predict with")
    parser.add_argument("--na-probs", default=None, help="SQuAD 2.0: {qid: no-answer probability} JSON")
    parser.add_argument("--out", default=None, help="--model: folder for the predictions (default: "
                                                    "<model>-eval-<data file stem> beside the model)")
    parser.add_argument("--device", default="auto", help="--model: cpu, cuda, cuda:1 ... (default auto)")
    parser.add_argument("--batch-size", type=int, default=64, help="--model: rows per forward pass")
    parser.add_argument("--labels", nargs="+", default=None, help="label set for generic classification data")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        result = evaluate_predictions(args.task, args.data, args.predictions, args.na_probs, labels=args.labels)
    else:
        if args.na_probs is not None:
            raise XLNetError("--na-probs goes with --predictions (with --model the no-answer scores are predicted)")
        from xlnet.finetune import evaluate_model  # torch and the model: only for this mode

        model = Path(args.model)
        stem = Path(args.data).name.split(".")[0]
        out = Path(args.out) if args.out else model.with_name(f"{model.name}-eval-{stem}")
        result = evaluate_model(args.task, model, args.data, out, labels=args.labels, device=args.device,
                                batch_size=args.batch_size)
        print(f"predictions: {out}", file=sys.stderr)
        if result is None:
            note = f"{args.data} has no labels: predictions written to {out}, nothing to score"
            print(json.dumps({"predictions": str(out), "scores": None, "note": note}) if args.json else note)
            return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def format_table(result: Mapping[str, Any]) -> str:
    """Two-column text table; the main metric is marked with '*'."""
    rows = [(("* " if k == result["main_metric"] else "  ") + k, _fmt(v)) for k, v in result["metrics"].items()]
    width = max(len(r[0]) for r in rows)
    head = f"task {result['task']}  ({result['n']} examples, * = main metric)"
    return "\n".join([head] + [f"{name:<{width}}  {value}" for name, value in rows])


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def evaluate_predictions(task: str, gold_path: str | os.PathLike, pred_path: str | os.PathLike,
                         na_probs_path: str | os.PathLike | None = None,
                         labels: Sequence[str] | None = None, ids: Collection[str] | None = None) -> dict[str, Any]:
    """Score predictions; returns {"task", "n", "main_metric", "main", "metrics": {name: value}}.

    `ids` restricts the gold file to those examples (question ids for SQuAD/RACE, sentence numbers for CoNLL),
    for predictions of a subsample; None scores every gold example.
    Raises XLNetError (file:line) for malformed gold or prediction files and for missing/unknown ids.
    """
    spec = T.get_task(task)
    if na_probs_path is not None and spec.squad_version != 2:
        raise XLNetError(f"--na-probs is for SQuAD 2.0 (--task squad2), not {spec.name}")
    keep = None if ids is None else {str(i) for i in ids}
    if spec.kind in ("classification", "regression"):
        n, scores = _eval_text(spec, Path(gold_path), Path(pred_path), labels, keep)
    elif spec.kind == "squad":
        n, scores = _eval_squad(spec, Path(gold_path), Path(pred_path), na_probs_path, keep)
    elif spec.kind == "race":
        n, scores = _eval_race(Path(gold_path), Path(pred_path), keep)
    else:
        n, scores = _eval_conll(Path(gold_path), Path(pred_path), keep)
    main = spec.main_metric if spec.main_metric in scores else next(iter(scores))
    return {"task": spec.name, "n": n, "main_metric": main, "main": scores[main], "metrics": scores}


# ---------------------------------------------------------------------------- prediction readers


def _read_json_object(path: Path) -> dict[str, Any]:
    data, _ = T._load_json(path)
    if not isinstance(data, dict):
        raise XLNetError(f"{path}:1: expected a JSON object {{id: prediction}}")
    return {str(k): v for k, v in data.items()}


def read_id_predictions(path: Path) -> dict[str, tuple[Any, str]]:
    """{id: (prediction, "file:line")} from a TSV (index/id + prediction header), JSONL or JSON file."""
    name = path.name.lower().removesuffix(".gz")
    out: dict[str, tuple[Any, str]] = {}
    if name.endswith(".json"):
        return {k: (v, f"{path}:1") for k, v in _read_json_object(path).items()}
    rows = list(T._lines(path))
    if not any(line.strip() for _, line in rows):
        raise XLNetError(f"{path}:1: empty file")
    if name.endswith(".jsonl"):
        for n, line in rows:
            if not line.strip():
                continue
            obj = T.json_line(path, n, line)
            key = "id" if isinstance(obj, dict) and "id" in obj else "index"
            if not isinstance(obj, dict) or key not in obj or "prediction" not in obj:
                raise XLNetError(f"{path}:{n}: expected {{\"id\": ..., \"prediction\": ...}}")
            _put(out, str(obj[key]), obj["prediction"], f"{path}:{n}")
        return out
    header = rows[0][1].split("\t")
    if len(header) != 2 or header[0] not in ("index", "id") or header[1] != "prediction":
        raise XLNetError(f"{path}:1: expected the header 'index<TAB>prediction', got {rows[0][1]!r}")
    for n, line in rows[1:]:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise XLNetError(f"{path}:{n}: expected 2 columns, got {len(fields)}")
        _put(out, fields[0], fields[1], f"{path}:{n}")
    return out


def _put(out: dict[str, tuple[Any, str]], key: str, value: Any, where: str) -> None:
    if key in out:
        raise XLNetError(f"{where}: duplicate prediction for id {key!r} (first at {out[key][1]})")
    out[key] = (value, where)


def _as_label(value: Any, names: Collection[str] = ()) -> str:
    """1, 1.0 and "1" are the same class: prediction files written by different tools disagree on types. A JSON
    number or boolean whose JSON text is one of `names` is that label (JSONL gold labels are read as their JSON
    text: true -> "true", 1.0 -> "1.0")."""
    if not isinstance(value, str) and json.dumps(value) in names:
        return json.dumps(value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------------------- per kind


def _kept(examples: list, keep: set[str] | None, key: str = "id") -> list:
    return examples if keep is None else [e for e in examples if getattr(e, key) in keep]


def _eval_text(spec: T.TaskSpec, gold: Path, pred: Path, labels: Sequence[str] | None,
               keep: set[str] | None) -> tuple[int, dict]:
    examples = _kept(T.read_text_examples(spec, gold, labels), keep)
    unlabeled = next((e for e in examples if e.label is None), None)
    if unlabeled is not None:
        raise XLNetError(f"{unlabeled.where}: no gold label (is this a test file?)")
    preds = read_id_predictions(pred)
    gold_ids = {e.id for e in examples}
    for key, (_, where) in preds.items():
        if key not in gold_ids:
            raise XLNetError(f"{where}: id {key!r} is not in {gold}")
    known = {str(x) for x in (labels or spec.labels or ())}  # generic tasks without --labels: not checked
    names = known or {str(e.label) for e in examples}
    y_true, y_pred = [], []
    for e in examples:
        if e.id not in preds:
            raise XLNetError(f"{e.where}: no prediction for id {e.id!r} in {pred}")
        value, where = preds[e.id]
        if spec.kind == "regression":
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise XLNetError(f"{where}: prediction {value!r} is not a number") from None
            if not math.isfinite(number):
                raise XLNetError(f"{where}: prediction {value!r} is not finite")
            y_pred.append(number)
            y_true.append(float(e.label))
        else:
            label = _as_label(value, names)
            if known and label not in known:
                raise XLNetError(f"{where}: predicted label {label!r} is not one of {', '.join(sorted(known))}")
            y_pred.append(label)
            y_true.append(str(e.label))
    scores: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            scores[name] = M.accuracy(y_pred, y_true)
        elif name == "f1":
            scores[name] = M.f1_binary(y_pred, y_true, positive="1")
        elif name == "f1_macro":
            scores[name] = M.f1_macro(y_pred, y_true)
        elif name == "mcc":
            scores[name] = M.matthews_corrcoef(y_pred, y_true)
        elif name == "pearson":
            scores[name] = M.pearson(y_pred, y_true)
        elif name == "spearman":
            scores[name] = M.spearman(y_pred, y_true)
    return len(examples), scores


def _eval_squad(spec: T.TaskSpec, gold: Path, pred: Path, na_path: str | os.PathLike | None,
                keep: set[str] | None) -> tuple[int, dict]:
    data, _ = T.load_squad(gold)
    examples = _kept(T.read_squad(gold), keep, "qid")  # also validates answer spans with file:line messages
    if keep is not None:
        data = _squad_subset(data, keep)
    preds = _read_json_object(pred)
    for qid, text in preds.items():
        if not isinstance(text, str):
            raise XLNetError(f"{pred}:1: prediction for {qid!r} is not a string")
    na = None
    if na_path is not None:
        na = {}
        for qid, p in _read_json_object(Path(na_path)).items():
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p):
                raise XLNetError(f"{na_path}:1: no-answer probability for {qid!r} is not a finite number")
            na[qid] = float(p)
        missing = next((e.qid for e in examples if e.qid not in na), None)
        if missing is not None:  # (the official script fails on it too)
            raise XLNetError(f"{na_path}: no no-answer probability for question {missing!r}")
    if spec.squad_version == 1:
        no_answer = next((e for e in examples if not e.answers), None)
        if no_answer is not None:  # v1.1 has no "no answer"; the v1 formula is undefined there
            raise XLNetError(f"{no_answer.where}: question {no_answer.qid!r} has no answer; use --task squad2")
        scores = M.squad_v1_scores(data, preds)
    else:
        scores = M.squad_v2_scores(data, preds, na)
    return int(scores["total"]), scores


def _squad_subset(data: list[dict], keep: set[str]) -> list[dict]:
    """The articles/paragraphs/qas structure with only the kept questions (what the official metric walks)."""
    return [{**article, "paragraphs": [{**para, "qas": [qa for qa in para["qas"] if str(qa["id"]) in keep]}
                                       for para in article["paragraphs"]]} for article in data]


def _eval_race(gold: Path, pred: Path, keep: set[str] | None) -> tuple[int, dict]:
    examples = _kept(T.read_race(gold), keep)
    gold_map = {}
    for e in examples:
        if e.label is None:
            raise XLNetError(f"{gold}: question {e.id} has no answer")
        gold_map[e.id] = ("ABCD"[e.label], e.level)
    preds = _read_json_object(pred)
    unknown = next((k for k in preds if k not in gold_map), None)
    if unknown is not None:
        raise XLNetError(f"{pred}:1: id {unknown!r} is not a question in {gold}")
    scores = M.race_accuracy({k: str(v) for k, v in preds.items()}, gold_map)
    return len(examples), scores


def _eval_conll(gold: Path, pred: Path, keep: set[str] | None) -> tuple[int, dict]:
    g = _kept(T.read_conll(gold), keep)
    p = T.read_conll(pred)
    if len(g) != len(p):
        raise XLNetError(f"{pred}:1: {len(p)} sentences, but {gold} has {len(g)}")
    for ge, pe in zip(g, p):
        if ge.words != pe.words:
            raise XLNetError(f"{pe.where}: tokens differ from the gold sentence at {ge.where}")
    scores = M.conll_f1([e.tags for e in g], [e.tags for e in p])
    return len(g), scores
