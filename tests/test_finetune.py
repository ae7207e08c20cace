"""`xlnet finetune` end to end on small files in the public formats, with a 2-layer × 32 model.

The model is a randomly initialised XLNetLMHeadModel saved with the embedded tokenizer beside it, so every run
also checks that a pretrained LM directory loads into each task head.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_same_finetune_run, record_scalar_reads, two_processes
from xlnet import tasks as T
from xlnet import training as TR
from xlnet.assets import default_tokenizer_dir
from xlnet.checkpoint import load_model
from xlnet.cli import main
from xlnet.cliconf import build_dataclass
from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.evaluate import evaluate_predictions
from xlnet.finetune import (HEADS, FinetuneConfig, build_model, build_optimizer, evaluate_model, finetune,
                             read_meta, resolve_config)
from xlnet.model import XLNetLMHeadModel
from xlnet.tokenizer import CLS_ID

TINY = dict(vocab_size=8000, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64)
WORDS = ("river stone quiet bright garden window simple morning yellow music paper letter silver winter "
         "market forest little ocean gentle north").split()
NAMES = ["Anna", "Peter", "Maria", "John", "Clara", "David"]
CITIES = ["Paris", "Berlin", "Madrid", "Vienna", "Prague", "Dublin"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: extra intra-op threads only contend (10x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lm")
    XLNetLMHeadModel(XLNetConfig(**TINY)).save_pretrained(d)
    for name in ("spiece.model", "tokenizer.json"):
        shutil.copyfile(default_tokenizer_dir() / name, d / name)
    return d


def cfg_for(lm_dir: Path, tmp_path: Path, task: str, data: Path, **kw) -> FinetuneConfig:
    base = dict(task=task, model=str(lm_dir), data=str(data), out_dir=str(tmp_path / "out"), max_seq_len=32,
                epochs=1, batch_size=16, lr=1e-3, quiet=True, device="cpu", seed=0)
    return FinetuneConfig(**{**base, **kw})


def sentence(rng: random.Random, n: int = 5) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ fixture files


def glue_sst2(d: Path, n_train: int = 32, n_dev: int = 16) -> Path:
    rng = random.Random(1)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = [f"{sentence(rng)}\t{i % 2}" for i in range(n)]
        write(d / f"{split}.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    write(d / "test.tsv", "index\tsentence\n" + "".join(f"{i}\t{sentence(rng)}\n" for i in range(6)))
    return d


def glue_stsb(d: Path) -> Path:
    rng = random.Random(2)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for split, n in (("train", 32), ("dev", 12)):
        rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{sentence(rng)}\t{sentence(rng)}\t"
                f"{rng.uniform(0, 5):.3f}" for i in range(n)]
        write(d / f"{split}.tsv", head + "\n".join(rows) + "\n")
    return d


def glue_mnli(d: Path) -> Path:
    rng = random.Random(3)
    labels = ["entailment", "neutral", "contradiction"]
    parses = "( x )\t( y )\t(ROOT x)\t(ROOT y)"
    train_head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                  "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    rows = [f"{i}\t{i}\t{i}e\tfiction\t{parses}\t{sentence(rng)}\t{sentence(rng)}\t{labels[i % 3]}\t{labels[i % 3]}"
            for i in range(30)]
    write(d / "train.tsv", train_head + "\n".join(rows) + "\n")
    dev_head = train_head.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")
    for name in ("dev_matched", "dev_mismatched"):
        rows = [f"{i}\t{i}\t{i}e\tfiction\t{parses}\t{sentence(rng)}\t{sentence(rng)}\t"
                + "\t".join([labels[i % 3]] * 6) for i in range(12)]
        write(d / f"{name}.tsv", dev_head + "\n".join(rows) + "\n")
    test_head = "\t".join(train_head.split("\t")[:10]) + "\n"  # GLUE's test files: no label columns
    for name, n in (("test_matched", 5), ("test_mismatched", 7)):
        rows = [f"{i}\t{i}\t{i}e\tfiction\t{parses}\t{sentence(rng)}\t{sentence(rng)}" for i in range(n)]
        write(d / f"{name}.tsv", test_head + "\n".join(rows) + "\n")
    return d


def table_rows(n: int, seed: int, keyword: str | None = None) -> list[dict]:
    """Rows for generic classification; with `keyword`, label = whether the text contains it (learnable)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = sentence(rng, 6)
        if keyword is None:
            label = ["pos", "neg", "mixed"][i % 3]
        else:
            has = i % 2 == 0
            words = text.split()
            if has:
                words[rng.randrange(len(words))] = keyword
            text, label = " ".join(words), "yes" if has else "no"
        rows.append({"id": f"r{seed}-{i}", "text": text, "label": label})
    return rows


def csv_data(d: Path) -> Path:
    for split, n, seed in (("train", 30, 4), ("dev", 12, 5)):
        lines = ["text,label"] + [f'"{r["text"]}, indeed",{r["label"]}' for r in table_rows(n, seed)]
        write(d / f"{split}.csv", "\n".join(lines) + "\n")
    return d


