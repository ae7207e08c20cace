"""`xlnet convert --from-tf` / `--to-tf`: original (TensorFlow) XLNet checkpoints, against the original code's own
outputs and TensorFlow's own files.

tests/data/tf_xlnet holds checkpoints written by TensorFlow's Saver from the original implementation's graphs
(zihangdai/xlnet modeling.py and function_builder.py; tests/data/make_tf_checkpoint.py made them) and what those
graphs computed: the two-stream pretraining pass with memory, padding and segments (with and without bi_data;
causal with same_length and clamp_len; untie_r false with relu), with every variable's gradient, and the inference
outputs of the original fine-tuning heads (GLUE, SQuAD, RACE). The writer's oracle is those files themselves:
TF's bytes, reproduced. (tests/data/check_tf_export.py runs the original graphs on our exports, outside these
tests, as TensorFlow is not a dependency: every output equal.)"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xlnet.checkpoint import load_model
from xlnet.cli import main
from xlnet.heads import ARCHITECTURES
from xlnet.tf_checkpoint import (NOT_WEIGHTS, body_weights, checkpoint_prefix, load_tf_model, read_bundle,
                                 read_table, table_bytes, unmasked_crc, write_bundle)
from xlnet.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer

from helpers import tiny_config

DATA = Path(__file__).parent / "data" / "tf_xlnet"
PRETRAINED, CLASSIFIER = DATA / "pretrained", DATA / "classifier"
TOL = dict(rtol=1e-5, atol=5e-6)  # float32: the original and ours sum in different orders


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    with np.load(DATA / "expected.npz", allow_pickle=False) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def batch_first(e: dict[str, torch.Tensor], two_stream: bool) -> dict:
    """The original's time-major inputs ([len, bsz], perm_mask [i, j, b], ...) in our (HF's) layout."""
    kw = dict(token_type_ids=e["seg_id"].T.long(), attention_mask=1 - e["input_mask"].T)
    if two_stream:
        kw.update(perm_mask=e["perm_mask"].permute(2, 0, 1), target_mapping=e["target_mapping"].permute(2, 0, 1),
                  mems=[m.transpose(0, 1) for m in e["mems"]])
    return kw


def reconfigured(model: torch.nn.Module, **changes) -> torch.nn.Module:
    """The same weights in a model whose config has `changes` (the run's settings, not in a TF config), eval mode."""
    ours = type(model)(dataclasses.replace(model.config, **changes)).eval()
    ours.load_state_dict(model.state_dict())
    return ours


def copy_fixture(tmp_path: Path, which: Path) -> Path:
    return Path(shutil.copytree(which, tmp_path / which.name))


# the pretraining graph's settings (make_tf_checkpoint.VARIANTS), which the original config file does not hold;
# _tied: a checkpoint of its own, untie_r false (one set of r_w/r_r/r_s biases for all layers) with relu
VARIANTS = {"": dict(), "_bi": dict(bi_data=True), "_uni": dict(attn_type="uni", same_length=True, clamp_len=3),
            "_tied": dict()}


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("tag", list(VARIANTS))
def test_pretrained_checkpoint_computes_what_the_original_code_computed(expected, impl, tag):
    model, notes = load_tf_model(DATA / "pretrained_tied" if tag == "_tied" else PRETRAINED)
    assert notes == [] and type(model).__name__ == "XLNetLMHeadModel"
    # the original's gelu is the tanh approximation
    assert (model.config.ff_activation, model.config.untie_r) == (("relu", False) if tag == "_tied" else
                                                                  ("gelu_new", True))
    ours = reconfigured(model, mem_len=4, reuse_len=4, attn_impl=impl, **VARIANTS[tag])
    out = ours(expected["input_ids"].T.long(), **batch_first(expected, two_stream=True))
    torch.testing.assert_close(out.last_hidden_state.detach().transpose(0, 1), expected["query_stream" + tag], **TOL)
    torch.testing.assert_close(torch.stack([m.transpose(0, 1) for m in out.mems]), expected["new_mems" + tag], **TOL)
    loss = F.cross_entropy(out.logits.flatten(0, 1), expected["target"].T.flatten().long(), reduction="none")
    torch.testing.assert_close(loss.detach().view(2, -1).T, expected["lm_loss" + tag], **TOL)
    # the training signal too: TF's gradients, named ours by the conversion's own mapping
    loss.sum().backward()
    tf_grads = {k.split(":", 1)[1]: v for k, v in expected.items() if k.startswith(f"grad{tag}:")}
    want = {"lm_loss.bias": tf_grads.pop("model/lm_loss/bias"),
            **body_weights(tf_grads, ours.config, PRETRAINED)}
    assert not tf_grads and set(want) | {"lm_loss.weight"} == set(ours.state_dict())  # (tied to the embedding)
    for name, param in ours.named_parameters():  # a bias shared by the layers: once, its gradient summed
        torch.testing.assert_close(param.grad, want[name], **TOL, msg=lambda m: f"{name}: {m}")


def test_classifier_through_the_cli_then_to_hugging_face(expected, tmp_path, capsys):
    """run_classifier's checkpoint (found through TF's `checkpoint` file) -> ours -> HF: the same logits as the
    original graph at every stop."""
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    assert main(["convert", "--from-tf", str(CLASSIFIER), str(ours_dir)]) == 0
    err = capsys.readouterr().err
    assert "no mask_emb" in err and "no tokenizer exported" in err
    model = load_model(ours_dir).eval()
    assert type(model).__name__ == "XLNetForSequenceClassification" and model.config.num_labels == 3
    inputs = (expected["input_ids"].T.long(),)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs, **batch_first(expected, False)).logits, expected["class_logits"],
                                   **TOL)
    assert main(["convert", "--to-hf", str(ours_dir), str(hf_dir)]) == 0
    from transformers import XLNetForSequenceClassification

    hf = XLNetForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(*inputs, **batch_first(expected, False)).logits, expected["class_logits"],
                                   **TOL)


