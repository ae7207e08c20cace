"""`xlnet distill`: the PKD loss terms against their definitions, the student's initialisation from the teacher's
first layers, and runs end to end on small files (a 4-layer × 32 teacher, 2-layer students)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_same_finetune_run, two_processes
import test_finetune
from test_finetune import TINY, conll, jsonl_data, race, squad2, table_rows, write
from xlnet.assets import default_tokenizer_dir
from xlnet.cli import main
from xlnet.config import XLNetConfig
from xlnet.distill import (IGNORE, DistillConfig, Distiller, add_transfer, build_student, comparison_table, distill,
                           hard_label_loss, layer_pairs, patient_loss, soft_label_loss, squad_soft_loss)
from xlnet.errors import XLNetError
from xlnet.finetune import FinetuneConfig, evaluate_model, finetune
from xlnet.heads import XLNetForSequenceClassification
from xlnet.model import XLNetLMHeadModel, XLNetOutput

TEACHER_LAYERS = 4
one_thread = test_finetune.one_thread  # the same autouse fixture: one intra-op thread for tiny matmuls


@pytest.fixture(scope="module")
def lm4_dir(tmp_path_factory) -> Path:
    """A random 4-layer LM with the embedded tokenizer beside it: the teacher's (and a student's) starting point."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lm4")
    XLNetLMHeadModel(XLNetConfig(**{**TINY, "n_layer": TEACHER_LAYERS})).save_pretrained(d)
    for name in ("spiece.model", "tokenizer.json"):
        shutil.copyfile(default_tokenizer_dir() / name, d / name)
    return d


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory) -> Path:
    return jsonl_data(tmp_path_factory.mktemp("data"), keyword="banana", n_train=64, n_dev=32)


@pytest.fixture(scope="module")
def teacher(lm4_dir, keyword_data, tmp_path_factory) -> Path:
    """A teacher that learned the keyword task (dev accuracy >= 0.85; the balanced majority baseline is 0.5)."""
    out = tmp_path_factory.mktemp("teacher")
    summary = finetune(FinetuneConfig(task="classification", model=str(lm4_dir), data=str(keyword_data),
                                      out_dir=str(out), max_seq_len=16, epochs=5, batch_size=16, lr=5e-3,
                                      warmup_frac=0.0, dropout=0.0, quiet=True, device="cpu", seed=0))
    assert summary["dev"]["metrics"]["accuracy"] >= 0.85, summary["dev"]
    return out / "best"


def distill_cfg(teacher: Path, data: Path, out: Path, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), data=str(data), out_dir=str(out), epochs=2, batch_size=16, lr=5e-3,
                warmup_frac=0.0, dropout=0.0, quiet=True, device="cpu", seed=0)
    return DistillConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ the loss terms


def test_layer_pairs_follow_the_paper():
    # BERT-base teacher, 6-layer student: PKD-skip learns from layers 2,4,6,8,10; PKD-last from 7..11
    assert layer_pairs(12, 6, "skip") == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert layer_pairs(12, 6, "last") == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert layer_pairs(12, 3, "skip") == [(1, 4), (2, 8)]
    assert layer_pairs(4, 2, "skip") == [(1, 2)] and layer_pairs(4, 2, "last") == [(1, 3)]
    assert layer_pairs(12, 6, "none") == [] and layer_pairs(4, 1, "skip") == []


def test_soft_label_loss_is_tempered_kl_with_its_closed_form_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g)
    T = 3.0
    p_t, log_p_s = torch.softmax(teacher / T, -1), torch.log_softmax(student / T, -1)
    want = T**2 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    got = soft_label_loss(student, teacher, "classification", T)
    assert_close(got, want, "soft-label loss")
    got.backward()  # d/ds of T^2 KL(p_t || softmax(s/T)), averaged over rows: T * (p_s - p_t) / rows
    assert_close(student.grad, T * (torch.softmax(student / T, -1) - p_t).detach() / 5, "gradient")
    assert soft_label_loss(teacher, teacher, "classification", T).abs() < 1e-6
    # tagging: only the labeled tokens count, averaged over them
    keep = torch.tensor([[True, False, True], [False, True, False]])
    s3, t3 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert_close(soft_label_loss(s3, t3, "tokens", T, keep), soft_label_loss(s3[keep], t3[keep], "tokens", T), "tok")
    # regression: the squared error to the teacher's prediction
    assert_close(soft_label_loss(student[:, :1], teacher[:, :1], "regression", T),
                 F.mse_loss(student[:, :1], teacher[:, :1]), "regression")


