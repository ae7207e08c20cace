"""Fine-tuning tasks: a registry, readers for the public file formats, and XLNet-layout featurization.

Every reader raises `XLNetError("<file>:<line>: ...")` for input a user can fix. Featurizers return dicts
of torch tensors in XLNet's layout `A <sep> B <sep> <cls>` with padding on the LEFT, so `<cls>` is always the
last position: token_type_ids A=0, B=1, <cls>=2, pad=3; attention_mask 1 = real token, 0 = padding.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from xlnet.errors import XLNetError
from xlnet.fileio import atomic_write, text_lines
from xlnet.tokenizer import build_inputs

IGNORE_INDEX = -100  # label of positions the loss must skip (PyTorch's cross-entropy default)


# ============================================================================ registry


@dataclasses.dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE TSV keeps its fields: column names for files with a header, indices for CoLA."""

    text_a: str | int
    label: str | int
    text_b: str | int | None = None
    header: bool = True


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "regression" | "squad" | "race" | "tokens"
    labels: tuple[str, ...] | None  # None: taken from the data, --labels, or labels.txt
    metrics: tuple[str, ...]
    main_metric: str
    fmt: str  # "glue" | "table" (CSV/JSONL) | "squad" | "race" | "conll"
    glue: GlueLayout | None = None
    squad_version: int | None = None
    description: str = ""
    dev_names: tuple[str, ...] = ("dev", "valid", "validation", "dev_matched")  # file stems tried for dev
    test_names: tuple[str, ...] = ("test",)  # file stems tried for test


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "classification", _BIN, ("mcc", "accuracy"), "mcc", "glue",
                 GlueLayout(text_a=3, label=1, header=False), description="GLUE CoLA (no header)"),
        TaskSpec("sst2", "classification", _BIN, ("accuracy",), "accuracy", "glue",
                 GlueLayout("sentence", "label"), description="GLUE SST-2"),
        TaskSpec("mrpc", "classification", _BIN, ("f1", "accuracy"), "f1", "glue",
                 GlueLayout("#1 String", "Quality", "#2 String"), description="GLUE MRPC"),
        TaskSpec("stsb", "regression", None, ("pearson", "spearman"), "pearson", "glue",
                 GlueLayout("sentence1", "score", "sentence2"), description="GLUE STS-B"),
        TaskSpec("qqp", "classification", _BIN, ("accuracy", "f1"), "accuracy", "glue",
                 GlueLayout("question1", "is_duplicate", "question2"), description="GLUE QQP"),
        TaskSpec("mnli", "classification", ("contradiction", "entailment", "neutral"), ("accuracy",), "accuracy",
                 "glue", GlueLayout("sentence1", "gold_label", "sentence2"), test_names=("test", "test_matched"),
                 description="GLUE MNLI, evaluated on dev_matched.tsv"),
        TaskSpec("mnli-mm", "classification", ("contradiction", "entailment", "neutral"), ("accuracy",), "accuracy",
                 "glue", GlueLayout("sentence1", "gold_label", "sentence2"), dev_names=("dev_mismatched",),
                 test_names=("test_mismatched",), description="GLUE MNLI, evaluated on dev_mismatched.tsv"),
        TaskSpec("qnli", "classification", _NLI2, ("accuracy",), "accuracy", "glue",
                 GlueLayout("question", "label", "sentence"), description="GLUE QNLI"),
        TaskSpec("rte", "classification", _NLI2, ("accuracy",), "accuracy", "glue",
                 GlueLayout("sentence1", "label", "sentence2"), description="GLUE RTE"),
        TaskSpec("wnli", "classification", _BIN, ("accuracy",), "accuracy", "glue",
                 GlueLayout("sentence1", "label", "sentence2"), description="GLUE WNLI"),
        TaskSpec("classification", "classification", None, ("accuracy", "f1_macro"), "accuracy", "table",
                 description="generic CSV/JSONL(.gz): text[,text_b],label"),
        TaskSpec("regression", "regression", None, ("pearson", "spearman"), "pearson", "table",
                 description="generic CSV/JSONL(.gz): text[,text_b],label (a number)"),
        TaskSpec("supersense", "classification", None, ("accuracy", "f1_macro"), "accuracy", "table",
                 description="WordNet supersense JSONL.gz with labels.txt beside it"),
        TaskSpec("squad1", "squad", None, ("exact_match", "f1"), "f1", "squad", squad_version=1,
                 description="SQuAD v1.1 JSON"),
        TaskSpec("squad2", "squad", None, ("exact", "f1", "best_exact", "best_f1"), "best_f1", "squad",
                 squad_version=2, description="SQuAD v2.0 JSON (unanswerable questions)"),
        TaskSpec("race", "race", ("A", "B", "C", "D"), ("accuracy", "middle", "high"), "accuracy", "race",
                 description="RACE directory (middle/ and high/ JSON files) or one file"),
        TaskSpec("conll", "tokens", None, ("f1", "precision", "recall"), "f1", "conll",
                 description="CoNLL token-per-line, BIO/IOB2 tags in the last column"),
    ]
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "squad": "squad1", "squad1.1": "squad1",
            "squad2.0": "squad2", "ner": "conll", "conll2003": "conll"}