def finetuned(which: str, **config) -> torch.nn.Module:
    model, notes = load_tf_model(DATA / which)
    assert len(notes) == 1 and "no mask_emb" in notes[0], notes
    return reconfigured(model, **config)


def test_squad_checkpoint_decodes_as_the_original(expected):
    """run_squad.py's inference outputs: top starts, top ends for each, answerability. The original returns
    log-probabilities with each start's ends together ([start, end]); ours (as HF's) probabilities with the
    ends outermost ([end, start])."""
    model = finetuned("squad", start_n_top=2, end_n_top=2)
    assert type(model).__name__ == "XLNetForQuestionAnswering"
    with torch.no_grad():
        out = model(expected["input_ids"].T.long(), p_mask=expected["p_mask"],
                    cls_index=torch.full((2,), expected["input_ids"].shape[0] - 1), **batch_first(expected, False))
    torch.testing.assert_close(out.start_top_log_probs.log(), expected["squad_start_top_log_probs"], **TOL)
    assert torch.equal(out.start_top_index, expected["squad_start_top_index"].long())
    as_original = lambda t: t.view(2, 2, 2).transpose(1, 2).reshape(2, 4)  # noqa: E731  [end, start] -> [start, end]
    torch.testing.assert_close(as_original(out.end_top_log_probs).log(), expected["squad_end_top_log_probs"], **TOL)
    assert torch.equal(as_original(out.end_top_index), expected["squad_end_top_index"].long())
    torch.testing.assert_close(out.cls_logits, expected["squad_cls_logits"], **TOL)


def test_race_checkpoint_scores_choices_as_the_original(expected):
    model = finetuned("race")
    assert type(model).__name__ == "XLNetForMultipleChoice"
    choices = lambda t: t.view(2, 4, -1)  # noqa: E731  run_race.py's [bsz, 4 * len]
    with torch.no_grad():
        logits = model(choices(expected["race_ids"]).long(), token_type_ids=choices(expected["race_seg"]).long(),
                       attention_mask=1 - choices(expected["race_mask"])).logits
    torch.testing.assert_close(logits, expected["race_logits"], **TOL)