def test_patient_loss_compares_unit_length_cls_states():
    g = torch.Generator().manual_seed(1)
    s_states = [torch.randn(3, 5, 8, generator=g) for _ in range(3)]  # embeddings + 2 layers
    t_states = [torch.randn(3, 5, 8, generator=g) for _ in range(5)]  # embeddings + 4 layers
    pairs = [(1, 2), (2, 4)]
    want = sum(((s_states[s][:, -1] / s_states[s][:, -1].norm(dim=-1, keepdim=True)
                 - t_states[t][:, -1] / t_states[t][:, -1].norm(dim=-1, keepdim=True)) ** 2).sum(-1).mean()
               for s, t in pairs)
    assert_close(patient_loss(s_states, t_states, pairs), want, "patient loss")
    scaled = [3.0 * s for s in s_states]  # the norms are divided out
    assert_close(patient_loss(scaled, t_states, pairs), want, "scale invariance")
    same = [t_states[0], t_states[2], t_states[4]]
    assert patient_loss(same, t_states, pairs) < 1e-10


def test_distiller_combines_the_terms_with_alpha_and_beta(teacher, keyword_data, tmp_path):
    from xlnet.checkpoint import load_model

    t = load_model(teacher, verbose=False).eval()
    s = build_student(t, distill_cfg(teacher, keyword_data, tmp_path, student_layers=2))
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(9, 8000, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
    d = Distiller(t, "classification", [(1, 3)], alpha=0.3, temperature=2.0, beta=7.0)
    loss, parts = d(s, inputs)
    assert set(parts) == {"ce", "soft", "patient"}
    assert abs(loss.item() - (0.7 * parts["ce"] + 0.3 * parts["soft"] + 7.0 * parts["patient"])) < 1e-5
    loss.backward()  # the teacher is frozen: only the student gets gradients
    assert all(p.grad is None for p in t.parameters()) and any(p.grad is not None for p in s.parameters())
    # the teacher's outputs are the no-label forward's; the patient term reads layer 3 of the teacher
    with torch.no_grad():
        ref = t(input_ids=inputs["input_ids"], output_hidden_states=True)
        mine = s(**inputs, output_hidden_states=True)
    assert abs(parts["patient"] - patient_loss(mine.hidden_states, ref.hidden_states, [(1, 3)]).item()) < 1e-6
    assert abs(parts["soft"] - soft_label_loss(mine.logits, ref.logits, "classification", 2.0).item()) < 1e-5
    assert abs(parts["ce"] - mine.loss.item()) < 1e-6  # every row labeled: the head's own loss
    # two transfer rows (no label): the hard term is the cross-entropy of the other two only
    _, mixed = d(s, {**inputs, "labels": torch.tensor([0, IGNORE, 1, IGNORE])})
    expected = F.cross_entropy(mine.logits[[0, 2]], torch.tensor([0, 1])).item()
    assert abs(mixed["ce"] - expected) < 1e-5 and mixed["soft"] == parts["soft"]


def test_hard_label_loss_skips_transfer_rows():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, generator=g, requires_grad=True)
    labels = torch.tensor([2, IGNORE, 0, IGNORE, 1])
    assert_close(hard_label_loss(logits, labels, "classification"),
                 F.cross_entropy(logits[[0, 2, 4]], labels[[0, 2, 4]]), "labeled rows' cross-entropy")
    alone = hard_label_loss(logits, torch.full((5,), IGNORE), "classification")  # a batch of transfer rows only
    alone.backward()
    assert alone.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    scores = torch.randn(4, 1, generator=g, requires_grad=True)
    target = torch.tensor([0.5, float("nan"), 2.0, float("nan")])
    mse = hard_label_loss(scores, target, "regression")
    assert_close(mse, F.mse_loss(scores[[0, 2], 0], target[[0, 2]]), "labeled rows' squared error")
    mse.backward()  # the unlabeled rows' NaN targets reach neither the loss nor the gradient
    assert scores.grad[[1, 3]].eq(0).all() and scores.grad.isfinite().all()


