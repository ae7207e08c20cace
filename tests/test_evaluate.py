"""`xlnet evaluate` end to end through xlnet.cli.main on small files in the public formats."""

import json

import pytest

from xlnet.cli import main
from xlnet.errors import XLNetError
from xlnet.evaluate import evaluate_predictions


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def rte(tmp_path):
    gold = write(tmp_path / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n"
                                       "0\tA.\tB.\tentailment\n1\tC.\tD.\tnot_entailment\n"
                                       "2\tE.\tF.\tentailment\n3\tG.\tH.\tentailment\n")
    return gold


def test_cli_glue_table_and_json(tmp_path, rte, capsys):
    pred = write(tmp_path / "RTE.tsv", "index\tprediction\n0\tentailment\n1\tentailment\n2\tentailment\n"
                                       "3\tnot_entailment\n")
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--predictions", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "* accuracy" in out and "0.5000" in out  # rows 0 and 2 right: 2/4
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--predictions", str(pred), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == 0.5


def test_jsonl_predictions_mrpc_numeric(tmp_path):
    gold = write(tmp_path / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                       "1\t1\t2\ta\tb\n0\t3\t4\tc\td\n1\t5\t6\te\tf\n")
    pred = write(tmp_path / "p.jsonl", '{"id": 0, "prediction": 1}\n{"id": 1, "prediction": 1}\n'
                                       '{"id": 2, "prediction": 0}\n')
    r = evaluate_predictions("mrpc", gold, pred)
    # class 1: TP=1 FP=1 FN=1 -> F1 = 2/4; accuracy 1/3
    assert r["main_metric"] == "f1" and r["main"] == pytest.approx(0.5)
    assert r["metrics"]["accuracy"] == pytest.approx(1 / 3)


def test_json_valued_labels_match_json_valued_predictions(tmp_path):
    """JSONL gold labels true / 2 / 1.0 are the classes "true" / "2" / "1.0" (their JSON text); a prediction
    given as the same JSON value, or as that text, is that class."""
    gold = write(tmp_path / "dev.jsonl", "".join(json.dumps({"id": str(i), "text": "t", "label": v}) + "\n"
                                                 for i, v in enumerate([True, False, 2, 1.0])))
    pred = write(tmp_path / "p.jsonl", '{"id": "0", "prediction": true}\n{"id": "1", "prediction": "false"}\n'
                                       '{"id": "2", "prediction": 2}\n{"id": "3", "prediction": 1.0}\n')
    assert evaluate_predictions("classification", gold, pred)["metrics"]["accuracy"] == 1.0
    assert evaluate_predictions("classification", gold, pred, labels=["true", "false", "2", "1.0"])["main"] == 1.0


def squad2_gold(tmp_path):
    """Two questions: 'a' answerable (Paris), 'b' not."""
    ctx = "Paris is the capital of France."
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "b", "question": "Moon?", "answers": [], "is_impossible": True}]}]}]}
    return write(tmp_path / "dev-v2.0.json", json.dumps(data))


def test_squad2_with_na_probs(tmp_path):
    gold = squad2_gold(tmp_path)
    pred = write(tmp_path / "pred.json", json.dumps({"a": "Paris", "b": "France"}))
    na = write(tmp_path / "na.json", json.dumps({"a": 0.2, "b": 0.7}))
    r = evaluate_predictions("squad2", gold, pred, na)
    # raw: a EM 1, b EM 0 -> 50; sweep: start 1 (NoAns), a +1 -> 2 at 0.2, b -1 -> 1: best 100 at 0.2
    assert r["metrics"]["exact"] == pytest.approx(50.0)
    assert r["metrics"]["best_exact"] == pytest.approx(100.0) and r["metrics"]["best_exact_thresh"] == 0.2
    with pytest.raises(XLNetError, match=r"dev-v2\.0\.json:1: question 'b' has no answer; use --task squad2"):
        evaluate_predictions("squad1", gold, pred)  # v1.1 cannot score unanswerable questions