def jsonl_data(d: Path, keyword: str | None = None, n_train: int = 30, n_dev: int = 12) -> Path:
    for split, n, seed in (("train", n_train, 6), ("dev", n_dev, 7)):
        rows = table_rows(n, seed, keyword)
        write(d / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return d


def squad2(d: Path, bad_answer: bool = False, version: int = 2) -> Path:
    """SQuAD JSON; version 1: the answerable questions only, as v1.1 files."""
    for split, n in (("train", 12), ("dev", 8)):
        paragraphs = []
        for i in range(n):
            name, city = NAMES[i % len(NAMES)], CITIES[(i * 5) % len(CITIES)]
            context = f"{name} was born in {city} and later wrote about the {WORDS[i % len(WORDS)]} river there."
            start = context.index(city) + (3 if bad_answer and split == "train" and i == 2 else 0)
            qas = [{"id": f"{split}-{i}-a", "question": f"Where was {name} born?", "is_impossible": False,
                    "answers": [{"text": city, "answer_start": start}]},
                   {"id": f"{split}-{i}-b", "question": f"When did {name} die?", "is_impossible": True,
                    "answers": [], "plausible_answers": [{"text": city, "answer_start": context.index(city)}]}]
            if version == 1:
                for qa in qas[:1]:
                    del qa["is_impossible"]
                qas = qas[:1]
            paragraphs.append({"context": context, "qas": qas})
        tag = "v2.0" if version == 2 else "v1.1"
        data = {"version": tag, "data": [{"title": "People", "paragraphs": paragraphs}]}
        write(d / f"{split}-{tag}.json", json.dumps(data, indent=1))
    return d


def race(d: Path) -> Path:
    rng = random.Random(8)
    for split, n in (("train", 4), ("dev", 2)):
        for level in ("middle", "high"):
            for k in range(n):
                article = " ".join(sentence(rng, 8) + "." for _ in range(3))
                questions = [f"What is the {rng.choice(WORDS)}?", "The writer thinks that _ ."]
                options = [[sentence(rng, 2) for _ in range(4)] for _ in questions]
                answers = [rng.choice("ABCD") for _ in questions]
                write(d / split / level / f"{k + 1}.txt", json.dumps(
                    {"answers": answers, "options": options, "questions": questions, "article": article,
                     "id": f"{level}{k + 1}.txt"}))
    return d


def conll(d: Path) -> Path:
    rng = random.Random(9)
    for split, n in (("train", 20), ("dev", 8)):
        sents = ["-DOCSTART- -X- -X- O\n"]
        for _ in range(n):
            first, last = rng.choice(NAMES), rng.choice(NAMES)
            toks = [(first, "NNP", "B-NP", "B-PER"), (last, "NNP", "I-NP", "I-PER"), ("visited", "VBD", "B-VP", "O"),
                    (rng.choice(CITIES), "NNP", "B-NP", "B-LOC"), (".", ".", "O", "O")]
            sents.append("".join(" ".join(t) + "\n" for t in toks))
        write(d / f"{split}.txt", "\n".join(sents))
    return d


# ------------------------------------------------------------------------------------------ every task kind


CASES = {  # task -> (fixture writer, predictions file, extra config)
    "sst2": (glue_sst2, "predictions.tsv", {}),
    "stsb": (glue_stsb, "predictions.tsv", {}),
    "mnli": (glue_mnli, "predictions.tsv", {}),
    "mnli-mm": (glue_mnli, "predictions.tsv", {}),
    "classification-csv": (csv_data, "predictions.jsonl", {}),
    "classification-jsonl": (jsonl_data, "predictions.jsonl", {}),
    "squad2": (squad2, "predictions.json", dict(max_seq_len=48, max_query_len=12, doc_stride=8,
                                                max_eval_examples=5)),
    "squad1": (lambda d: squad2(d, version=1), "predictions.json", dict(max_seq_len=48, max_query_len=12,
                                                                        doc_stride=8)),
    "race": (race, "predictions.json", dict(max_seq_len=40, max_query_len=12)),
    "conll": (conll, "predictions.conll", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_task_end_to_end(case, lm_dir, tmp_path):
    make, pred_name, extra = CASES[case]
    task = case if case in T.TASKS else case.split("-")[0]
    data = make(tmp_path / "data")
    summary = finetune(cfg_for(lm_dir, tmp_path, task, data, **extra))
    spec = T.get_task(task)
    out = tmp_path / "out"

    dev = summary["dev"]
    assert dev["main_metric"] == spec.main_metric and spec.main_metric in dev["metrics"]
    assert dev["step"] == summary["steps"] >= 1
    model = load_model(out / "best", verbose=False)
    assert isinstance(model, HEADS[spec.kind]) and model.config.d_model == 32
    assert {"spiece.model", "tokenizer.json", "finetune.json"} <= {p.name for p in (out / "best").iterdir()}
    # the kept predictions are the best epoch's and rescore to the summary through the official scorer
    pred = out / "dev" / pred_name
    na = out / "dev" / "na_probs.json" if spec.squad_version == 2 else None
    assert (out / "dev" / "na_probs.json").exists() == (spec.squad_version == 2)  # v1.1: no unanswerable ones
    ids = None
    if extra.get("max_eval_examples"):
        ids = json.loads(pred.read_text()).keys()
        assert dev["n"] == extra["max_eval_examples"]
    again = evaluate_predictions(task, Path(summary["config"]["data"]) / dev_name(spec, data), pred, na, ids=ids)
    assert again["metrics"] == dev["metrics"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" and "loss" in r for r in rows)
    assert any(r["split"] == "valid" for r in rows)
    assert (out / "loss.png").stat().st_size > 0 and (out / "dev.png").is_file()
    assert json.loads((out / "summary.json").read_text())["dev"]["main"] == dev["main"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch or temp directories left
    if task == "sst2":  # GLUE's test.tsv has no labels: predicted in the submission format, not scored
        assert summary["test"] is None
        lines = (out / "test" / "predictions.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 7 and lines[1].split("\t")[1] in ("0", "1")
    if spec.name.startswith("mnli"):  # GLUE's test_matched.tsv / test_mismatched.tsv: predicted, not scored
        lines = (out / "test" / "predictions.tsv").read_text().splitlines()
        assert summary["test"] is None and len(lines) == 1 + (5 if task == "mnli" else 7)

    # `xlnet evaluate --model best/` featurizes and predicts through the same code: same scores on dev
    gold = Path(summary["config"]["data"]) / dev_name(spec, data)
    result = evaluate_model(task, out / "best", gold, tmp_path / "eval", device="cpu")
    if ids is None:
        assert result["metrics"] == dev["metrics"]
        assert (tmp_path / "eval" / pred_name).read_text() == pred.read_text()
    else:  # the model scores the whole file, training only a subsample
        assert result["n"] > dev["n"]


@pytest.mark.parametrize("n_train,compiled", [(35, "false"), (33, "false"), (35, "true")])
def test_two_processes_train_as_one(lm_dir, tmp_path, n_train, compiled):
    """`torchrun --nproc-per-node 2 ... finetune` (DDP on gloo): each rank trains on its half of every batch of 16.
    An epoch ends with a batch of 3 rows (35: shares of 2 and 1, weighted 4/3 and 2/3) or of one row (33: rank 1
    has none and runs one at weight 0). The logged losses, the dev scores and the best model are one eager
    process's, to float reassociation, also with compiled blocks under DDP (what a GPU run does by default);
    only rank 0 writes and prints."""
    data = glue_sst2(tmp_path / "data", n_train=n_train)
    kw = dict(epochs=2, dropout=0.0, quiet=False)
    one = cfg_for(lm_dir, tmp_path / "one", "sst2", data, **kw)
    two = cfg_for(lm_dir, tmp_path / "two", "sst2", data, compile=compiled, **kw)
    finetune(one)
    proc = two_processes("finetune", two, timeout=600)
    assert proc.stdout.count("[dev] task sst2") == 1 and proc.stderr.count("step 3: dev accuracy") == 1
    summaries = assert_same_finetune_run(one.out_dir, two.out_dir)
    assert summaries[0]["test"] is None and summaries[1]["test"] is None  # sst2's test split is unlabeled
    assert not list(Path(two.out_dir).glob(".dev-epoch.*"))


def dev_name(spec: T.TaskSpec, data: Path) -> str:
    if spec.fmt == "glue":
        return next(p.name for n in spec.dev_names for p in sorted(data.glob(f"{n}.tsv")))
    return {"squad": f"dev-v{spec.squad_version}.{1 if spec.squad_version == 1 else 0}.json", "race": "dev",
            "conll": "dev.txt"}.get(spec.fmt) or next(
        p.name for p in data.glob("dev.*"))


def test_model_learns_keyword_classification(lm_dir, tmp_path):
    data = jsonl_data(tmp_path / "data", keyword="banana", n_train=64, n_dev=32)
    summary = finetune(cfg_for(lm_dir, tmp_path, "classification", data, epochs=5, lr=5e-3, warmup_frac=0.0,
                               dropout=0.0, max_seq_len=16))
    # balanced dev set: the majority baseline is 0.5
    assert summary["dev"]["metrics"]["accuracy"] >= 0.85, summary["dev"]


def test_fine_tuned_classifier_transfers_to_a_task_with_fewer_labels(lm_dir, tmp_path, capsys):
    """MNLI (3 labels) -> SST-2 (2), the usual MNLI -> RTE transfer: the body and the head's summary layer come
    from the fine-tuned model, its 3-row logits_proj starts fresh, and one line says so, under --quiet too
    (before: 'tensor logits_proj.weight has shape (3, 32) but the config expects (2, 32)')."""
    finetune(cfg_for(lm_dir, tmp_path / "mnli", "mnli", glue_mnli(tmp_path / "mnli-data")))
    source_dir = tmp_path / "mnli" / "out" / "best"
    source = load_model(source_dir, verbose=False).state_dict()
    capsys.readouterr()
    cfg = cfg_for(source_dir, tmp_path / "sst2", "sst2", glue_sst2(tmp_path / "sst2-data"))
    model = build_model(cfg, T.get_task("sst2"), ["0", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "initialised fresh" in err[0], err
    assert "logits_proj.weight is (3, 32) in the file but (2, 32) here" in err[0], err
    state = model.state_dict()
    kept = [k for k in source if not k.startswith("logits_proj.")]
    assert kept and all(torch.equal(state[k], source[k]) for k in kept)
    assert state["logits_proj.weight"].shape == (2, 32)
    assert not torch.equal(state["logits_proj.weight"], source["logits_proj.weight"][:2])
    summary = finetune(cfg)  # and it trains
    assert summary["steps"] >= 1 and load_model(tmp_path / "sst2" / "out" / "best").config.num_labels == 2


# ------------------------------------------------------------------------------------------ config and optimizer


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("finetune-*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_finetune_configs_are_valid(path):
    """configs/finetune-*.yaml: every key a FinetuneConfig field, a known task, values that pass resolve_config,
    and flags still win over the file."""
    cfg = build_dataclass(FinetuneConfig, str(path))
    resolved = resolve_config(cfg, T.get_task(cfg.task))
    assert resolved.max_steps > 0 and 0 < resolved.warmup_frac < 1 and resolved.lr < 1e-4
    args = argparse.Namespace(lr=1e-5, task=None)
    assert build_dataclass(FinetuneConfig, str(path), args).lr == 1e-5


# (weight decay, Adam epsilon, warmup steps) of the scripts each shipped config reproduces (zihangdai/xlnet:
# run_squad.py's and run_race.py's defaults weight_decay 0, adam_epsilon 1e-6; run_classifier.py's 0 and 1e-8)
ORIGINAL_RECIPES = {"finetune-squad2": (0.0, 1e-6, 1000), "finetune-race": (0.0, 1e-6, 1000),
                    "finetune-stsb": (0.0, 1e-8, 120)}


@pytest.mark.parametrize("name", sorted(ORIGINAL_RECIPES))
def test_shipped_finetune_configs_keep_the_original_optimizer(name):
    cfg = build_dataclass(FinetuneConfig, str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))
    # the warmup steps as build_optimizer computes them
    assert (cfg.weight_decay, cfg.adam_eps, int(cfg.warmup_frac * cfg.max_steps)) == ORIGINAL_RECIPES[name]


def test_task_defaults_and_explicit_values():
    assert resolve_config(FinetuneConfig(), T.get_task("sst2")).max_seq_len == 128
    squad = resolve_config(FinetuneConfig(), T.get_task("squad2"))
    assert (squad.max_seq_len, squad.max_query_len, squad.doc_stride) == (512, 64, 128)
    race_cfg = resolve_config(FinetuneConfig(task="race"), T.get_task("race"))
    assert (race_cfg.max_seq_len, race_cfg.max_query_len) == (512, 128)
    assert resolve_config(FinetuneConfig(max_seq_len=64), T.get_task("conll")).max_seq_len == 64
    short_race = resolve_config(FinetuneConfig(max_seq_len=128), T.get_task("race"))
    assert short_race.max_query_len == 64  # the default 128 would leave no room for the article
    assert resolve_config(FinetuneConfig(doc_stride=32), T.get_task("squad")).doc_stride == 32
    for bad, task in (({"doc_stride": -8}, "squad2"), ({"max_seq_len": -1}, "sst2"), ({"max_query_len": -2}, "race")):
        with pytest.raises(XLNetError, match=f"{next(iter(bad))} must be positive"):
            resolve_config(FinetuneConfig(**bad), T.get_task(task))
    with pytest.raises(XLNetError, match="layer_decay must be in"):
        resolve_config(FinetuneConfig(layer_decay=0), T.get_task("sst2"))
    with pytest.raises(XLNetError, match="compile must be auto, true or false"):
        resolve_config(FinetuneConfig(compile="fast"), T.get_task("sst2"))


def test_subsample_seed_keeps_the_examples_across_seeds(tmp_path):
    """--max-train-examples draws with --seed unless --subsample-seed is given: then runs with other seeds (a
    student against its teacher, a seed spread) train on the same examples."""
    from xlnet.finetune import load_split
    from xlnet.tokenizer import Tokenizer

    data, tok = jsonl_data(tmp_path, n_train=40), Tokenizer.load(default_tokenizer_dir())

    def ids(**kw) -> list[str]:
        cfg = FinetuneConfig(task="classification", max_seq_len=32, **kw)
        return load_split(T.get_task("classification"), data / "train.jsonl", tok, cfg, ["pos", "neg", "mixed"], 10).ids

    assert ids(seed=1) != ids(seed=2)
    assert ids(seed=1, subsample_seed=7) == ids(seed=2, subsample_seed=7) == ids(seed=7)
    assert len(ids(seed=1, subsample_seed=7)) == 10


def test_layer_decay_groups(tmp_path):
    cfg = FinetuneConfig(task="sst2", preset="tiny", lr=1e-3, layer_decay=0.75, warmup_frac=0.0)
    spec = T.get_task("sst2")
    model = build_model(cfg, spec, ["0", "1"])
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    n = model.config.n_layer
    assert lr_of[id(model.logits_proj.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.transformer.layer[n - 1].ff.layer_1.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.transformer.layer[0].ff.layer_1.weight)] == pytest.approx(1e-3 * 0.75 ** (n - 1))
    assert lr_of[id(model.transformer.word_embedding.weight)] == pytest.approx(1e-3 * 0.75 ** n)
    assert len(lr_of) == sum(1 for p in model.parameters())  # every parameter is optimised exactly once


# ------------------------------------------------------------------------------------------ CLI


def test_cli_finetune_then_evaluate_model(lm_dir, tmp_path, capsys):
    data = glue_sst2(tmp_path / "data", n_train=16, n_dev=8)
    out = tmp_path / "out"
    args = ["finetune", "--task", "sst2", "--data", str(data), "--model", str(lm_dir), "--out-dir", str(out),
            "--max-seq-len", "32", "--epochs", "1", "--batch-size", "16", "--layer-decay", "0.75", "--quiet", "true",
            "--device", "cpu"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "[dev] task sst2" in stdout and "* accuracy" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["layer_decay"] == 0.75

    # the fine-tuned directory scores the same dev file to the same numbers, through the same code
    eval_out = tmp_path / "eval"
    assert main(["evaluate", "--task", "sst2", "--model", str(out / "best"), "--data", str(data / "dev.tsv"),
                 "--out", str(eval_out), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"] == summary["dev"]["metrics"]
    assert (eval_out / "predictions.tsv").read_text() == (out / "dev" / "predictions.tsv").read_text()
    # an unlabeled file: predictions only, default output folder beside the model
    assert main(["evaluate", "--task", "sst2", "--model", str(out / "best"), "--data", str(data / "test.tsv"),
                 "--device", "cpu"]) == 0
    assert "nothing to score" in capsys.readouterr().out
    assert (out / "best-eval-test" / "predictions.tsv").is_file()
    assert main(["evaluate", "--task", "sst2", "--model", str(out / "best"), "--data", str(data / "test.tsv"),
                 "--device", "cpu", "--json"]) == 0  # stdout stays JSON
    assert json.loads(capsys.readouterr().out)["scores"] is None
    # a classification model cannot answer SQuAD; --model and --predictions exclude each other
    squad_dev = squad2(tmp_path / "squad") / "dev-v2.0.json"
    assert main(["evaluate", "--task", "squad2", "--model", str(out / "best"), "--data", str(squad_dev)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a XLNetForSequenceClassification" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--task", "sst2", "--model", str(out / "best"), "--predictions", "p.tsv",
              "--data", str(data / "dev.tsv")])


def corrupt_tsv(d: Path) -> str:
    glue_sst2(d)
    write(d / "train.tsv", "sentence\tlabel\na fine day\t1\nno label here\n")
    return "train.tsv:3: expected 2 columns, got 1"


def binary_train(d: Path) -> str:
    glue_sst2(d)
    (d / "train.tsv").write_bytes(b"sentence\tlabel\n\x89PNG\r\n\x1a\n\xff\xd8\t1\n")
    return "train.tsv:2: not UTF-8 text"


def unknown_label(d: Path) -> str:
    glue_sst2(d)
    write(d / "dev.tsv", "sentence\tlabel\nfine\t1\nodd\t2\n")
    return "dev.tsv:3: unknown label '2'"


def missing_dev(d: Path) -> str:
    glue_sst2(d)
    (d / "dev.tsv").unlink()
    return "no dev split"


def empty_train(d: Path) -> str:
    glue_sst2(d)
    write(d / "train.tsv", "")
    return "train.tsv:1: empty file"


def bad_squad(d: Path) -> str:
    squad2(d, bad_answer=True)
    return "train-v2.0.json:"  # ...:<line>: answer 'Prague' of question 'train-2-a' is not in the context


def unlabeled_train(d: Path) -> str:
    glue_sst2(d)
    write(d / "train.tsv", "sentence\tlabl\na fine day\t1\n")  # a misspelled label column: no labels at all
    return "train.tsv: the training split has no labels"


BAD_INPUTS = {"unlabeled_train": ("sst2", unlabeled_train), "corrupt_tsv": ("sst2", corrupt_tsv), "binary_train": ("sst2", binary_train), "unknown_label": ("sst2", unknown_label),
              "missing_dev": ("sst2", missing_dev), "empty_train": ("sst2", empty_train),
              "bad_squad": ("squad2", bad_squad)}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line(case, lm_dir, tmp_path, capsys):
    task, make = BAD_INPUTS[case]
    expected = make(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["finetune", "--task", task, "--data", str(tmp_path / "data"), "--model", str(lm_dir),
                 "--out-dir", str(out), "--max-seq-len", "48", "--quiet", "true", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("xlnet finetune: error: ")
    assert expected in err
    if case == "bad_squad":
        assert re.search(r"train-v2\.0\.json:\d+: answer 'Prague' of question 'train-2-a' is not in the context", err)
    assert not (out / "best").exists()


@pytest.mark.parametrize("flags, message", [(["--dropout", "1.5"], "dropout must be in [0, 1)"),
                                            (["--max-steps", "-3"], "max_steps, max_train_examples"),
                                            (["--max-train-examples", "-5"], "max_train_examples and")])
def test_cli_bad_settings_fail_before_any_work(flags, message, tmp_path, capsys):
    glue_sst2(tmp_path / "data")
    code = main(["finetune", "--task", "sst2", "--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                 "--quiet", "true", "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_finetune_json_fields_are_typed(tmp_path):
    (tmp_path / "finetune.json").write_text(json.dumps({"task": "sst2", "max_seq_len": "long"}))
    with pytest.raises(XLNetError, match=r"finetune\.json: max_seq_len must be an integer, not 'long'"):
        read_meta(tmp_path)
    (tmp_path / "finetune.json").write_text(json.dumps({"task": "nosuchtask"}))
    with pytest.raises(XLNetError, match=r"finetune\.json: unknown task 'nosuchtask'"):
        read_meta(tmp_path)
    (tmp_path / "finetune.json").write_text(json.dumps({"task": "sst2", "max_seq_len": 64, "labels": ["0", "1"]}))
    assert read_meta(tmp_path)["max_seq_len"] == 64


def test_cli_missing_model_dir(tmp_path, capsys):
    glue_sst2(tmp_path / "data")
    code = main(["finetune", "--task", "sst2", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "nope"),
                 "--out-dir", str(tmp_path / "out"), "--quiet", "true", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"model directory not found: {tmp_path / 'nope'}" in err
    assert not (tmp_path / "out").exists()


def test_nan_loss_is_one_line(lm_dir, tmp_path, capsys):
    glue_stsb(tmp_path / "data")
    code = main(["finetune", "--task", "stsb", "--data", str(tmp_path / "data"), "--model", str(lm_dir),
                 "--out-dir", str(tmp_path / "out"), "--max-seq-len", "32", "--lr", "1e30", "--clip", "0",
                 "--warmup-frac", "0", "--max-steps", "4", "--batch-size", "16", "--quiet", "true",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "loss became nan at step" in err
    assert not (tmp_path / "out" / "best").exists()


@pytest.mark.parametrize("where", ["after_dev", "before_dev"])
def test_interrupted_rerun_leaves_nothing_of_the_earlier_run(where, lm_dir, tmp_path, monkeypatch, capsys):
    """A run into an earlier run's directory deletes that run's outputs before training: Ctrl-C (after the first
    dev evaluation, or before any) leaves this run's best/ and dev/ so far or nothing, never the earlier
    summary.json, test/ or curves beside them, and the message says what the directory holds."""
    import xlnet.finetune as FT

    data = glue_sst2(tmp_path / "data", n_train=16, n_dev=8)
    out = tmp_path / "out"
    args = ["finetune", "--task", "sst2", "--data", str(data), "--model", str(lm_dir), "--out-dir", str(out),
            "--max-seq-len", "32", "--epochs", "1", "--batch-size", "16", "--quiet", "true", "--device", "cpu"]
    assert main(args) == 0
    earlier = {p.name for p in out.iterdir()}
    assert {"best", "dev", "test", "summary.json", "metrics.jsonl", "loss.png", "dev.png"} <= earlier
    old_weights = (out / "best" / "model.safetensors").read_bytes()
    capsys.readouterr()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FT, "finish" if where == "after_dev" else "evaluate_epoch", interrupt)
    assert main(args + ["--seed", "7"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    left = {p.name for p in out.iterdir()}
    if where == "after_dev":
        assert err == f"xlnet finetune: interrupted; {out / 'best'} holds this run's best model so far; no summary.json"
        assert left == {"best", "dev", "metrics.jsonl", "tensorboard"}
        assert (out / "best" / "model.safetensors").read_bytes() != old_weights  # this run's (another seed)
    else:
        assert err == (f"xlnet finetune: interrupted; {out} holds no model yet (no dev evaluation finished); "
                       "no summary.json")
        assert left == {"metrics.jsonl", "tensorboard"}
    # a run writing into a directory another run holds is refused before it deletes anything
    from xlnet.fileio import DirLock

    with DirLock(out):
        assert main(args) == 2
    assert "is in use by another xlnet run" in capsys.readouterr().err
    assert left == {p.name for p in out.iterdir()}


def test_model_without_a_tokenizer_needs_one_of_its_vocabulary(tmp_path):
    """A model directory with no spiece.model falls back to the embedded tokenizer only when the vocabularies agree
    (a 32k Hugging Face model would otherwise train on the embedded 8,000 pieces without a word)."""
    data = glue_sst2(tmp_path / "data", n_train=16, n_dev=8)
    bare = tmp_path / "bare"
    XLNetLMHeadModel(XLNetConfig(**{**TINY, "vocab_size": 9000})).save_pretrained(bare)
    with pytest.raises(XLNetError, match=r"bare holds no tokenizer \(spiece.model\) and its vocabulary \(9000 "
                                         r"pieces\) is not the embedded tokenizer's \(8000\)"):
        finetune(cfg_for(bare, tmp_path, "sst2", data))
    # --tokenizer given: the larger vocabulary is the user's choice
    assert finetune(cfg_for(bare, tmp_path, "sst2", data, tokenizer=str(default_tokenizer_dir())))["steps"] >= 1


def test_inputs_inside_the_outputs_a_run_replaces_are_refused(lm_dir, tmp_path):
    """A run deletes its outputs before training: --model out/best --out-dir out would delete the model it reads."""
    data = glue_sst2(tmp_path / "data", n_train=16, n_dev=8)
    shutil.copytree(lm_dir, tmp_path / "out" / "best")
    with pytest.raises(XLNetError, match=r"--model .*best is inside .*best, which this run replaces"):
        finetune(cfg_for(lm_dir, tmp_path, "sst2", data, model=str(tmp_path / "out" / "best")))
    assert (tmp_path / "out" / "best" / "config.json").is_file()


def test_jsonl_boolean_labels_are_predicted_as_written(lm_dir, tmp_path):
    """JSON true/false labels are the classes "true"/"false" (not Python's "True"): the predictions say true and
    false as the file does, and rescore through the official scorer, also from JSON booleans."""
    rng = random.Random(5)
    for split, n in (("train", 16), ("dev", 8)):
        write(tmp_path / "data" / f"{split}.jsonl",
              "".join(json.dumps({"id": str(i), "text": sentence(rng), "label": i % 2 == 0}) + "\n" for i in range(n)))
    summary = finetune(cfg_for(lm_dir, tmp_path, "classification", tmp_path / "data"))
    assert json.loads((tmp_path / "out" / "best" / "finetune.json").read_text())["labels"] == ["false", "true"]
    preds = [json.loads(line) for line in (tmp_path / "out" / "dev" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {p["prediction"] for p in preds} <= {"true", "false"}
    as_json = write(tmp_path / "booleans.jsonl", "".join(
        json.dumps({"id": p["id"], "prediction": p["prediction"] == "true"}) + "\n" for p in preds))
    rescored = evaluate_predictions("classification", tmp_path / "data" / "dev.jsonl", as_json)
    assert rescored["metrics"] == summary["dev"]["metrics"]


def test_steps_are_read_one_behind_and_epoch_ends_before_dev(lm_dir, tmp_path, monkeypatch):
    """The loop queues step n + 1 before it reads step n's scalars (training.PendingScalars), so a GPU never
    waits for the host between steps; an epoch's last step is read before dev is scored (3 steps an epoch)."""
    events = record_scalar_reads(monkeypatch)
    data = jsonl_data(tmp_path / "data", n_train=24, n_dev=8)
    summary = finetune(cfg_for(lm_dir, tmp_path, "classification", data, epochs=2, batch_size=8))
    assert events == [("queue", 1), ("queue", 2), ("read", 1), ("queue", 3), ("read", 2), ("read", 3), ("queue", 4),
                      ("queue", 5), ("read", 4), ("queue", 6), ("read", 5), ("read", 6)]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "valid"] == [3, 6] and summary["steps"] == 6
    # each step logs the learning rate it trained with (the head's), not the next step's
    cfg = summary["config"]
    schedule = TR.warmup_linear_decay(int(cfg["warmup_frac"] * 6), 6)
    assert [r["lr"] for r in rows if r["split"] == "train"] == pytest.approx([cfg["lr"] * schedule(i) for i in range(6)])


def test_compiled_training_step_learns_like_eager(lm_dir, tmp_path):
    """--compile true (the default on a GPU) trains through torch.compile: same data, same seed, the same
    training losses as the eager run to within float reassociation, and the same dev accuracy."""
    data = jsonl_data(tmp_path / "data", keyword="banana", n_train=32, n_dev=16)
    runs, losses = [], []
    for name in ("false", "true"):
        runs.append(finetune(cfg_for(lm_dir, tmp_path / name, "classification", data, epochs=2, dropout=0.0,
                                     max_seq_len=16, compile=name)))
        rows = (tmp_path / name / "out" / "metrics.jsonl").read_text().splitlines()
        losses.append([r["loss"] for r in map(json.loads, rows) if r["split"] == "train"])
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), losses
    assert runs[1]["dev"]["metrics"]["accuracy"] == runs[0]["dev"]["metrics"]["accuracy"]
    assert runs[1]["config"]["compile"] == "true"


def left_padded(lengths: list[tuple[int, int]], max_len: int, choices: int = 0) -> dict[str, torch.Tensor]:
    """Features of `A <sep> B <sep> <cls>` rows (A, B of the given lengths), left-padded to max_len; with choices,
    [B / choices, choices, L] as the RACE featurizer lays them out."""
    rows = [T.layout(list(range(10, 10 + a)), list(range(60, 60 + b)), max_len) for a, b in lengths]
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    return {k: v.view(-1, choices, max_len) for k, v in batch.items()} if choices else batch


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("head", ["classification", "race", "tokens"])
def test_trimmed_padding_gives_the_full_width_outputs(head: str, impl: str):
    """Batches drop the positions that are padding in every row: the logits are the full width's (positions are
    relative and no real token attends to a padded key), for classification rows, multiple-choice rows
    ([B, choices, L]) and tagging (every remaining position's logits, per-position labels trimmed alike; the
    loss is the same); a batch with no all-padding column is left as it is."""
    from xlnet.finetune import trim_padding
    from xlnet.heads import XLNetForMultipleChoice, XLNetForSequenceClassification, XLNetForTokenClassification

    torch.manual_seed(0)
    config = XLNetConfig(**TINY, attn_impl=impl, num_labels=3)
    lengths = [(3, 4), (6, 2), (5, 5), (2, 2)]
    if head == "race":
        batch, model = left_padded(lengths, 24, choices=2), XLNetForMultipleChoice(config).eval()
    elif head == "tokens":
        batch, model = left_padded(lengths, 24), XLNetForTokenClassification(config).eval()
        batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"] % 3, -100)
    else:
        batch, model = left_padded(lengths, 24), XLNetForSequenceClassification(config).eval()
    trimmed = trim_padding(batch)
    longest = max(a + b + 3 for a, b in lengths)
    assert {k: v.shape[-1] for k, v in trimmed.items()} == dict.fromkeys(batch, longest)
    assert (trimmed["attention_mask"][..., 0] == 1).any()
    with torch.no_grad():
        short, full = model(**trimmed), model(**batch)
    want = full.logits[:, -longest:] if head == "tokens" else full.logits
    torch.testing.assert_close(short.logits, want, rtol=1e-5, atol=1e-5)
    if head == "tokens":
        torch.testing.assert_close(short.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert trim_padding(trimmed) is trimmed


def test_predict_trims_in_length_order_and_returns_rows_in_order(lm_dir, tmp_path):
    """Prediction sorts rows by length (tight batches, each trimmed) and hands the outputs back in the split's
    order: the same logits as untrimmed batches in file order; tagging's logits at the full width, SQuAD's beam
    positions in full-width coordinates."""
    from xlnet.finetune import Split, predict

    cfg = cfg_for(lm_dir, tmp_path, "classification", tmp_path, eval_batch_size=3, precision="fp32")
    model = build_model(cfg, T.get_task("classification"), ["a", "b"]).eval()
    lengths = [(2, 3), (9, 6), (4, 1), (1, 1), (7, 7), (3, 3), (8, 2)]
    tensors = {**left_padded(lengths, 32), "labels": torch.zeros(len(lengths), dtype=torch.long)}
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)

    def split(trimmable: bool, **kw) -> Split:
        return Split(tmp_path, [], False, tensors, True, lambda out, d: {}, trimmable=trimmable, **kw)

    full, trimmed = predict(model, split(False), cfg, torch.device("cpu")), predict(model, split(True), cfg,
                                                                                    torch.device("cpu"))
    assert seen == [32, 32, 32, 18, 9, 5]  # longest first, lengths 18, 17, 13 | 9, 8, 8 | 5
    torch.testing.assert_close(trimmed["logits"], full["logits"], rtol=1e-5, atol=1e-5)

    # tagging: per-position logits come back at the full width, each real position's as untrimmed
    tagger = build_model(cfg, T.get_task("conll"), ["O", "B-X", "I-X"]).eval()
    full, trimmed = (predict(tagger, split(t, per_position=("logits",)), cfg, torch.device("cpu"))["logits"]
                     for t in (False, True))
    real = tensors["attention_mask"].bool()
    assert trimmed.shape == full.shape == (len(lengths), 32, 3)
    torch.testing.assert_close(trimmed[real], full[real], rtol=1e-5, atol=1e-5)

    # SQuAD: the beam's positions come back in full-width coordinates (a stand-in reader whose "beam" is the
    # positions of the two largest token ids: exact, whatever the width)
    from types import SimpleNamespace

    from xlnet.finetune import SQUAD_POSITION_OUTPUTS, SQUAD_POSITIONS

    class Reader(torch.nn.Module):
        def forward(self, input_ids, cls_index, attention_mask, **kw):
            assert (input_ids.gather(1, cls_index[:, None]) == CLS_ID).all()  # still at <cls>
            top = input_ids.float().topk(2, dim=-1)
            return SimpleNamespace(logits=None, start_top_log_probs=top.values, start_top_index=top.indices,
                                   end_top_log_probs=top.values, end_top_index=top.indices.flip(-1),
                                   cls_logits=(input_ids * attention_mask).sum(-1).float())

    squad = {**tensors, "p_mask": 1.0 - tensors["attention_mask"].float(),
             "cls_index": torch.full((len(lengths),), 31)}
    full, trimmed = (predict(Reader(), Split(tmp_path, [], False, squad, True, lambda out, d: {}, trimmable=t,
                                             positions=SQUAD_POSITIONS, position_outputs=SQUAD_POSITION_OUTPUTS),
                             cfg, torch.device("cpu")) for t in (False, True))
    assert set(trimmed) == set(full) == set(SQUAD_POSITION_OUTPUTS) | {"start_top_log_probs", "end_top_log_probs",
                                                                       "cls_logits"}
    for key in full:
        assert torch.equal(trimmed[key], full[key]), key


def test_training_on_trimmed_batches_matches_full_width(lm_dir, tmp_path, monkeypatch):
    """Fine-tuning a <cls> task trains on trimmed batches (narrower than max_seq_len), with the full-width run's
    losses to within float reassociation (dropout 0) and its dev accuracy."""
    import xlnet.finetune as FT

    data = jsonl_data(tmp_path / "data", keyword="banana", n_train=32, n_dev=16)
    widths, losses, runs = [], [], []
    inputs = FT.model_inputs

    def spy(batch, device, train):
        widths.append(batch["input_ids"].shape[1])
        return inputs(batch, device, train)
    monkeypatch.setattr(FT, "model_inputs", spy)
    for trim in (True, False):
        monkeypatch.setattr(FT, "trims", lambda model, split, on=trim: on and split.trimmable)
        runs.append(finetune(cfg_for(lm_dir, tmp_path / str(trim), "classification", data, epochs=2, dropout=0.0,
                                     max_seq_len=48)))
        rows = (tmp_path / str(trim) / "out" / "metrics.jsonl").read_text().splitlines()
        losses.append([r["loss"] for r in map(json.loads, rows) if r["split"] == "train"])
    assert max(widths[:len(widths) // 2]) < 48 and set(widths[len(widths) // 2:]) == {48}
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5), losses
    assert runs[0]["dev"]["metrics"]["accuracy"] == runs[1]["dev"]["metrics"]["accuracy"]


def test_length_grouped_order():
    """--group-by-length: every row once per epoch, each run of 50 batches' worth sorted longest first, batches
    much narrower than uniformly shuffled ones."""
    from xlnet.finetune import length_grouped_order

    g = torch.Generator().manual_seed(0)
    lengths = (5 + 195 * torch.rand(1000, generator=g) ** 3).long()  # mostly short, a long tail (as text is)
    order = length_grouped_order(lengths, 8, g, group=10)
    assert sorted(order.tolist()) == list(range(1000))
    for run in order.split(80):
        assert (lengths[run].diff() <= 0).all()

    def widths(o):  # the sum over batches of the longest row
        return sum(int(lengths[b].max()) for b in o.split(8))
    assert widths(order) < 0.5 * widths(torch.randperm(1000, generator=g))


def test_group_by_length_trains_on_narrower_batches(lm_dir, tmp_path, monkeypatch):
    """A fine-tuning run with --group-by-length: as many steps, narrower batches than uniformly shuffled ones."""
    import xlnet.finetune as FT

    data = jsonl_data(tmp_path / "data", keyword="banana", n_train=64, n_dev=16)
    widths: dict[bool, list[int]] = {True: [], False: []}
    inputs = FT.model_inputs
    for grouped in (True, False):
        def spy(batch, device, train, out=widths[grouped]):
            if train:
                out.append(batch["input_ids"].shape[1])
            return inputs(batch, device, train)
        monkeypatch.setattr(FT, "model_inputs", spy)
        run = finetune(cfg_for(lm_dir, tmp_path / str(grouped), "classification", data, epochs=2, batch_size=4,
                               max_seq_len=48, group_by_length=grouped))
        assert run["config"]["group_by_length"] == grouped and run["dev"]["metrics"]["accuracy"] >= 0
    assert len(widths[True]) == len(widths[False]) == 32 and sum(widths[True]) < sum(widths[False])


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_trimmed_squad_batches_shift_positions(impl: str):
    """SQuAD batches drop their all-padding positions too: cls_index and the answer span shift with them (the
    same training loss), and the beam's positions shifted back are the full width's, with the same log-probs
    and answer-class logits."""
    from xlnet.finetune import SQUAD_POSITIONS, trim_padding
    from xlnet.heads import XLNetForQuestionAnswering

    torch.manual_seed(0)
    # a beam as wide as the longest row: every real (start, end) pair is in it, none tied at its edge
    config = XLNetConfig(**TINY, attn_impl=impl, dropout=0.0, start_n_top=12, end_n_top=12)
    model = XLNetForQuestionAnswering(config).eval()
    lengths = [(5, 3), (4, 4), (6, 3)]
    batch = left_padded(lengths, 32)
    width, real = 32, batch["attention_mask"].sum(1)
    batch["p_mask"] = (torch.arange(width) < width - real[:, None]).float()  # padding may not be an answer
    batch["cls_index"] = torch.full((3,), width - 1)
    batch["start_positions"] = width - real + torch.tensor([1, 0, 2])
    batch["end_positions"] = batch["start_positions"] + torch.tensor([2, 1, 0])
    batch["is_impossible"] = torch.zeros(3)
    trimmed = trim_padding(batch, SQUAD_POSITIONS)
    dropped = width - trimmed["input_ids"].shape[1]
    assert dropped == width - int(real.max()) and (trimmed["cls_index"] == width - 1 - dropped).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**trimmed).loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
        beam = ("start_positions", "end_positions", "is_impossible")
        short = model(**{k: v for k, v in trimmed.items() if k not in beam})
        full = model(**{k: v for k, v in batch.items() if k not in beam})
    keys = ("start_top_log_probs", "start_top_index", "end_top_log_probs", "end_top_index")
    assert_same_beam({k: getattr(short, k) for k in keys}, {k: getattr(full, k) for k in keys}, shift=dropped)
    torch.testing.assert_close(short.cls_logits, full.cls_logits, rtol=1e-5, atol=1e-5)


def assert_same_beam(out: dict, want: dict, shift: int = 0) -> None:
    """The same decoded SQuAD beam per row, as {(start, end): p_start · p_end} over the pairs of nonzero
    probability (out's positions + shift): the order aside, since candidates of near-equal probability may come
    out either way under another float summation order (a random tiny model's are close)."""
    def beam(o: dict, add: int) -> list[dict]:
        k = o["start_top_index"].shape[1]
        pairs = [{(int(o["start_top_index"][b, j % k]) + add, int(o["end_top_index"][b, j]) + add):
                  float(o["start_top_log_probs"][b, j % k] * o["end_top_log_probs"][b, j])
                  for j in range(o["end_top_index"].shape[1])} for b in range(len(o["start_top_index"]))]
        return [{c: p for c, p in row.items() if p > 0} for row in pairs]
    for got, ref in zip(beam(out, shift), beam(want, 0)):
        assert got.keys() == ref.keys()
        assert all(abs(got[c] - ref[c]) < 1e-5 for c in ref)