def get_task(name: str) -> TaskSpec:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise XLNetError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[key]


# ============================================================================ file helpers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline)."""
    for n, line in text_lines(path):
        yield n, line.rstrip("\r\n")


def _json_error(path: Path, err: json.JSONDecodeError, line_offset: int = 0) -> XLNetError:
    return XLNetError(f"{path}:{err.lineno + line_offset}: bad JSON: {err.msg} (column {err.colno})")


def _load_json(path: Path) -> Any:
    text = "".join(line for _, line in text_lines(path))
    if not text.strip():
        raise XLNetError(f"{path}:1: empty file")
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None


def json_line(path: Path, n: int, line: str) -> Any:
    """One JSONL record, or an XLNetError naming file:line and the column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise XLNetError(f"{path}:{n}: bad JSON: {e.msg} (column {e.colno})") from None


def _line_of(text: str, needle: str) -> int:
    """Line of the first occurrence of `needle` in a JSON file's text (1 if absent): JSON parsers forget
    positions, and error messages must still point at a line."""
    pos = text.find(needle)
    return text.count("\n", 0, pos) + 1 if pos >= 0 else 1


# ============================================================================ text classification / regression


@dataclasses.dataclass
class TextExample:
    id: str
    text_a: str
    text_b: str | None
    label: str | float | None  # None in unlabeled (test) files
    where: str  # "file:line", for error messages further down the pipeline


def _parse_label(spec: TaskSpec, raw: str, where: str, labels: Sequence[str] | None) -> str | float:
    if spec.kind == "regression":
        try:
            value = float(raw)
        except ValueError:
            raise XLNetError(f"{where}: label {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise XLNetError(f"{where}: label {raw!r} is not finite")
        return value
    raw = str(raw).strip()
    allowed = labels if labels is not None else spec.labels
    if allowed is not None and raw not in allowed:
        raise XLNetError(f"{where}: unknown label {raw!r} (expected one of {', '.join(allowed)})")
    return raw


def read_glue(spec: TaskSpec, path: str | os.PathLike, read_labels: bool = True) -> list[TextExample]:
    """A GLUE train/dev/test TSV. Test files (no label column) give label=None, as does every row when not
    `read_labels` (a distillation transfer file). Ids are 0-based row numbers, which is what GLUE's `index`
    column is and what submission files use."""
    path = Path(path)
    layout = spec.glue
    assert layout is not None
    rows = list(_lines(path))
    if not rows or all(not line.strip() for _, line in rows):
        raise XLNetError(f"{path}:1: empty file")
    first = rows[0][1].split("\t")
    if layout.header or first[:2] == ["index", "sentence"]:  # CoLA's test.tsv is the one with a header
        names = first
        data = rows[1:]

        def col(name: str | int | None, required: bool) -> int | None:
            if name is None:
                return None
            if isinstance(name, int):  # CoLA's test.tsv: "index, sentence" and no label
                return names.index("sentence") if name == layout.text_a else None
            if name not in names:
                if required:
                    raise XLNetError(f"{path}:1: missing column {name!r} in header {names}")
                return None
            return names.index(name)

        ia, ib, il = col(layout.text_a, True), col(layout.text_b, True), col(layout.label, False)
        width = len(names)
    else:
        data = rows
        ia, ib, il = layout.text_a, layout.text_b, layout.label
        width = 4
    examples = []
    for n, line in data:
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}:{n}"
        if len(fields) != width:  # more: a tab inside a text field would shift or cut the fields after it
            raise XLNetError(f"{where}: expected {width} columns, got {len(fields)}")
        label = None if il is None or not read_labels else _parse_label(spec, fields[il], where, None)
        examples.append(TextExample(str(len(examples)), fields[ia], None if ib is None else fields[ib], label, where))
    if not examples:
        raise XLNetError(f"{path}:1: no examples")
    return examples


def _table_example(spec: TaskSpec, row: Mapping[str, Any], where: str, index: int,
                   labels: Sequence[str] | None, read_labels: bool = True) -> TextExample:
    text = row.get("text")
    if not isinstance(text, str):
        raise XLNetError(f"{where}: missing or non-string field 'text'")
    text_b = row.get("text_b")
    if text_b is not None and not isinstance(text_b, str):
        raise XLNetError(f"{where}: field 'text_b' must be a string")
    raw = row.get("label") if read_labels else None
    if raw is not None and not isinstance(raw, str):
        # a JSON number or boolean as its JSON text (true -> "true", not Python's "True"): predictions written
        # back then carry the file's own values
        raw = json.dumps(raw, ensure_ascii=False)
    label = None if raw is None or raw == "" else _parse_label(spec, raw, where, labels)
    rid = row.get("id")
    return TextExample(str(rid) if rid not in (None, "") else str(index), text, text_b or None, label, where)


def read_table(spec: TaskSpec, path: str | os.PathLike, labels: Sequence[str] | None = None,
               read_labels: bool = True) -> list[TextExample]:
    """Generic CSV (header with text[,text_b][,label][,id]) or JSONL objects with the same keys; .gz allowed.
    Not `read_labels`: every label is None, whatever the file holds (a distillation transfer file).

    Ids come from an `id` field when there is one, otherwise they are 0-based row numbers.
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    is_csv = bool(suffixes) and suffixes[-1] in (".csv", ".tsv")
    examples: list[TextExample] = []
    if is_csv:
        with contextlib.closing(text_lines(path)) as lines:
            reader = csv.reader((line for _, line in lines), delimiter="\t" if suffixes[-1] == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                raise XLNetError(f"{path}:1: empty file")
            if "text" not in header:
                raise XLNetError(f"{path}:1: missing column 'text' in header {header}")
            for fields in reader:
                where = f"{path}:{reader.line_num}"
                if not any(fields):
                    continue
                if len(fields) != len(header):
                    raise XLNetError(f"{where}: expected {len(header)} columns, got {len(fields)}")
                examples.append(_table_example(spec, dict(zip(header, fields)), where, len(examples), labels,
                                               read_labels))
    else:
        for n, line in _lines(path):
            if not line.strip():
                continue
            row = json_line(path, n, line)
            if not isinstance(row, dict):
                raise XLNetError(f"{path}:{n}: expected a JSON object per line")
            examples.append(_table_example(spec, row, f"{path}:{n}", len(examples), labels, read_labels))
    if not examples:
        raise XLNetError(f"{path}:1: empty file")
    return examples


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """One label per line (blank lines ignored); duplicates are an error because label ids must be unique."""
    path = Path(path)
    labels: list[str] = []
    for n, line in _lines(path):
        name = line.strip()
        if not name:
            continue
        if name in labels:
            raise XLNetError(f"{path}:{n}: duplicate label {name!r}")
        labels.append(name)
    if not labels:
        raise XLNetError(f"{path}:1: empty file")
    return labels


def resolve_labels(spec: TaskSpec, data_path: str | os.PathLike, given: Sequence[str] | None = None) -> list[str] | None:
    """Label list for a classification task: the registry's, else --labels, else labels.txt beside the
    data; None means "take the sorted set seen in the data" (see `labels_from_examples`)."""
    if spec.kind != "classification":
        return None
    if spec.labels is not None:
        return list(spec.labels)
    if given:
        return list(given)
    beside = Path(data_path).parent / "labels.txt"
    return read_labels_file(beside) if beside.is_file() else None


def labels_from_examples(examples: Sequence[TextExample]) -> list[str]:
    return sorted({str(e.label) for e in examples if e.label is not None})


def read_text_examples(spec: TaskSpec, path: str | os.PathLike, labels: Sequence[str] | None = None,
                       read_labels: bool = True) -> list[TextExample]:
    """A GLUE TSV or a generic CSV/JSONL file; not `read_labels`: the inputs alone, labels neither parsed nor
    checked (every label None)."""
    if spec.fmt == "glue":
        return read_glue(spec, path, read_labels)
    if spec.fmt == "table":
        return read_table(spec, path, resolve_labels(spec, path, labels) if read_labels else None, read_labels)
    raise XLNetError(f"task {spec.name!r} is not a text classification/regression task")


# ============================================================================ layout helpers


def layout(a: Sequence[int], b: Sequence[int] | None, max_len: int, pad: bool = True) -> dict[str, list[int]]:
    """`A <sep> [B <sep>] <cls>`, truncated longest-first to max_len and padded on the left (tokenizer.build_inputs,
    with room for at least one text token)."""
    if max_len <= (3 if b is not None else 2):
        raise XLNetError(f"max_seq_len {max_len} leaves no room for text")
    return build_inputs(a, b, max_len, pad)


def _stack(rows: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}


# ============================================================================ featurization: sequences


def featurize_text(examples: Sequence[TextExample], tok: Any, spec: TaskSpec, max_seq_len: int,
                   labels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Classification/regression features. `labels` fixes the label -> id order (default: registry or the
    sorted labels seen). "labels" is absent when any example is unlabeled (test files)."""
    if not examples:
        raise XLNetError("no examples to featurize")
    rows = [layout(tok.encode(e.text_a), None if e.text_b is None else tok.encode(e.text_b), max_seq_len)
            for e in examples]
    out = _stack(rows)
    if all(e.label is not None for e in examples):
        if spec.kind == "regression":
            out["labels"] = torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
        else:
            names = list(labels or spec.labels or labels_from_examples(examples))
            index = {name: i for i, name in enumerate(names)}
            for e in examples:
                if str(e.label) not in index:
                    raise XLNetError(f"{e.where}: unknown label {e.label!r} (expected one of {', '.join(names)})")
            out["labels"] = torch.tensor([index[str(e.label)] for e in examples], dtype=torch.long)
    return out


# ============================================================================ RACE


@dataclasses.dataclass
class RaceExample:
    id: str
    article: str
    question: str
    options: list[str]
    label: int | None  # 0..3, None when the file has no answers
    level: str  # "middle" | "high" | whatever directory it came from


def _race_files(root: Path) -> list[tuple[Path, str]]:
    if root.is_file():
        return [(root, root.parent.name)]
    if not root.is_dir():
        raise XLNetError(f"{root}: no such file or directory")
    levels = [d for d in (root / "middle", root / "high") if d.is_dir()]
    dirs = levels or [root]
    files = [(p, d.name) for d in dirs for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise XLNetError(f"{root}: no RACE files (expected middle/ and high/ folders of JSON files)")
    return files


def read_race(path: str | os.PathLike) -> list[RaceExample]:
    """RACE: one JSON object per file with "article", "questions", "options" (4 per question) and, except in
    unlabeled copies, "answers" ("A".."D"). `path` is a split folder (with middle/ and high/) or one file.
    Question ids are "<level>-<file stem>-<question index>", e.g. "high-1234-0"."""
    examples = []
    for file, level in _race_files(Path(path)):
        data, text = _load_json(file)
        if not isinstance(data, dict):
            raise XLNetError(f"{file}:1: expected a JSON object")
        for key in ("article", "questions", "options"):
            if key not in data:
                raise XLNetError(f"{file}:1: missing key {key!r}")
        questions, options, answers = data["questions"], data["options"], data.get("answers")
        options_line = _line_of(text, '"options"')
        if len(options) != len(questions) or (answers is not None and len(answers) != len(questions)):
            raise XLNetError(f"{file}:{options_line}: {len(questions)} questions but "
                             f"{len(options)} option lists and {len(answers or [])} answers")
        for i, question in enumerate(questions):
            opts = options[i]
            if not isinstance(opts, list) or len(opts) != 4:
                raise XLNetError(f"{file}:{options_line}: question {i} needs 4 options")
            label = None
            if answers is not None:
                if answers[i] not in ("A", "B", "C", "D"):
                    answers_line = _line_of(text, '"answers"')
                    raise XLNetError(f"{file}:{answers_line}: answer {answers[i]!r} of question "
                                     f"{i} is not one of A, B, C, D")
                label = ord(answers[i]) - ord("A")
            examples.append(RaceExample(f"{level}-{file.stem}-{i}", data["article"], question, list(opts), label, level))
    return examples


def race_qa_text(question: str, option: str) -> str:
    """Cloze questions put the option into the blank ("_"); others are followed by the option (run_race.py)."""
    return question.replace("_", option) if "_" in question else f"{question} {option}"


def featurize_race(examples: Sequence[RaceExample], tok: Any, max_seq_len: int = 512,
                   max_qa_len: int = 128) -> dict[str, torch.Tensor]:
    """Per option: `article <sep> question+option <sep> <cls>`; the question+option keeps its LAST
    max_qa_len tokens and the article is cut at the end to fit, as in the original run_race.py.
    Tensors are [N, 4, max_seq_len]; "labels" [N] when every example has an answer."""
    if not examples:
        raise XLNetError("no examples to featurize")
    if max_seq_len <= max_qa_len + 3:
        raise XLNetError(f"max_seq_len {max_seq_len} must exceed max_qa_len {max_qa_len} + 3")
    per_example = []
    for e in examples:
        article = tok.encode(e.article)
        rows = []
        for option in e.options:
            qa = tok.encode(race_qa_text(e.question, option))[-max_qa_len:]
            rows.append(layout(article[: max_seq_len - 3 - len(qa)], qa, max_seq_len))
        per_example.append({k: [r[k] for r in rows] for k in rows[0]})
    out = _stack(per_example)
    if all(e.label is not None for e in examples):
        out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return out


# ============================================================================ CoNLL


@dataclasses.dataclass
class TokenExample:
    id: str
    words: list[str]
    tags: list[str]
    where: str  # file:line of the sentence's first token


def read_conll(path: str | os.PathLike, tag_column: int = -1) -> list[TokenExample]:
    """CoNLL: one token per line, space/tab separated columns, the tag in `tag_column` (default: last),
    sentences separated by blank lines; -DOCSTART- lines are skipped. Ids are 0-based sentence numbers."""
    path = Path(path)
    examples: list[TokenExample] = []
    words: list[str] = []
    tags: list[str] = []
    start = 0
    width = None

    def flush() -> None:
        if words:
            examples.append(TokenExample(str(len(examples)), list(words), list(tags), f"{path}:{start}"))
            words.clear()
            tags.clear()

    for n, line in _lines(path):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if len(fields) < 2:
            raise XLNetError(f"{path}:{n}: expected a token and a tag, got {len(fields)} column")
        if width is not None and len(fields) != width:
            raise XLNetError(f"{path}:{n}: expected {width} columns, got {len(fields)}")
        width = len(fields)
        try:
            tag = fields[tag_column]
        except IndexError:
            raise XLNetError(f"{path}:{n}: no column {tag_column}") from None
        if not words:
            start = n
        words.append(fields[0])
        tags.append(tag)
    flush()
    if not examples:
        raise XLNetError(f"{path}:1: empty file")
    return examples


def featurize_tokens(examples: Sequence[TokenExample], tok: Any, max_seq_len: int,
                     labels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Sub-word features for tagging: `words <sep> <cls>`. Only the first piece of each word carries its
    tag id; other pieces, specials and padding get -100. "word_ids" gives the word index of each
    first piece (-1 elsewhere) so predictions map back to words; words cut off by max_seq_len are lost."""
    names = list(labels) if labels is not None else sorted({t for e in examples for t in e.tags})
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for e in examples:
        text, spans, pos = [], [], 0
        for w in e.words:  # rebuild the sentence so every word has a known character span
            spans.append((pos, pos + len(w)))
            text.append(w)
            pos += len(w) + 1
        ids, offsets = tok.encode_with_offsets(" ".join(text))
        ids, offsets = ids[: max_seq_len - 2], offsets[: max_seq_len - 2]
        word_of = _first_pieces(offsets, spans)
        row = layout(ids, None, max_seq_len)
        n_pad = max_seq_len - len(ids) - 2
        lab = [IGNORE_INDEX] * max_seq_len
        wid = [-1] * max_seq_len
        for k, w in enumerate(word_of):
            if w >= 0:
                tag = e.tags[w]
                if tag not in index:
                    raise XLNetError(f"{e.where}: unknown tag {tag!r} (expected one of {', '.join(names)})")
                lab[n_pad + k] = index[tag]
                wid[n_pad + k] = w
        row["labels"], row["word_ids"] = lab, wid
        rows.append(row)
    return _stack(rows)


def _first_pieces(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, the index of the word it starts (first overlapping token of that word), else -1."""
    out = []
    seen: set[int] = set()
    w = 0
    for s, e in offsets:
        while w < len(spans) and spans[w][1] <= s:
            w += 1
        hit = w if w < len(spans) and spans[w][0] < e and e > s else -1
        if hit >= 0 and hit not in seen:
            seen.add(hit)
            out.append(hit)
        else:
            out.append(-1)
    return out


# ============================================================================ SQuAD


@dataclasses.dataclass
class SquadExample:
    qid: str
    question: str
    context: str
    answers: list[dict]  # [{"text", "answer_start"}]; empty for unanswerable questions
    is_impossible: bool
    where: str


def load_squad(path: str | os.PathLike) -> tuple[list[dict], str]:
    """The `data` list of a SQuAD JSON file, and the file's text (for locating lines in errors)."""
    path = Path(path)
    data, text = _load_json(path)
    paragraphs_key, context_key, qas_key = '"paragraphs"', '"context"', '"qas"'  # keys to locate in the raw text
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise XLNetError(f"{path}:1: not a SQuAD file (expected an object with a 'data' list)")
    for article in data["data"]:
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise XLNetError(f"{path}:{_line_of(text, paragraphs_key)}: article without a 'paragraphs' list")
        for para in article["paragraphs"]:
            if "context" not in para or not isinstance(para.get("qas"), list):
                raise XLNetError(f"{path}:{_line_of(text, context_key)}: paragraph needs 'context' and 'qas'")
            for qa in para["qas"]:
                if "id" not in qa or "question" not in qa:
                    raise XLNetError(f"{path}:{_line_of(text, qas_key)}: question without 'id' or 'question'")
    return data["data"], text


def read_squad(path: str | os.PathLike) -> list[SquadExample]:
    """SQuAD 1.1/2.0 examples; every answer must occur in the context at its answer_start."""
    path = Path(path)
    data, text = load_squad(path)
    examples = []
    for article in data:
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                where = f"{path}:{_line_of(text, json.dumps(qa['id']))}"
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else list(qa.get("answers", []))
                for a in answers:
                    _check_answer(context, a, qa["id"], where)
                examples.append(SquadExample(str(qa["id"]), qa["question"], context, answers, impossible, where))
    if not examples:
        raise XLNetError(f"{path}:1: no questions")
    return examples


def _check_answer(context: str, answer: Any, qid: str, where: str) -> None:
    if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
        raise XLNetError(f"{where}: answer of question {qid!r} needs 'text' and 'answer_start'")
    start, ans = answer["answer_start"], answer["text"]
    found = context[start : start + len(ans)] if isinstance(start, int) and start >= 0 else None
    # Compare with whitespace squeezed: a few public files differ from their contexts only in spacing.
    if found is None or " ".join(found.split()) != " ".join(ans.split()) or not ans.strip():
        raise XLNetError(f"{where}: answer {ans!r} of question {qid!r} is not in the context at answer_start {start}")


@dataclasses.dataclass
class SquadWindow:
    """What decoding needs to know about one window of one question."""

    example_index: int
    qid: str
    token_to_char: dict[int, tuple[int, int]]  # sequence position -> (start, end) in the context (paragraph only)
    max_context: dict[int, bool]  # sequence position -> this window is the best one for that token
    cls_index: int


@dataclasses.dataclass
class SquadFeatures:
    examples: list[SquadExample]
    windows: list[SquadWindow]  # windows[i] describes row i of every tensor
    tensors: dict[str, torch.Tensor]


def _char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """First and last token overlapping context[start:end], or None if no token does."""
    hits = [k for k, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return (hits[0], hits[-1]) if hits else None


def _doc_windows(n_tokens: int, max_doc: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) windows over the context tokens, each starting `stride` after the previous."""
    if stride <= 0:
        raise XLNetError(f"doc_stride must be positive, got {stride}")
    spans = []
    start = 0
    while True:
        length = min(n_tokens - start, max_doc)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, stride)


def _is_max_context(spans: Sequence[tuple[int, int]], index: int, token: int) -> bool:
    """A token appearing in several windows is "owned" by the one where it has most context on both
    sides (min of left/right context, ties broken towards longer windows), as in the original."""
    best, best_score = None, None
    for i, (s, n) in enumerate(spans):
        if not s <= token < s + n:
            continue
        score = min(token - s, s + n - 1 - token) + 0.01 * n
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best == index


def featurize_squad(examples: Sequence[SquadExample], tok: Any, max_seq_len: int = 512, doc_stride: int = 128,
                    max_query_len: int = 64) -> SquadFeatures:
    """Windows in XLNet's QA layout `paragraph <sep> question <sep> <cls>` (paragraph FIRST, as the original
    run_squad.py), left-padded so <cls> is the last position. Tensors: input_ids, token_type_ids,
    attention_mask, p_mask (float, 1 = cannot be in the answer: question, separators, padding), cls_index,
    start_positions/end_positions (the <cls> index when unanswerable or the answer is outside the window),
    is_impossible (float), window_index."""
    windows: list[SquadWindow] = []
    rows: list[dict[str, Any]] = []
    for ei, ex in enumerate(examples):
        for row, window in _example_windows(ei, ex, tok, max_seq_len, doc_stride, max_query_len):
            rows.append({**row, "window_index": len(windows)})
            windows.append(window)
    if not rows:
        raise XLNetError("no SQuAD examples to featurize")
    floats = ("p_mask", "is_impossible")
    tensors = {k: torch.tensor([r[k] for r in rows], dtype=torch.float32 if k in floats else torch.long)
               for k in rows[0]}
    return SquadFeatures(list(examples), windows, tensors)


def _example_windows(ei: int, ex: SquadExample, tok: Any, max_seq_len: int, doc_stride: int,
                     max_query_len: int) -> list[tuple[dict[str, Any], SquadWindow]]:
    """One question's windows over its context: each window's tensor row and what decoding needs of it."""
    q_ids = tok.encode(ex.question)[:max_query_len]
    c_ids, c_off = tok.encode_with_offsets(ex.context)
    max_doc = max_seq_len - len(q_ids) - 3
    if max_doc <= 0:
        raise XLNetError(f"max_seq_len {max_seq_len} leaves no room for the context after a "
                         f"{len(q_ids)}-token question")
    answer = None
    if ex.answers and not ex.is_impossible:
        a = ex.answers[0]
        answer = _char_span_to_tokens(c_off, a["answer_start"], a["answer_start"] + len(a["text"]))
        if answer is None:
            raise XLNetError(f"{ex.where}: answer {a['text']!r} of question {ex.qid!r} covers no token")
    spans = _doc_windows(len(c_ids), max_doc, doc_stride)
    out = []
    for wi, (ds, dn) in enumerate(spans):
        row = _window_row(c_ids[ds : ds + dn], q_ids, max_seq_len)
        n_pad = max_seq_len - (dn + len(q_ids) + 3)
        if answer is not None and ds <= answer[0] and answer[1] < ds + dn:  # else the <cls> index: no answer here
            row.update(start_positions=n_pad + answer[0] - ds, end_positions=n_pad + answer[1] - ds,
                       is_impossible=0.0)
        out.append((row, SquadWindow(
            example_index=ei, qid=ex.qid,
            token_to_char={n_pad + k: tuple(c_off[ds + k]) for k in range(dn)},
            max_context={n_pad + k: _is_max_context(spans, wi, ds + k) for k in range(dn)},
            cls_index=max_seq_len - 1,
        )))
    return out


def _window_row(para: list[int], q_ids: list[int], max_seq_len: int) -> dict[str, Any]:
    """The left-padded `paragraph <sep> question <sep> <cls>` row (`layout`; the window fits by construction),
    marked unanswerable (answer at <cls>)."""
    row: dict[str, Any] = layout(para, q_ids, max_seq_len)
    n_pad = max_seq_len - (len(para) + len(q_ids) + 3)
    cls_index = max_seq_len - 1
    return {**row, "p_mask": [1] * n_pad + [0] * len(para) + [1] * (len(q_ids) + 2) + [0],
            "cls_index": cls_index, "start_positions": cls_index, "end_positions": cls_index, "is_impossible": 1.0}


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)


def squad_predictions(features: SquadFeatures, start_top_log_probs: Any, start_top_index: Any,
                      end_top_log_probs: Any, end_top_index: Any, cls_logits: Any, n_best: int = 5,
                      max_answer_len: int = 64, end_layout: str = "hf") -> tuple[dict[str, str], dict[str, float]]:
    """Answers from the beam outputs of an XLNet SQuAD head, one row per window (in `features.windows` order).

    end_top_* are [W, start_n_top * end_n_top]. end_layout="hf": the flattening Hugging Face's
    XLNetForQuestionAnswering really returns (top-k over a [slen, start_n_top] tensor, so end candidate j of
    start i sits at j * start_n_top + i); "tf": the original TF code's i * end_n_top + j.
    Candidates must lie in the paragraph (its last token included: the original's `>= paragraph_len - 1` test,
    which HF copied, drops it by an off-by-one), start in a window that owns that token, end >= start and span at
    most max_answer_len tokens; they are ranked by start + end log-prob over all windows of a question
    (the *_log_probs inputs may be log-probabilities or, as HF returns them, probabilities).
    Like the original, the best span is always predicted and the no-answer score is the minimum answer-class
    logit over windows; it is returned as a probability (sigmoid), which keeps the official script's
    threshold search unchanged and makes its default threshold of 1.0 mean "never abstain".
    """
    if end_layout not in ("hf", "tf"):
        raise ValueError(f"end_layout must be 'hf' or 'tf', got {end_layout!r}")
    s_lp, s_ix = _as_numpy(start_top_log_probs), _as_numpy(start_top_index)
    e_lp, e_ix = _as_numpy(end_top_log_probs), _as_numpy(end_top_index)
    cls = _as_numpy(cls_logits).reshape(-1)
    n_windows = len(features.windows)
    for name, arr in (("start_top_log_probs", s_lp), ("start_top_index", s_ix), ("end_top_log_probs", e_lp),
                      ("end_top_index", e_ix), ("cls_logits", cls)):
        if arr.shape[0] != n_windows:
            raise XLNetError(f"{name} has {arr.shape[0]} rows for {n_windows} windows")
    start_n = s_ix.shape[1]
    end_n = e_ix.shape[1] // start_n
    # HF (and our heads.py) return softmax probabilities under the name "log probs"; the original returned
    # log-probabilities. Ranking must add log-probs either way, so probabilities (any value > 0) are logged.
    if (s_lp > 0).any() or (e_lp > 0).any():
        s_lp = np.log(np.clip(s_lp.astype(np.float64), 1e-30, None))
        e_lp = np.log(np.clip(e_lp.astype(np.float64), 1e-30, None))
    candidates: dict[int, list[tuple[float, int, int, int]]] = {}
    null_logit: dict[int, float] = {}
    for w, win in enumerate(features.windows):
        ei = win.example_index
        null_logit[ei] = min(null_logit.get(ei, math.inf), float(cls[w]))
        found = candidates.setdefault(ei, [])
        for i in range(start_n):
            for j in range(end_n):
                flat = j * start_n + i if end_layout == "hf" else i * end_n + j
                start, end = int(s_ix[w, i]), int(e_ix[w, flat])
                if _valid_span(win, start, end, max_answer_len):
                    found.append((float(s_lp[w, i]) + float(e_lp[w, flat]), w, start, end))
    predictions: dict[str, str] = {}
    na_probs: dict[str, float] = {}
    for ei, ex in enumerate(features.examples):
        if ei not in null_logit:
            continue
        ranked = sorted(candidates[ei], key=lambda c: c[0], reverse=True)[: max(n_best, 1)]
        text = ""
        if ranked:
            _, w, start, end = ranked[0]
            spans = features.windows[w].token_to_char
            text = ex.context[spans[start][0] : spans[end][1]].strip()
        predictions[ex.qid] = text
        na_probs[ex.qid] = 1.0 / (1.0 + math.exp(-null_logit[ei])) if null_logit[ei] > -700 else 0.0
    return predictions, na_probs


def _valid_span(win: SquadWindow, start: int, end: int, max_answer_len: int) -> bool:
    """A span inside the window's paragraph, starting at a token this window owns, at most max_answer_len long."""
    return (start in win.token_to_char and end in win.token_to_char and win.max_context.get(start, False)
            and start <= end < start + max_answer_len)


def write_squad_predictions(predictions: Mapping[str, str], na_probs: Mapping[str, float] | None,
                            predictions_path: str | os.PathLike, na_probs_path: str | os.PathLike | None = None) -> None:
    """{qid: answer} and {qid: no-answer probability} JSON, the official scorer's input formats."""
    with atomic_write(predictions_path, "w") as f:
        json.dump(dict(predictions), f, indent=2, ensure_ascii=False)
        f.write("\n")
    if na_probs is not None and na_probs_path is not None:
        with atomic_write(na_probs_path, "w") as f:
            json.dump(dict(na_probs), f, indent=2)
            f.write("\n")