def test_spiece_model_beside_the_checkpoint_travels(tmp_path):
    """The release ships spiece.model beside the checkpoint: it becomes our tokenizer, with XLNet's defaults
    (cased, accents stripped, spaces collapsed), unless --tokenizer names another."""
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\nthe dog ate the cat food\n" * 50)
    tok_dir = train_tokenizer([text], tmp_path / "tok", vocab_size=30)
    src = copy_fixture(tmp_path, PRETRAINED)
    shutil.copyfile(tok_dir / MODEL_FILE, src / MODEL_FILE)
    assert main(["convert", "--from-tf", str(src / "xlnet_model.ckpt"), str(tmp_path / "out")]) == 0
    tok = Tokenizer.load(tmp_path / "out")
    assert (tok.lowercase, tok.strip_accents, tok.remove_space) == (False, True, True)
    assert (tmp_path / "out" / MODEL_FILE).read_bytes() == (tok_dir / MODEL_FILE).read_bytes()


def test_moved_run_directory_and_explicit_prefix_or_file(tmp_path):
    """TF's `checkpoint` file may name the run's old absolute path: the same file name beside it is used."""
    src = copy_fixture(tmp_path, CLASSIFIER)
    (src / "checkpoint").write_text('model_checkpoint_path: "/gone/run/model.ckpt-7"\n')
    assert checkpoint_prefix(src) == src / "model.ckpt-7"
    for name in ("model.ckpt-7", "model.ckpt-7.index", "model.ckpt-7.data-00000-of-00001"):  # prefix, or a file of it
        assert checkpoint_prefix(src / name) == src / "model.ckpt-7"
    shutil.copyfile(src / "model.ckpt-7.index", src / "model.ckpt-9.index")
    (src / "checkpoint").unlink()
    with pytest.raises(Exception, match="2 checkpoints .*name one by its prefix"):
        checkpoint_prefix(src)


