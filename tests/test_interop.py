"""`xlnet convert` and the tokenizer: an HF export loads in transformers with our ids; a pretraining checkpoint's run
tokenizer goes along; ours -> HF -> ours keeps the tokenizer's behaviour. (Weights: tests/test_checkpoint.py.)"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from xlnet.checkpoint import load_model
from xlnet.cli import main
from xlnet.config import XLNetConfig
from xlnet.fileio import sha256_file
from xlnet.finetune import FinetuneConfig, build_model, check_vocab, load_tokenizer, save_model_dir
from xlnet.heads import XLNetForSequenceClassification
from xlnet.model import XLNetLMHeadModel
from xlnet.tasks import get_task
from xlnet.tokenizer import MODEL_FILE, SETTINGS_FILE, Tokenizer, batch_inputs, preprocess_text, train_tokenizer

import transformers  # noqa: E402

HF_MAJOR = int(transformers.__version__.split(".")[0])
WORDS = ("Café naïve résumé élan Zoë façade garçon Ångström the river STONE quiet Bright garden window music "
         "Paris Berlin said hello world").split()
# upper case, accents (composed and decomposed), runs of spaces, tabs, `` '' quotes, a ligature (NFKC)
PLAIN = ["Hello World", "  the   RIVER\tstone  ", "He said ``hello'' in Paris", "the ﬁne garden"]
ACCENTED = ["Café naïve résumé", "ÉLAN  Zoë", "Ångstro\u0308m façade"]


def small(vocab_size: int, **kw) -> XLNetConfig:
    return XLNetConfig(vocab_size=vocab_size, d_model=16, n_layer=2, n_head=2, d_head=8, d_inner=32, **kw)


@pytest.fixture(scope="module")
def toks(tmp_path_factory) -> dict[str, Path]:
    """Two tokenizers trained on the same mixed-case, accented text: uncased (lowercase + accents stripped) and
    cased (accents kept, `xlnet tokenizer train`'s default)."""
    root = tmp_path_factory.mktemp("toks")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)) + "\n",
                    encoding="utf-8")
    return {"uncased": train_tokenizer([text], root / "uncased", vocab_size=80, lowercase=True, strip_accents=True,
                                       num_threads=1),
            "cased": train_tokenizer([text], root / "cased", vocab_size=80, num_threads=1)}


def finetuned(tok_dir: Path, out: Path) -> Path:
    """A directory as `xlnet finetune` writes best/: weights, spiece.model, our tokenizer.json, finetune.json."""
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = XLNetForSequenceClassification(small(tok.vocab_size, num_labels=3))
    return save_model_dir(model, out, tok, {"task": "mnli", "labels": ["a", "b", "c"]})


def pretraining_checkpoint(tok_dir: Path, out: Path) -> Path:
    """A pretraining checkpoint: no tokenizer files, its run's tokenizer named in trainer_state.json (the fields
    `xlnet pretrain` writes and finetune.pretraining_tokenizer reads)."""
    XLNetLMHeadModel(small(Tokenizer.load(tok_dir).vocab_size)).save_pretrained(out)
    state = {"step": 1, "config": {"tokenizer_dir": str(tok_dir)},
             "identity": {"tokenizer_dir": sha256_file(tok_dir / MODEL_FILE)}}
    (out / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return out


@pytest.mark.parametrize("kind", ["uncased", "cased"])
def test_hf_export_loads_in_transformers_and_tokenizes_as_ours(kind: str, toks, tmp_path: Path) -> None:
    ours = Tokenizer.load(toks[kind])
    assert main(["convert", "--to-hf", str(finetuned(toks[kind], tmp_path / "ft")), str(tmp_path / "hf")]) == 0
    hf_dir = tmp_path / "hf"
    # HF reads a tokenizer.json as its own fast-tokenizer file: ours must not be there
    assert not (hf_dir / SETTINGS_FILE).exists()
    assert (hf_dir / MODEL_FILE).read_bytes() == ours.model_path.read_bytes()
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["padding_side"]) == ("XLNetTokenizer", "left")
    assert (config["do_lower_case"], config["keep_accents"], config["remove_space"]) == \
        (kind == "uncased", kind == "cased", True)
    transformers.AutoTokenizer.from_pretrained(hf_dir)  # the KeyError 'added_tokens' of our tokenizer.json
    hf = transformers.XLNetTokenizer.from_pretrained(hf_dir)
    for name, piece in (("unk", "<unk>"), ("cls", "<cls>"), ("sep", "<sep>"), ("pad", "<pad>"), ("mask", "<mask>")):
        assert getattr(hf, f"{name}_token_id") == ours.piece_to_id(piece), name
    for text in PLAIN:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text), text
    # model inputs: `A <sep> B <sep> <cls>`, segment ids 0/1/2, padded on the left
    a, b = ["Hello World", "the ﬁne river garden"], ["the river", "Paris"]
    for got, pairs in ((hf(a, b, padding=True), list(zip(a, b))), (hf(a, padding=True), [(t, None) for t in a])):
        want = batch_inputs([(ours.encode(x), ours.encode(y) if y else None) for x, y in pairs])
        assert got["input_ids"] == want["input_ids"].tolist()
        assert got["attention_mask"] == want["attention_mask"].tolist()
        # transformers 5 gives padding segment 0 (its XLNetTokenizer's 3 is reset by the base class): harmless, as
        # no real position attends to padding, so only the real positions' segments are compared
        real = want["attention_mask"].bool()
        assert torch.tensor(got["token_type_ids"])[real].tolist() == want["token_type_ids"][real].tolist()
    mismatched = [t for t in ACCENTED if hf.encode(t, add_special_tokens=False) != ours.encode(t)]
    if kind == "cased" and HF_MAJOR >= 5:
        # transformers 5's XLNetTokenizer strips accents whatever keep_accents says (README, known differences):
        # its ids are ours on the same text with the accents stripped
        for text in mismatched:
            assert hf.encode(text, add_special_tokens=False) == ours.encode(preprocess_text(text, strip_accents=True))
    else:
        assert not mismatched


