"""Dataclass configs as flags and YAML: the help text from the fields' comments, and the precedence of values."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from xlnet.cliconf import add_dataclass_arguments, build_dataclass, field_comments
from xlnet.errors import XLNetError


@dataclass
class Base:
    # a section header, not this field's help: the trailing comment wins
    steps: int = 10  # how many steps (100% of them)
    # the comment lines right above a field
    # are its help when it has no trailing one
    rate: float = 0.5
    name: str = ""


@dataclass
class Child(Base):
    mode: str = "a"  # "a" or "b"


def test_field_comments_from_the_source():
    assert field_comments(Base) == {
        "steps": "how many steps (100% of them)",
        "rate": "the comment lines right above a field are its help when it has no trailing one"}
    assert field_comments(Child) == {**field_comments(Base), "mode": '"a" or "b"'}


def test_help_shows_comments_and_defaults():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Child)
    text = " ".join(parser.format_help().split())
    assert "--steps STEPS how many steps (100% of them) (default 10)" in text  # a literal % survives argparse
    assert "--name NAME (default '')" in text and '--mode MODE "a" or "b" (default a)' in text


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "distill", "demo"])
def test_every_verb_documents_its_main_options(verb, capsys):
    from xlnet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    expected = {"pretrain": ["--mem-len MEM_LEN Transformer-XL memory", "--factorization-order {random,left-to-right}"
                             " plm: a sampled factorization order"],
                "finetune": ["--doc-stride DOC_STRIDE SQuAD: step between windows"],
                "distill": ["--pkd {skip,last,none} which teacher layers", "--doc-stride DOC_STRIDE SQuAD"],
                "demo": ["--seeds SEEDS repeat everything (pretraining too)"]}[verb]
    for phrase in expected:
        assert phrase in text



@pytest.mark.parametrize("argv, unknown, usage", [
    (["finetune", "--task", "sst2", "--tokenizer-dir", "t"], "--tokenizer-dir t", "usage: xlnet finetune"),
    (["--bogus"], "--bogus", "usage: xlnet [-h] VERB"),
])
def test_unknown_flags_are_reported_with_the_verbs_usage(argv, unknown, usage, capsys):
    from xlnet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(usage), err
    assert err.strip().splitlines()[-1].endswith(f"error: unrecognized arguments: {unknown}")

def test_defaults_then_yaml_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 20\nrate: 1\nmode: b\n")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Child)
    args = parser.parse_args(["--steps", "30"])
    cfg = build_dataclass(Child, str(tmp_path / "run.yaml"), args)
    assert dataclasses.asdict(cfg) == {"steps": 30, "rate": 1.0, "name": "", "mode": "b"}
    assert isinstance(cfg.rate, float)  # YAML's 1 becomes the field's float
    (tmp_path / "bad.yaml").write_text("stepz: 1\n")
    with pytest.raises(XLNetError, match="unknown option"):
        build_dataclass(Child, str(tmp_path / "bad.yaml"))


@dataclass
class Typed:
    steps: int = 1
    rate: float = 0.5
    flag: bool = False
    kind: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None


def test_yaml_values_are_checked_against_the_field_types(tmp_path):
    """YAML's slips are taken as meant (PyYAML reads 1e-3 as a string, a quoted "no" is a string); anything else
    of the wrong type is a one-line error naming the file and the field, not a TypeError deep in training."""
    def load(text: str) -> Typed:
        (tmp_path / "c.yaml").write_text(text)
        return build_dataclass(Typed, str(tmp_path / "c.yaml"))

    cfg = load('steps: 1e3\nrate: 1e-3\nflag: "no"\nkind: b\nnames: [x, y]\nlimit: null\n')
    assert (cfg.steps, cfg.rate, cfg.flag, cfg.kind, cfg.names, cfg.limit) == (1000, 1e-3, False, "b", ["x", "y"], None)
    assert isinstance(cfg.steps, int) and load("steps: 4.0\n").steps == 4
    for text, message in [("steps: three\n", "steps must be an integer, not 'three'"),
                          ("steps: 2.7\n", "steps must be an integer, not 2.7"),
                          ("steps: true\n", "steps must be an integer, not True"),
                          ("rate: fast\n", "rate must be a number, not 'fast'"),
                          ("flag: maybe\n", "flag must be true or false, not 'maybe'"),
                          ("kind: c\n", "kind must be one of 'a', 'b', not 'c'"),
                          ("kind: [a]\n", "kind must be one of 'a', 'b', not \\['a'\\]"),
                          ("names: x\n", "names must be a list, not 'x'"),
                          ("names: [1, 2]\n", "names must be a list, not \\[1, 2\\]")]:
        with pytest.raises(XLNetError, match=r"c\.yaml: " + message):
            load(text)


def test_cli_gives_one_line_errors_for_os_errors_and_sigterm(tmp_path, capsys, monkeypatch):
    """An output path that is a file (an OSError deep in a verb) is one line and exit 2, not a traceback; SIGTERM
    becomes an exception, so temporary files are removed on the way out, and exit 143 with one line."""
    import os
    import signal

    from xlnet import cli

    (tmp_path / "taken").write_text("a file, not a directory")
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to train on.\n" * 50)
    code = cli.main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "40", "--out",
                     str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "taken" in err, err
    assert (tmp_path / "taken").read_text() == "a file, not a directory"

    scratch = tmp_path / "scratch"

    def run(args):
        import tempfile

        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
            scratch.write_text(tmp)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr("xlnet.tokenizer.run", run)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "t")]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "terminated" in capsys.readouterr().err
    assert not os.path.exists(scratch.read_text())  # the temporary directory was cleaned up