def test_race_and_conll(tmp_path):
    for level, name, ans in (("middle", "1.txt", ["A", "B"]), ("high", "2.txt", ["C"])):
        d = tmp_path / "dev" / level
        d.mkdir(parents=True)
        write(d / name, json.dumps({"article": "text", "questions": ["q1", "q2"][: len(ans)], "answers": ans,
                                    "options": [["a", "b", "c", "d"]] * len(ans), "id": level + name}))
    pred = write(tmp_path / "race.json", json.dumps({"middle-1-0": "A", "middle-1-1": "A", "high-2-0": "C"}))
    r = evaluate_predictions("race", tmp_path / "dev", pred)
    assert r["metrics"]["accuracy"] == pytest.approx(2 / 3) and r["metrics"]["high"] == 1.0
    gold = write(tmp_path / "gold.txt", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn I-PER\n")
    predc = write(tmp_path / "pred.txt", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn B-PER\n")
    r = evaluate_predictions("conll", gold, predc)
    # gold chunks ORG, PER(0-1); pred ORG, PER(0), PER(1): correct 1 -> P 1/3, R 1/2, F1 = 0.4
    assert r["main"] == pytest.approx(0.4)


def test_cli_malformed_returns_2(tmp_path, rte, capsys):
    pred = write(tmp_path / "p.tsv", "index\tprediction\n0\tentailment\n1\n")
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--predictions", str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.tsv:3: expected 2 columns, got 1" in err
    pred = write(tmp_path / "p2.tsv", "index\tprediction\n0\tentailment\n")
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--predictions", str(pred)]) == 2
    assert "dev.tsv:3: no prediction for id '1'" in capsys.readouterr().err
    bad_gold = write(tmp_path / "bad.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tmaybe\n")
    assert main(["evaluate", "--task", "rte", "--data", str(bad_gold), "--predictions", str(pred)]) == 2
    assert "bad.tsv:2: unknown label 'maybe'" in capsys.readouterr().err


def test_squad1_cli(tmp_path, capsys):
    ctx = "The Broncos beat the Panthers."
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "Who won?", "answers": [{"text": "The Broncos", "answer_start": 0},
                                                       {"text": "Broncos", "answer_start": 4}]}]}]}]}
    gold = write(tmp_path / "dev-v1.1.json", json.dumps(data))
    pred = write(tmp_path / "pred.json", json.dumps({"a": "broncos!"}))
    assert main(["evaluate", "--task", "squad", "--data", str(gold), "--predictions", str(pred)]) == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "100.0000" in out  # "broncos!" normalizes to "broncos" = gold


# ---------------------------------------------------------------------------- subsets and the --model mode


def test_ids_restrict_gold_to_a_subsample(tmp_path, rte):
    pred = write(tmp_path / "p.jsonl", '{"id": "1", "prediction": "not_entailment"}\n'
                                       '{"id": "3", "prediction": "not_entailment"}\n')
    r = evaluate_predictions("rte", rte, pred, ids=["1", "3"])
    assert r["n"] == 2 and r["main"] == pytest.approx(0.5)
    with pytest.raises(XLNetError, match=r"dev\.tsv:2: no prediction for id '0'"):
        evaluate_predictions("rte", rte, pred)  # without ids every gold row needs a prediction
    gold = write(tmp_path / "gold.txt", "EU B-ORG\n\nPeter B-PER\nBlackburn I-PER\n\nBonn B-LOC\n")
    predc = write(tmp_path / "pred.txt", "Peter B-PER\nBlackburn I-PER\n")
    r = evaluate_predictions("conll", gold, predc, ids=["1"])  # CoNLL ids are sentence numbers
    assert r["n"] == 1 and r["main"] == 1.0