def test_optimizer_state_is_not_read():
    names = ["global_step", "beta1_power", "model/transformer/r_w_bias/Adam_1", "model/lm_loss/bias/adam_m",
             "model/transformer/layer_0/ff/layer_1/kernel/adam_v", "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert all(NOT_WEIGHTS.search(n) for n in names)
    assert not any(NOT_WEIGHTS.search(n) for n in ["model/lm_loss/bias", "model/transformer/layer_0/ff/layer_1/kernel"])
    tensors = read_bundle(CLASSIFIER / "model.ckpt-7")
    assert tensors["global_step"].item() == 7  # TF's own counter, read as written


def test_masked_crc_round_trip():
    """LevelDB's mask: rotate right by 15, add a constant; the unmask inverts it for every value."""
    for crc in (0, 1, 0xFFFFFFFF, 0x12345678, 0xE3069283):
        masked = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
        assert unmasked_crc(masked) == crc


def corrupt(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: corrupt(d / "xlnet_model.ckpt.data-00000-of-00001", 100), "corrupt \\(CRC32C of tensor"),
    (lambda d: (d / "xlnet_model.ckpt.data-00000-of-00001").write_bytes(
        (d / "xlnet_model.ckpt.data-00000-of-00001").read_bytes()[:5000]), "truncated"),
    (lambda d: (d / "xlnet_model.ckpt.data-00000-of-00001").unlink(), "not found \\(the checkpoint's data shard"),
    (lambda d: corrupt(d / "xlnet_model.ckpt.index", 40), "corrupt \\(CRC32C of the block"),
    (lambda d: (d / "xlnet_model.ckpt.index").write_bytes(b"not a table" * 10), "not a TensorFlow checkpoint index"),
    (lambda d: (d / "xlnet_config.json").unlink(), "xlnet_config.json: not found"),
    (lambda d: (d / "xlnet_config.json").write_text('{"vocab_size": 37}'), "not an original XLNet config"),
    (lambda d: (d / "xlnet_config.json").write_text((d / "xlnet_config.json").read_text().replace(
        '"n_layer": 2', '"n_layer": 3')), "r_w_bias has shape \\(2, 3, 4\\), without the layer axis of 3"),
    (lambda d: (d / "xlnet_config.json").write_text((d / "xlnet_config.json").read_text().replace(
        '"n_token": 37', '"n_token": 40')), "word_embedding.weight has shape \\(37, 12\\)"),
])
def test_bad_checkpoints_fail_with_one_line(tmp_path, capsys, damage, message):
    src = copy_fixture(tmp_path, PRETRAINED)
    damage(src)
    assert main(["convert", "--from-tf", str(src), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_tf_config_flag_needs_from_tf(tmp_path, capsys):
    assert main(["convert", "--to-hf", str(PRETRAINED), str(tmp_path / "x"), "--tf-config", "c.json"]) != 0
    assert "--tf-config goes with --from-tf" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --to-tf
FIXTURES = {"pretrained": "xlnet_model.ckpt", "pretrained_tied": "xlnet_model.ckpt", "classifier": "model.ckpt-7",
            "squad": "model.ckpt-11", "race": "model.ckpt-13"}


def files(prefix: Path) -> tuple[bytes, bytes]:
    return tuple(prefix.with_name(prefix.name + ext).read_bytes() for ext in (".index", ".data-00000-of-00001"))


@pytest.mark.parametrize("which", list(FIXTURES))
def test_writer_reproduces_tensorflows_files_byte_for_byte(tmp_path, which):
    """The index (table blocks, restart points, the index block's shortened key, footer; BundleEntryProtos with
    CRCs) and the data shard: what TF's Saver wrote, to the byte (global_step included)."""
    src = DATA / which / FIXTURES[which]
    write_bundle(tmp_path / "x.ckpt", read_bundle(src))
    assert files(tmp_path / "x.ckpt") == files(src)


@pytest.mark.parametrize("block_size", [1, 100, 4096])
def test_tables_of_many_blocks_read_back(tmp_path, block_size):
    """Blocks split as LevelDB splits them (TF's reader read such a table of 3,500 variables in 512-byte blocks);
    keys sharing prefixes across restart points; a key that is a prefix of the next (no shorter separator); UTF-8."""
    rng = np.random.default_rng(0)
    items = {f"model/transformer/layer_{i}/ff/layer_{j}/kernel".encode(): rng.bytes(int(rng.integers(0, 40)))
             for i in range(40) for j in range(1, 5)}
    items.update({"a/é".encode(): b"1", "a/é/b".encode(): b"", b"a/z": b"2"})
    (tmp_path / "t").write_bytes(table_bytes(sorted(items.items()), block_size))
    assert read_table(tmp_path / "t") == {k.decode(): v for k, v in items.items()}


def test_pretrained_round_trip_through_ours_is_byte_identical(tmp_path, capsys):
    """TF -> ours -> TF for the release's layout: the same two files, plus xlnet_config.json and TF's state file."""
    assert main(["convert", "--from-tf", str(PRETRAINED), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-tf", str(tmp_path / "ours"), str(tmp_path / "tf")]) == 0
    err = capsys.readouterr().err
    assert "--dropout=0.1 --dropatt=0.1 --clamp_len=-1 --mem_len=0 --bi_data=False --same_length=False" in err
    assert files(tmp_path / "tf" / "xlnet_model.ckpt") == files(PRETRAINED / "xlnet_model.ckpt")
    assert (tmp_path / "tf" / "xlnet_config.json").read_text() == (PRETRAINED / "xlnet_config.json").read_text()
    assert checkpoint_prefix(tmp_path / "tf") == tmp_path / "tf" / "xlnet_model.ckpt"


@pytest.mark.parametrize("which", ["pretrained_tied", "classifier", "squad", "race"])
def test_finetuned_round_trip_keeps_every_variable(tmp_path, capsys, which):
    """Every weight the original saved comes back equal, under its name; fine-tuned checkpoints gain the fresh
    mask_emb (unused by their graphs); the step counter is not written. A Hugging Face directory exports alike."""
    src = DATA / which
    assert main(["convert", "--from-tf", str(src), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    for start in ("ours", "hf"):
        task = ["--tf-task", "demo"] if which == "classifier" else []
        assert main(["convert", "--to-tf", str(tmp_path / start), str(tmp_path / f"tf-{start}"), *task]) == 0
        got = read_bundle(tmp_path / f"tf-{start}" / "xlnet_model.ckpt")
        want = read_bundle(checkpoint_prefix(src), keep=lambda name: not NOT_WEIGHTS.search(name))
        assert set(got) - set(want) == (set() if which == "pretrained_tied" else {"model/transformer/mask_emb/mask_emb"})
        assert set(want) <= set(got)
        for name, value in want.items():
            assert torch.equal(got[name], value), name
    if which == "classifier":
        assert "model/classification_demo/ (run_classifier.py finds it with --cls_scope=demo)" in capsys.readouterr().err


@pytest.mark.parametrize("architecture, num_labels", [("XLNetLMHeadModel", 2), ("XLNetForSequenceClassification", 1),
                                                      ("XLNetForSequenceClassification", 3),
                                                      ("XLNetForQuestionAnswering", 2), ("XLNetForMultipleChoice", 2)])
def test_our_models_survive_the_original_format(tmp_path, capsys, architecture, num_labels):
    """Ours -> TF -> ours: the same tensors and outputs, shared biases (untie_r false) and a regression head
    (run_classifier's regression_<task> scope) included."""
    model = ARCHITECTURES[architecture](tiny_config(num_labels=num_labels, untie_r=num_labels != 3,
                                                    ff_activation="gelu_new")).eval()
    model.save_pretrained(tmp_path / "ours")
    assert main(["convert", "--to-tf", str(tmp_path / "ours"), str(tmp_path / "tf"), "--tf-task", "STS-B"]) == 0
    if num_labels == 1:
        assert "model/regression_sts-b/ (run_classifier.py finds it with --task_name=sts-b)" in capsys.readouterr().err
    back, _ = load_tf_model(tmp_path / "tf")
    assert type(back).__name__ == architecture and back.config.untie_r == model.config.untie_r
    assert back.config.num_labels == model.config.num_labels or architecture != "XLNetForSequenceClassification"
    want = model.state_dict()
    assert set(back.state_dict()) == set(want)
    for name, value in back.state_dict().items():
        assert torch.equal(value, want[name]), name
    ids = torch.randint(0, model.config.vocab_size, (2, 3, 7) if architecture == "XLNetForMultipleChoice" else (2, 7))
    with torch.no_grad():
        got, want_out = vars(reconfigured(back, attn_impl="reference")(ids)), vars(model(ids))
    outputs = [k for k, v in want_out.items() if isinstance(v, torch.Tensor)]
    assert outputs and all(torch.equal(got[k], want_out[k]) for k in outputs), outputs


def test_notes_and_refusals(tmp_path, capsys):
    """What the original cannot hold is said in one line: exact gelu (written as the original's tanh gelu),
    a token-classification head (body only), causal attention (its scripts fix bi), silu (refused, nothing
    written); --tf-task needs --to-tf; a
    destination that is not a previous export is left alone."""
    for name, config in [("gelu", tiny_config(ff_activation="gelu", attn_type="uni")),
                         ("silu", tiny_config(ff_activation="silu"))]:
        ARCHITECTURES["XLNetForTokenClassification"](config).save_pretrained(tmp_path / name)
    assert main(["convert", "--to-tf", str(tmp_path / "gelu"), str(tmp_path / "tf")]) == 0
    err = capsys.readouterr().err
    assert "gelu (exact) is written as the original's gelu" in err and "no token-classification head" in err
    assert "attn_type uni: the original scripts always attend both ways" in err
    assert main(["convert", "--to-tf", str(tmp_path / "gelu"), str(tmp_path / "tf")]) == 0  # replaces its own output
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for args, message in [(["silu", "out"], "silu has no counterpart"), (["gelu", "mine"], "mine: exists and is not"),
                          (["gelu", "out", "--tf-task", "x"], None)]:
        argv = ["convert", "--to-tf", str(tmp_path / args[0]), str(tmp_path / args[1]), *args[2:]]
        if message is None:  # --tf-task without --to-tf
            argv[1], message = "--to-hf", "--tf-task goes with --to-tf"
        assert main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_tokenizer_goes_with_the_export(tmp_path, capsys):
    """spiece.model beside the checkpoint, as released; a lowercasing tokenizer says --uncased."""
    text = tmp_path / "text.txt"
    text.write_text("The Cat sat on the mat\nthe dog ate the cat food\n" * 50)
    tok_dir = train_tokenizer([text], tmp_path / "tok", vocab_size=30, lowercase=True)
    ARCHITECTURES["XLNetLMHeadModel"](tiny_config()).save_pretrained(tmp_path / "ours")
    assert main(["convert", "--to-tf", str(tmp_path / "ours"), str(tmp_path / "tf"), "--tokenizer", str(tok_dir)]) == 0
    assert (tmp_path / "tf" / MODEL_FILE).read_bytes() == (tok_dir / MODEL_FILE).read_bytes()
    assert "--uncased=True" in capsys.readouterr().err