def test_pretraining_checkpoint_exports_its_runs_tokenizer_and_round_trips(toks, tmp_path: Path, capsys) -> None:
    ckpt = pretraining_checkpoint(toks["uncased"], tmp_path / "step_00000001")
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "hf" / MODEL_FILE).read_bytes() == (toks["uncased"] / MODEL_FILE).read_bytes()
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is True
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    assert sorted(p.name for p in back.iterdir()) == ["config.json", "model.safetensors", MODEL_FILE, SETTINGS_FILE]
    # finetune takes the directory as it comes, with the run's tokenizer (before: the embedded one, vocab mismatch)
    cfg = FinetuneConfig(task="sst2", model=str(back), quiet=True)
    tok, ref = load_tokenizer(cfg), Tokenizer.load(toks["uncased"])
    assert (tok.lowercase, tok.strip_accents, tok.remove_space) == (True, True, True)
    check_vocab(build_model(cfg, get_task("sst2"), ["0", "1"]), tok, cfg)
    for text in PLAIN + ACCENTED:
        assert tok.encode(text) == ref.encode(text), text


@pytest.mark.parametrize("kind", ["uncased", "cased"])
def test_ours_to_hf_to_ours_keeps_the_tokenizer(kind: str, toks, tmp_path: Path) -> None:
    src = finetuned(toks[kind], tmp_path / "ft")
    assert main(["convert", "--to-hf", str(src), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, b = Tokenizer.load(src), Tokenizer.load(tmp_path / "back")
    assert (a.lowercase, a.strip_accents, a.remove_space) == (b.lowercase, b.strip_accents, b.remove_space)
    assert json.loads((tmp_path / "back" / SETTINGS_FILE).read_text())["format"] == "xlnet-tokenizer/1"
    assert (tmp_path / "back" / MODEL_FILE).read_bytes() == a.model_path.read_bytes()
    for text in PLAIN + ACCENTED:
        assert b.encode(text) == a.encode(text), text
    assert type(load_model(tmp_path / "back")) is XLNetForSequenceClassification


def test_a_run_tokenizer_that_moved_or_changed_is_not_exported_and_says_why(toks, tmp_path: Path, capsys) -> None:
    moved = tmp_path / "tok"
    shutil.copytree(toks["uncased"], moved)
    ckpt = pretraining_checkpoint(moved, tmp_path / "ckpt")
    shutil.copyfile(toks["cased"] / MODEL_FILE, moved / MODEL_FILE)  # same place, another tokenizer
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer was not exported" in err and "sha256 differs" in err, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    shutil.rmtree(moved)
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer was not exported" in err and "not found" in err, err

    # named with --tokenizer, the run's tokenizer is exported; another is refused before anything is written
    shutil.copytree(toks["cased"], moved)
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf2"), "--tokenizer", str(toks["uncased"])]) == 0
    assert (tmp_path / "hf2" / MODEL_FILE).read_bytes() == (toks["uncased"] / MODEL_FILE).read_bytes()
    assert main(["convert", "--to-hf", str(ckpt), str(tmp_path / "hf3"), "--tokenizer", str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tokenizer" in err and "sha256 differs" in err, err
    assert not (tmp_path / "hf3").exists()


def test_hf_directory_without_spiece_model_says_its_tokenizer_is_not_converted(tmp_path: Path, capsys) -> None:
    """transformers 5 saves only its own tokenizer.json: not ours to read, and not to be copied under our name."""
    hf = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**small(50).to_hf_dict()))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": []}))
    capsys.readouterr()  # transformers' own progress lines
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer was not exported" in err and "no spiece.model" in err, err
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