def test_squad_subset(tmp_path):
    ctx = "Paris is the capital of France."
    qas = [{"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
           {"id": "b", "question": "Country?", "answers": [{"text": "France", "answer_start": 24}]}]
    gold = write(tmp_path / "dev-v1.1.json", json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": ctx, "qas": qas}]}]}))
    pred = write(tmp_path / "pred.json", json.dumps({"b": "France"}))
    assert evaluate_predictions("squad1", gold, pred, ids={"b"})["metrics"]["exact_match"] == 100.0
    assert evaluate_predictions("squad1", gold, pred)["metrics"]["exact_match"] == 50.0  # "a" missing: scores 0


def test_cli_model_mode_on_a_head_directory(tmp_path, rte, capsys):
    """A head directory without finetune.json (e.g. converted from HF): task defaults, labels from its config."""
    import shutil

    import torch

    from xlnet.assets import default_tokenizer_dir
    from xlnet.config import XLNetConfig
    from xlnet.heads import XLNetForSequenceClassification

    torch.manual_seed(0)
    model_dir = tmp_path / "rte-model"
    config = XLNetConfig(vocab_size=8000, d_model=32, n_layer=1, n_head=2, d_head=16, d_inner=64,
                         label_names=["entailment", "not_entailment"])
    XLNetForSequenceClassification(config).save_pretrained(model_dir)
    shutil.copyfile(default_tokenizer_dir() / "spiece.model", model_dir / "spiece.model")
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--model", str(model_dir), "--device", "cpu"]) == 0
    assert "* accuracy" in capsys.readouterr().out
    lines = (tmp_path / "rte-model-eval-dev" / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 5
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--model", str(model_dir),
                 "--na-probs", "na.json"]) == 2
    assert "--na-probs goes with --predictions" in capsys.readouterr().err
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--model", str(tmp_path / "none")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    write(model_dir / "finetune.json", json.dumps({"task": "sst2"}))  # a model fine-tuned on another task
    assert main(["evaluate", "--task", "rte", "--data", str(rte), "--model", str(model_dir)]) == 2
    assert "was fine-tuned on sst2, not rte (its finetune.json)" in capsys.readouterr().err


def test_a_directory_given_for_a_file_says_so(tmp_path, rte):
    with pytest.raises(XLNetError, match="is a directory, not a file"):
        evaluate_predictions("rte", rte, tmp_path)


def test_cli_predictions_and_model_exclude_each_other(tmp_path, rte, capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--task", "rte", "--data", str(rte), "--predictions", "p.tsv", "--model", "m"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--task", "rte", "--data", str(rte)])  # one of the two is required


def test_predicted_labels_outside_the_label_set_and_loose_na_probs(tmp_path, rte):
    """A prediction that is not one of the task's labels, a SQuAD 2.0 no-answer file that misses a question or
    holds NaN, and --na-probs for another task: each a one-line error, not a quiet score."""
    pred = write(tmp_path / "p.tsv", "index\tprediction\n0\tmaybe\n1\tentailment\n")
    with pytest.raises(XLNetError, match=r"p\.tsv:2: predicted label 'maybe' is not one of entailment, "
                                         r"not_entailment"):
        evaluate_predictions("rte", rte, pred)
    with pytest.raises(XLNetError, match="--na-probs is for SQuAD 2.0"):
        evaluate_predictions("rte", rte, pred, tmp_path / "na.json")
    gold = squad2_gold(tmp_path)
    preds = write(tmp_path / "pred.json", json.dumps({"a": "Paris", "b": ""}))
    with pytest.raises(XLNetError, match="no no-answer probability for question 'b'"):
        evaluate_predictions("squad2", gold, preds, write(tmp_path / "na.json", json.dumps({"a": 0.2})))
    with pytest.raises(XLNetError, match="for 'b' is not a finite number"):
        evaluate_predictions("squad2", gold, preds, write(tmp_path / "na.json", '{"a": 0.2, "b": NaN}'))
