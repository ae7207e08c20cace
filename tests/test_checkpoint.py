"""Model directories: save/load, HF interop both ways, and clear errors for directories that do not fit."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xlnet.checkpoint import DIGEST_KEY, load_model
from xlnet.cli import main
from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.fileio import sha256_file
from xlnet.heads import ARCHITECTURES, XLNetForSequenceClassification, XLNetForTokenClassification
from xlnet.interop import convert
from xlnet.model import XLNetLMHeadModel

import transformers  # noqa: E402


def small(**kw) -> XLNetConfig:
    return XLNetConfig(**{**dict(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32,
                                 dropout=0.0, dropatt=0.0, summary_last_dropout=0.0), **kw})


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(9, 50, (2, 7), generator=g)
    return {"input_ids": ids, "token_type_ids": (torch.arange(7) > 3).long().expand(2, 7)}


def outputs(model, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**x)
    return out.logits if out.logits is not None else (out.start_top_log_probs if out.last_hidden_state is None
                                                      or out.start_top_log_probs is not None
                                                      else out.last_hidden_state)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_save_load_identical_outputs(arch: str, tmp_path: Path) -> None:
    cls = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = cls(small())
    x = inputs()
    if arch == "XLNetForMultipleChoice":
        x = {k: v[None] for k, v in x.items()}
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is cls
    assert torch.equal(outputs(model, x), outputs(loaded, x))
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir()), "temp files left behind"


@pytest.mark.parametrize("untie_r", [True, False])
@pytest.mark.parametrize("arch", ["XLNetLMHeadModel", "XLNetForSequenceClassification", "XLNetForQuestionAnswering"])
def test_hf_to_ours_to_hf_is_bit_identical(arch: str, untie_r: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf_cls = getattr(transformers, arch)
    hf = hf_cls(transformers.XLNetConfig(**small(untie_r=untie_r).to_hf_dict()))
    if not untie_r:  # HF stores a copy per layer; a faithful untie_r=false checkpoint has them equal
        with torch.no_grad():
            for layer in hf.transformer.layer[1:]:
                for name in ("r_w_bias", "r_r_bias", "r_s_bias"):
                    getattr(layer.rel_attn, name).copy_(getattr(hf.transformer.layer[0].rel_attn, name))
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and HF itself reads the exported directory, giving the same outputs as ours
    again = hf_cls.from_pretrained(tmp_path / "back")
    ours = load_model(tmp_path / "ours")
    x = inputs()
    hf.eval(), again.eval()
    with torch.no_grad():
        ref = hf(**x)
        got = again(**x)
    key = "logits" if arch != "XLNetForQuestionAnswering" else "start_top_log_probs"
    assert torch.equal(getattr(ref, key), getattr(got, key))
    assert (getattr(ref, key) - outputs(ours, x)).abs().max() < 1e-5


def test_hf_half_precision_round_trip_keeps_dtype(tmp_path: Path) -> None:
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**small().to_hf_dict())).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", to_hf=False)
    convert(tmp_path / "ours", tmp_path / "back", to_hf=True)
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_legacy_pytorch_bin_loads_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**small().to_hf_dict())).eval()
    d = tmp_path / "legacy"
    d.mkdir()
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = load_model(d)
    x = inputs()
    with torch.no_grad():
        assert (hf(**x).logits - outputs(ours, x)).abs().max() < 1e-5


def test_lm_checkpoint_into_classifier_initialises_only_the_head(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    lm = XLNetLMHeadModel(small())
    lm.save_pretrained(tmp_path / "lm")
    clf = XLNetForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=5)
    assert clf.logits_proj.out_features == 5
    assert torch.equal(clf.transformer.word_embedding.weight, lm.transformer.word_embedding.weight)
    assert "initialised fresh" in capsys.readouterr().err
    with pytest.raises(XLNetError, match="missing"):
        XLNetForSequenceClassification.from_pretrained(tmp_path / "lm", strict=True)
    with pytest.MonkeyPatch.context() as mp:  # under torchrun only rank 0 says it
        mp.setenv("RANK", "1")
        XLNetForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=5)
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("source,target,labels,says", [
    ("XLNetForSequenceClassification", "XLNetForSequenceClassification", 2,
     "logits_proj.weight is (3, 16) in the file but (2, 16) here; logits_proj.bias is (3,) in the file but (2,)"),
    ("XLNetForSequenceClassification", "XLNetForMultipleChoice", 1, "logits_proj.weight is (3, 16) in the file"),
    ("XLNetForSequenceClassification", "XLNetForTokenClassification", 5,
     "classifier not in the file; the file's logits_proj, sequence_summary (another head) not used"),
    ("XLNetForQuestionAnswering", "XLNetForSequenceClassification", 1,
     "logits_proj, sequence_summary not in the file; the file's answer_class, end_logits, start_logits (another "
     "head) not used"),
    ("XLNetForSequenceClassification", "XLNetForSequenceClassification", 3, None),  # fits: loaded whole, no note
])
def test_reinit_head_keeps_the_body_and_says_which_head_tensors_start_fresh(source: str, target: str, labels: int,
                                                                           says: str | None, tmp_path: Path,
                                                                           capsys) -> None:
    """Fine-tuning a fine-tuned model for another task (reinit_head): the body loads, head tensors that fit load,
    the rest start fresh, and one line says which and why, even when not verbose."""
    torch.manual_seed(0)
    src = ARCHITECTURES[source](small(num_labels=3))
    src.save_pretrained(tmp_path / "m")
    model = ARCHITECTURES[target].from_pretrained(tmp_path / "m", verbose=False, reinit_head=True, num_labels=labels)
    err = capsys.readouterr().err.strip()
    if says is None:
        assert err == "" and all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())
        return
    assert len(err.splitlines()) == 1 and err.startswith("note: ") and says in err, err
    state = model.state_dict()
    for key, value in src.state_dict().items():
        if key.startswith("transformer.") or (key in state and state[key].shape == value.shape):
            assert torch.equal(state[key], value), key  # the body, and the head tensors that fit
    # without reinit_head (evaluate, convert, distill's teacher) a head that does not fit stays an error
    if "here" in says:
        with pytest.raises(XLNetError, match="has shape"):
            ARCHITECTURES[target].from_pretrained(tmp_path / "m", num_labels=labels)


@pytest.mark.parametrize("head,layer", [(XLNetForSequenceClassification, "logits_proj"),
                                        (XLNetForTokenClassification, "classifier")])
def test_reinit_head_starts_the_label_layer_fresh_for_other_label_names(head: type, layer: str, tmp_path: Path,
                                                                     capsys) -> None:
    """QNLI's fine-tuned model for SST-2: both 2 labels, so the shapes fit, but row 0 meant 'entailment', not '0'.
    The label layer starts fresh (the rest of the head and the body load) and one line says why; the same names
    (continuing a task) load whole."""
    torch.manual_seed(0)
    src = head(small(num_labels=2, label_names=["entailment", "not_entailment"]))
    src.save_pretrained(tmp_path / "m")
    same = head.from_pretrained(tmp_path / "m", verbose=False, reinit_head=True, num_labels=2,
                                label_names=["entailment", "not_entailment"])
    assert capsys.readouterr().err == ""
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in src.state_dict().items())
    other = head.from_pretrained(tmp_path / "m", verbose=False, reinit_head=True, num_labels=2, label_names=["0", "1"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{layer}.weight was trained for labels [entailment, not_entailment], " \
        "not [0, 1]" in err, err
    for key, value in src.state_dict().items():
        if key != f"{layer}.bias":  # a fresh bias is zeros, as the trained one still is here
            assert torch.equal(other.state_dict()[key], value) != key.startswith(f"{layer}."), key


def test_reinit_head_still_refuses_a_body_that_does_not_fit(tmp_path: Path) -> None:
    XLNetForSequenceClassification(small(num_labels=3)).save_pretrained(tmp_path / "m")
    with pytest.raises(XLNetError, match=r"transformer\.layer\.0\.ff\.layer_1\.weight has shape"):
        XLNetForSequenceClassification.from_pretrained(tmp_path / "m", reinit_head=True, num_labels=2, d_inner=48)


def test_config_that_does_not_match_weights_names_the_tensor(tmp_path: Path, capsys) -> None:
    XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["d_inner"] = 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(XLNetError, match=r"tensor transformer\.layer\.0\.ff\.layer_1\.weight has shape"):
        load_model(tmp_path / "m")
    assert main(["convert", "--to-hf", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer_1.weight" in err
    assert not (tmp_path / "out").exists()
    cfg["d_inner"], cfg["n_layer"] = 32, 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(XLNetError, match=r"tensor transformer\.layer\.1\..* is not part of a model"):
        load_model(tmp_path / "m")


def test_missing_and_corrupt_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(XLNetError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("not a model")
    with pytest.raises(XLNetError, match="file: is a file, not a model directory"):
        load_model(tmp_path / "file")
    XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(XLNetError, match="cannot read weights"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(XLNetError, match="not valid JSON"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("poison, message", [(lambda t: t.fill_(float("nan")), "holds NaN or infinite values"),
                                            (lambda t: t.to(torch.int32), "is torch.int32, not floating point")])
def test_weights_that_cannot_train_name_the_tensor(poison, message: str, tmp_path: Path) -> None:
    """NaN or integer weights (written by other code: ours never saves them) are refused on load, naming the
    tensor, rather than surfacing as a NaN loss that blames the learning rate."""
    XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = load_file(str(path))
    key = "transformer.layer.0.ff.layer_1.weight"
    weights[key] = poison(weights[key])
    save_file(weights, str(path))
    with pytest.raises(XLNetError, match=re.escape(f"tensor {key} {message}")):
        load_model(tmp_path / "m")


def test_untied_biases_that_differ_are_rejected_for_untie_r_false(tmp_path: Path) -> None:
    model = XLNetLMHeadModel(small(untie_r=False))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["transformer.layer.1.rel_attn.r_w_bias"] += 1
    save_file(tensors, str(path))
    with pytest.raises(XLNetError, match="r_w_bias differs"):
        load_model(tmp_path / "m")


def test_our_config_json_round_trip_and_hf_config_mapping(tmp_path: Path) -> None:
    cfg = small(label_names=["neg", "pos"], mem_len=8, reuse_len=4, bi_data=True)
    cfg.save(tmp_path / "c.json")
    assert XLNetConfig.load(tmp_path / "c.json") == cfg
    hf = transformers.XLNetConfig(**cfg.to_hf_dict())
    back = XLNetConfig.from_hf_dict(hf.to_dict())
    assert back.label_names == ["neg", "pos"] and back.mem_len == 8 and back.bi_data
    with pytest.raises(XLNetError, match="unknown config key"):
        XLNetConfig.from_dict({"d_model": 16, "bogus": 1})
    with pytest.raises(XLNetError, match="c.json: a 'bert' model, not XLNet"):
        XLNetConfig.from_dict(transformers.BertConfig().to_dict(), source="c.json")


@pytest.mark.parametrize("edit, message", [
    ({"n_head": "four"}, "c.json: n_head must be an integer, not 'four'"),
    ({"bi_data": "maybe"}, "c.json: bi_data must be true or false"),
    ({"ff_activation": "swishy"}, "c.json: ff_activation must be one of 'gelu', 'relu', 'gelu_new', 'silu'")])
def test_config_json_values_are_typed(edit: dict, message: str) -> None:
    """A hand-edited config.json (ours or Hugging Face's) with a value of the wrong type or an unknown activation
    is a one-line error naming the file and key, not a TypeError or KeyError when the model is built."""
    with pytest.raises(XLNetError, match=re.escape(message)):
        XLNetConfig.from_dict({**small().to_dict(), **edit}, source="c.json")
    hf = {**small().to_hf_dict(), **edit}
    with pytest.raises(XLNetError, match=re.escape(message)):
        XLNetConfig.from_dict(hf, source="c.json")


def test_hf_config_with_another_summary_is_refused() -> None:
    """Our heads summarize a sequence by its last token (<cls>); a Hugging Face model that used another summary
    would load and silently mean something else."""
    hf = {**small().to_hf_dict(), "summary_type": "mean"}
    with pytest.raises(XLNetError, match="c.json: summary_type 'mean' is not supported"):
        XLNetConfig.from_dict(hf, source="c.json")


def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data starts: after the 8-byte header length and the header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_weights_record_their_sha256_and_a_flipped_data_byte_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta[DIGEST_KEY] == sha256_file(path, offset=_data_offset(path))
    load_model(tmp_path / "m")  # unmodified: loads
    data = bytearray(path.read_bytes())
    data[(_data_offset(path) + len(data)) // 2] ^= 0x10  # inside the tensors, header untouched
    path.write_bytes(bytes(data))
    with pytest.raises(XLNetError, match=r"m/model.safetensors: weights are corrupt \(sha256 of the tensor data"):
        XLNetLMHeadModel.from_pretrained(tmp_path / "m")
    assert main(["convert", "--to-hf", str(tmp_path / "m"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors: weights are corrupt" in err
    assert not (tmp_path / "out").exists()


def test_weights_without_a_recorded_sha256_load_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = XLNetLMHeadModel(small())
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})  # as HF or an older version wrote it
    x = inputs()
    assert torch.equal(outputs(model, x), outputs(load_model(tmp_path / "m"), x))
    raw = path.read_bytes()  # a header whose metadata is null (safetensors accepts it)
    header = json.loads(raw[8:_data_offset(path)])
    header["__metadata__"] = None
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[_data_offset(path):])
    assert torch.equal(outputs(model, x), outputs(load_model(tmp_path / "m"), x))


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
        convert(tmp_path / "m", tmp_path / "hf", to_hf=True)
    finally:
        os.umask(old)
    for d in (tmp_path / "m", tmp_path / "hf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in d.iterdir()} == \
            {"config.json": "0o644", "model.safetensors": "0o644"}


def test_convert_never_replaces_what_is_not_a_model_directory(tmp_path: Path, capsys) -> None:
    XLNetLMHeadModel(small()).save_pretrained(tmp_path / "m")
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for dst, message in ((user, "userdir: exists and is not a model directory (no config.json); choose another "
                                "path or remove it"), (notes, "notes.txt: exists and is not a directory")):
        assert main(["convert", "--to-hf", str(tmp_path / "m"), str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes.txt", "userdir"]  # no temp or .old left
    # its own previous output (and an empty directory) is replaced whole
    (tmp_path / "hf").mkdir()
    assert main(["convert", "--to-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "stale.bin").write_text("from the last run")
    assert main(["convert", "--to-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    load_model(tmp_path / "hf")
