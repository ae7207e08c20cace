"""Dataclass configs as flags and YAML: the help text from the fields' comments, and the precedence of values."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

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