# ------------------------------------------------------------------------------------------ the student


def test_student_starts_as_the_teachers_first_layers(teacher, lm4_dir, keyword_data, tmp_path, capsys):
    from xlnet.checkpoint import load_model

    t = load_model(teacher, verbose=False).eval()
    s = build_student(t, distill_cfg(teacher, keyword_data, tmp_path, student_layers=2)).eval()
    assert isinstance(s, XLNetForSequenceClassification) and s.config.n_layer == 2
    t_state = t.state_dict()
    for key, value in s.state_dict().items():  # every tensor, the head included, is the teacher's
        assert torch.equal(value, t_state[key]), key
    x = {"input_ids": torch.randint(9, 8000, (3, 10), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        hs, ht = s(**x, output_hidden_states=True).hidden_states, t(**x, output_hidden_states=True).hidden_states
    for j in range(2):  # the embeddings and layer 1 are the same computation
        assert torch.equal(hs[j], ht[j]), j
    assert_close(hs[2][:, -1], ht[2][:, -1], "layer 2 at <cls>")  # the student's top computes that row alone

    # from a pretrained LM: its body's first layers, a fresh head (and a note saying so)
    s_lm = build_student(t, distill_cfg(teacher, keyword_data, tmp_path, student_layers=2,
                                        student_init=str(lm4_dir), quiet=False))
    lm_state = XLNetLMHeadModel.from_pretrained(lm4_dir, verbose=False).state_dict()
    assert torch.equal(s_lm.state_dict()["transformer.layer.1.ff.layer_1.weight"],
                       lm_state["transformer.layer.1.ff.layer_1.weight"])
    assert not torch.equal(s_lm.state_dict()["logits_proj.weight"], t_state["logits_proj.weight"])
    assert "logits_proj.weight" in capsys.readouterr().err
    s_random = build_student(t, distill_cfg(teacher, keyword_data, tmp_path, student_layers=2,
                                            student_init="random"))
    assert not torch.equal(s_random.state_dict()["transformer.word_embedding.weight"],
                           t_state["transformer.word_embedding.weight"])


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("pkd", ["skip", "last", "none"])
def test_distill_end_to_end(pkd, teacher, keyword_data, tmp_path):
    out = tmp_path / "student"
    summary = distill(distill_cfg(teacher, keyword_data, out, pkd=pkd))
    d = summary["distill"]
    assert d["layers"] == {"teacher": 4, "student": 2}
    assert d["layer_pairs"] == layer_pairs(4, 2, pkd)
    assert d["parameters"]["student"] < d["parameters"]["teacher"]
    assert d["teacher_dev"]["main"] >= 0.85 and summary["dev"]["main_metric"] == "accuracy"
    assert d["dev_inference_seconds"]["student"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all({"ce", "soft"} <= set(r) for r in train)
    assert all(("patient" in r) == (pkd != "none") for r in train)
    # the student is an ordinary fine-tuned directory: `xlnet evaluate --model` rescores dev to the same numbers
    assert json.loads((out / "best" / "finetune.json").read_text()) == json.loads(
        (teacher / "finetune.json").read_text())
    result = evaluate_model("classification", out / "best", keyword_data / "dev.jsonl", tmp_path / "eval",
                            device="cpu")
    assert result["metrics"] == summary["dev"]["metrics"]
    assert (out / "loss.png").is_file() and (out / "teacher" / "dev" / "predictions.jsonl").is_file()


def test_soft_labels_alone_teach_a_random_student(teacher, keyword_data, tmp_path):
    """alpha = 1: the gold labels carry no weight, so what the student learns comes from the teacher."""
    summary = distill(distill_cfg(teacher, keyword_data, tmp_path / "s", alpha=1.0, pkd="none", temperature=2.0,
                                  student_init="random", epochs=6))
    assert summary["dev"]["metrics"]["accuracy"] >= 0.8, summary["dev"]


def test_transfer_rows_are_appended_unlabeled_without_training_duplicates(teacher, keyword_data, tmp_path):
    from xlnet.finetune import load_split, load_tokenizer
    from xlnet.tasks import get_task

    cfg = distill_cfg(teacher, keyword_data, tmp_path, max_seq_len=16, tokenizer=str(teacher))
    spec, tok = get_task("classification"), load_tokenizer(cfg)
    train = load_split(spec, keyword_data / "train.jsonl", tok, cfg, ["no", "yes"], 0)
    new = [{"id": r["id"], "text": r["text"]} for r in table_rows(20, 99, keyword="banana")]  # no labels
    copies = (keyword_data / "train.jsonl").read_text().splitlines()[:5]  # labeled, and already in train
    transfer = write(tmp_path / "transfer.jsonl", "".join(json.dumps(r) + "\n" for r in new) + "\n".join(copies) + "\n")
    merged, n = add_transfer(train, spec, dataclasses.replace(cfg, transfer=str(transfer)), tok, ["no", "yes"])
    assert n == 20 and merged.rows == train.rows + 20
    assert torch.equal(merged.tensors["labels"][: train.rows], train.tensors["labels"])
    assert (merged.tensors["labels"][train.rows:] == IGNORE).all()
    for k, v in train.tensors.items():
        assert torch.equal(merged.tensors[k][: train.rows], v)
    _, n = add_transfer(train, spec, dataclasses.replace(cfg, transfer=str(transfer), max_transfer_examples=7), tok,
                        ["no", "yes"])
    assert n == 7


@pytest.mark.parametrize("task", ["sst2", "classification", "regression"])
def test_transfer_file_labels_are_not_read(task, teacher, keyword_data, tmp_path):
    """The transfer file gives inputs only: a label the task does not know, an empty one or (regression) a
    non-number is not an error, and every transfer row is unlabeled."""
    from xlnet.finetune import load_split, load_tokenizer
    from xlnet.tasks import get_task

    spec = get_task(task)
    cfg = distill_cfg(teacher, keyword_data, tmp_path, max_seq_len=16, tokenizer=str(teacher))
    tok = load_tokenizer(cfg)
    if task == "sst2":
        labels: list[str] | None = ["0", "1"]
        train_file = write(tmp_path / "train.tsv", "sentence\tlabel\nsome words\t1\nother words\t0\n")
        transfer = write(tmp_path / "transfer_foo.tsv", "sentence\tlabel\nnew words\tfoo\nfresh words\t\n")
    else:
        labels = ["no", "yes"] if task == "classification" else None
        gold = ["yes", "no"] if task == "classification" else [1.5, 0.5]
        train_file = write(tmp_path / "train.jsonl", "".join(
            json.dumps({"text": t, "label": g}) + "\n" for t, g in zip(["some words", "other words"], gold)))
        transfer = write(tmp_path / "transfer.jsonl", json.dumps({"text": "new words", "label": "unknownlabel"})
                         + "\n" + json.dumps({"text": "fresh words", "label": True}) + "\n")
    train = load_split(spec, train_file, tok, cfg, labels, 0)
    merged, n = add_transfer(train, spec, dataclasses.replace(cfg, transfer=str(transfer)), tok, labels)
    assert n == 2 and merged.rows == train.rows + 2
    added = merged.tensors["labels"][train.rows:]
    assert (added.isnan() if task == "regression" else added == IGNORE).all()


def test_transfer_examples_teach_the_student(teacher, keyword_data, tmp_path):
    """Two labeled training rows and 120 unlabeled ones: at alpha 1 the student learns the task from what the
    teacher says about the unlabeled ones."""
    rows = table_rows(120, 41, keyword="banana")
    transfer = write(tmp_path / "transfer.jsonl", "".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    common = dict(alpha=1.0, pkd="none", temperature=2.0, student_init="random", max_train_examples=2, epochs=6)
    with_transfer = distill(distill_cfg(teacher, keyword_data, tmp_path / "t", transfer=str(transfer), **common))
    without = distill(distill_cfg(teacher, keyword_data, tmp_path / "n", **common))
    assert with_transfer["distill"]["transfer_examples"] == 120
    assert comparison_table(with_transfer).splitlines()[2].startswith("student, KD + transfer ")
    assert with_transfer["dev"]["metrics"]["accuracy"] >= 0.8, with_transfer["dev"]
    assert without["dev"]["metrics"]["accuracy"] <= 0.7, without["dev"]


def test_patient_term_pulls_the_cls_states_together(teacher, keyword_data, tmp_path):
    distill(distill_cfg(teacher, keyword_data, tmp_path / "s", alpha=0.0, beta=100.0, student_init="random",
                        epochs=4))
    patient = [json.loads(line)["patient"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line]
    assert sum(patient[-4:]) / 4 < 0.3 * sum(patient[:2]) / 2, patient


@pytest.mark.parametrize("kind", ["tokens", "race"])
def test_distill_other_heads(kind, lm4_dir, tmp_path):
    """Tagging (soft labels per labeled token) and multiple choice (over the choices, <cls> per choice)."""
    data, task, lengths = (conll(tmp_path / "d"), "conll", {}) if kind == "tokens" else (
        race(tmp_path / "d"), "race", dict(max_seq_len=40, max_query_len=12))
    finetune(FinetuneConfig(task=task, model=str(lm4_dir), data=str(data), out_dir=str(tmp_path / "t"),
                            epochs=1, batch_size=16, lr=1e-3, quiet=True, device="cpu", seed=0,
                            **({"max_seq_len": 32} | lengths)))
    summary = distill(distill_cfg(tmp_path / "t" / "best", data, tmp_path / "s", epochs=1))
    assert summary["task"] == task and summary["distill"]["layers"]["student"] == 2
    assert summary["config"]["max_seq_len"] == (lengths.get("max_seq_len") or 32)  # the teacher's lengths
    assert summary["dev"]["main_metric"] == summary["distill"]["teacher_dev"]["main_metric"]
    with pytest.raises(XLNetError, match=f"--transfer works for classification and regression tasks; {task} is {kind}"):
        distill(distill_cfg(tmp_path / "t" / "best", data, tmp_path / "s2", transfer=str(data / "train.txt")))


def test_squad_soft_loss_against_its_definition():
    """Start and end: T² KL of the softened distributions, half weight each; answerability: T² times the KL of
    Bernoulli(sigmoid(logit / T)) in closed form, half weight; positions masked out (p_mask) add nothing."""
    torch.manual_seed(0)
    T = 3.0

    def outputs(seed: int, masked: bool = True) -> XLNetOutput:
        g = torch.Generator().manual_seed(seed)
        start, end = torch.randn(4, 9, generator=g) * 3, torch.randn(4, 9, generator=g) * 3
        if masked:  # the head's masking of question and padding positions
            start[:, :3], end[:, :3] = -1e30, -1e30
        return XLNetOutput(start_logits=start, end_logits=end, cls_logits=torch.randn(4, generator=g) * 3)

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p_t = torch.softmax(t / T, -1)
        return (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).nan_to_num().sum(-1).mean()

    def bernoulli_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q, p = torch.sigmoid(s / T), torch.sigmoid(t / T)
        return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).mean()

    s, t = outputs(1), outputs(2)
    expected = T**2 * ((kl(s.start_logits, t.start_logits) + kl(s.end_logits, t.end_logits)) / 2
                       + 0.5 * bernoulli_kl(s.cls_logits, t.cls_logits))
    got = squad_soft_loss(s, t, T)
    assert torch.isfinite(got) and abs(got.item() - expected.item()) < 1e-5 * expected.item()
    assert squad_soft_loss(t, t, T).abs().item() < 1e-6
    # SQuAD 1.1 has no answerability term
    v1 = [XLNetOutput(start_logits=o.start_logits, end_logits=o.end_logits) for o in (s, t)]
    assert abs(squad_soft_loss(*v1, T).item() - T**2 * (kl(s.start_logits, t.start_logits)
                                                          + kl(s.end_logits, t.end_logits)).item() / 2) < 1e-4


def test_distill_squad(lm4_dir, tmp_path):
    """SQuAD 2.0: the student learns from the teacher's start, end and answerability outputs and is scored as
    `xlnet finetune` scores (exact match and F1 from the beam)."""
    data = squad2(tmp_path / "d")
    lengths = dict(max_seq_len=48, max_query_len=12, doc_stride=8)
    finetune(FinetuneConfig(task="squad2", model=str(lm4_dir), data=str(data), out_dir=str(tmp_path / "t"),
                            epochs=1, batch_size=8, lr=1e-3, quiet=True, device="cpu", seed=0, **lengths))
    summary = distill(distill_cfg(tmp_path / "t" / "best", data, tmp_path / "s", epochs=1, batch_size=8))
    assert summary["task"] == "squad2" and summary["distill"]["layers"]["student"] == 2
    assert {k: summary["config"][k] for k in lengths} == lengths  # the teacher's lengths
    assert summary["dev"]["main_metric"] == summary["distill"]["teacher_dev"]["main_metric"]
    assert (tmp_path / "s" / "dev" / "predictions.json").is_file()
    train = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert train and all(r["soft"] > 0 and "patient" in r for r in train)


# ------------------------------------------------------------------------------------------ CLI


def test_two_processes_distill_as_one(teacher, keyword_data, tmp_path):
    """`torchrun --nproc-per-node 2 ... distill` (DDP on gloo, PKD-skip): every term is a mean over rows, so the
    two halves of each batch, weighted, give one process's run: losses and terms, dev scores, best student."""
    cfgs = [distill_cfg(teacher, keyword_data, tmp_path / name, pkd="skip") for name in ("one", "two")]
    distill(cfgs[0])
    proc = two_processes("distill", cfgs[1])
    assert proc.stdout.count("teacher ") == 1  # rank 0's comparison table only
    assert_same_finetune_run(cfgs[0].out_dir, cfgs[1].out_dir)


def test_cli_prints_teacher_and_student(teacher, keyword_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", "--teacher", str(teacher), "--data", str(keyword_data), "--out-dir", str(out),
                 "--epochs", "1", "--batch-size", "16", "--pkd", "last", "--quiet", "true", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "layers", "params"]
    assert lines[1].split()[:2] == ["teacher", "4"] and lines[2].split()[:3] == ["student,", "PKD-last", "2"]
    assert json.loads((out / "summary.json").read_text())["config"]["pkd"] == "last"


def bad_teacher_copy(teacher: Path, tmp_path: Path, task: str | None) -> Path:
    """The teacher's directory with its finetune.json naming another task (None: without finetune.json)."""
    copy = tmp_path / "copied"
    shutil.copytree(teacher, copy)
    if task is None:
        (copy / "finetune.json").unlink()
    else:
        meta = json.loads((copy / "finetune.json").read_text())
        (copy / "finetune.json").write_text(json.dumps({**meta, "task": task}))
    return copy


BAD = {  # case -> (extra flags, teacher variant, expected message)
    "no_teacher": ([], "none", "distill needs --teacher DIR"),
    "missing_teacher": ([], "missing", "model directory not found"),
    "not_finetuned": ([], "no_meta", "no finetune.json"),
    "bad_temperature": (["--temperature", "0"], "ok", "temperature must be positive"),
    "too_deep": (["--student-layers", "5"], "ok", "student_layers must be in [1, 4]"),
    "other_task": (["--task", "sst2"], "ok", "was fine-tuned on classification"),
    "bad_alpha": (["--alpha", "1.5"], "ok", "alpha must be in [0, 1]"),
    "bad_init": (["--student-init", "nowhere"], "ok", "--student-init nowhere: not 'teacher', 'random'"),
    "transfer_missing": (["--transfer", "nowhere.jsonl"], "ok", "nowhere.jsonl: no such file"),
    "transfer_unused": (["--transfer", "nowhere.jsonl", "--alpha", "0", "--pkd", "none"], "ok",
                        "--transfer rows have no labels, so they teach nothing at alpha 0"),
}



def test_student_init_of_another_width_is_refused_by_name(teacher, keyword_data, tmp_path):
    from xlnet.checkpoint import load_model

    t = load_model(teacher, verbose=False)
    narrow = XLNetConfig(**{**t.config.to_dict(), "d_model": 64, "d_head": 64 // t.config.n_head})
    XLNetLMHeadModel(narrow).save_pretrained(tmp_path / "narrow")
    with pytest.raises(XLNetError, match=f"another width than the teacher's.*d_model 64 \\(the teacher's "
                                         f"{t.config.d_model}\\), d_head"):
        build_student(t, distill_cfg(teacher, keyword_data, tmp_path, student_layers=2,
                                     student_init=str(tmp_path / "narrow")))

@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line(case, teacher, keyword_data, tmp_path, capsys):
    flags, variant, expected = BAD[case]
    paths = {"none": None, "missing": tmp_path / "nope", "ok": teacher}
    path = paths[variant] if variant in paths else bad_teacher_copy(
        teacher, tmp_path, None if variant == "no_meta" else variant)
    args = ["distill", "--data", str(keyword_data), "--out-dir", str(tmp_path / "out"), "--quiet", "true",
            "--device", "cpu", *flags] + ([] if path is None else ["--teacher", str(path)])
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("xlnet distill: error: "), err
    assert expected in err
    assert not (tmp_path / "out" / "best").exists()


def test_interrupted_rerun_leaves_nothing_of_the_earlier_run(teacher, keyword_data, tmp_path, monkeypatch, capsys):
    """Before training, a run deletes what an earlier run wrote into --out-dir (its teacher's predictions
    included) and nothing else; Ctrl-C then leaves this run's best/ and dev/ alone, and says so."""
    import xlnet.finetune as FT

    out = tmp_path / "out"
    earlier = ["best/config.json", "dev/predictions.jsonl", "test/predictions.jsonl", "summary.json", "metrics.jsonl",
               "tensorboard/events", "loss.png", "dev.png", "teacher/dev/predictions.jsonl",
               "teacher/test/predictions.jsonl", "notes.txt"]
    for name in earlier:
        write(out / name, "earlier run\n")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FT, "finish", interrupt)
    code = main(["distill", "--teacher", str(teacher), "--data", str(keyword_data), "--out-dir", str(out),
                 "--epochs", "1", "--batch-size", "16", "--quiet", "true", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 130
    assert err == f"xlnet distill: interrupted; {out / 'best'} holds this run's best model so far; no summary.json"
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts)
    assert [p for p in left if not p.startswith("best/")] == ["dev/predictions.jsonl", "metrics.jsonl", "notes.txt",
                                                              "teacher/dev/predictions.jsonl"]
    assert "earlier run" not in (out / "dev" / "predictions.jsonl").read_text()
    assert (out / "notes.txt").read_text() == "earlier run\n"  # not an output of ours: kept
    assert not (out / "tensorboard" / "events").exists() and (out / "best" / "model.safetensors").is_file()


def test_teacher_inside_the_outputs_is_refused(teacher, keyword_data, tmp_path):
    """--teacher out/best --out-dir out: the run would delete its teacher before training."""
    shutil.copytree(teacher, tmp_path / "out" / "best")
    with pytest.raises(XLNetError, match=r"--teacher .*best is inside .*best, which this run replaces"):
        distill(distill_cfg(tmp_path / "out" / "best", keyword_data, tmp_path / "out"))
    assert (tmp_path / "out" / "best" / "model.safetensors").is_file()


def test_teacher_without_finetune_json_takes_the_task_flag(teacher, keyword_data, tmp_path):
    """A fine-tuned directory from elsewhere (a Hugging Face one, say): --task names the task, the labels come
    from the model's config, and the student's finetune.json records what it was trained with."""
    bare = bad_teacher_copy(teacher, tmp_path, None)
    summary = distill(distill_cfg(bare, keyword_data, tmp_path / "s", task="classification", max_seq_len=16,
                                  epochs=1))
    meta = json.loads((tmp_path / "s" / "best" / "finetune.json").read_text())
    assert meta == json.loads((teacher / "finetune.json").read_text())
    assert summary["distill"]["teacher_dev"]["main"] >= 0.85


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distill_on_cuda_with_compiled_student(teacher, keyword_data, tmp_path):
    """bf16 autocast, the student's blocks compiled (compile auto), the teacher eager in eval mode."""
    summary = distill(distill_cfg(teacher, keyword_data, tmp_path / "s", device="cuda", alpha=1.0, pkd="skip",
                                  temperature=2.0, epochs=6))
    assert summary["config"]["precision"] == "bf16"
    assert summary["dev"]["metrics"]["accuracy"] >= 0.8, summary["dev"]
