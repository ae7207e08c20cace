"""xlnet.fileio: atomic directory swaps that never delete what is not a previous output of the same kind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from xlnet import fileio
from xlnet import training as TR
from xlnet.checkpoint import MODEL_DIR
from xlnet.errors import XLNetError
from xlnet.fileio import DirKind, atomic_dir, check_replaceable, sha256_file
from xlnet.finetune import check_outputs
from xlnet.model import XLNetLMHeadModel

from helpers import tiny_config

KIND = DirKind("marker.json", "a test output")


def _write_output(path: Path, text: str) -> None:
    with atomic_dir(path, replaces=KIND) as tmp:
        (tmp / "marker.json").write_text(text)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_foreign_directory_file_and_link_are_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "userdir"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(XLNetError, match=r"userdir: exists and is not a test output \(no marker.json\); choose"):
        _write_output(foreign, "new")
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"] and not _siblings(foreign)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(XLNetError, match="notes.txt: exists and is not a directory"):
        _write_output(notes, "new")
    assert notes.read_text() == "keep me" and not _siblings(notes)
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(XLNetError, match="link: exists and is a symbolic link"):
        _write_output(link, "new")
    assert link.is_symlink() and (foreign / "thesis.tex").is_file()
    with pytest.raises(XLNetError, match=r"notes.txt/sub: cannot create directory \(Not a directory\)"):
        _write_output(notes / "sub" / "out", "new")


def test_own_output_and_empty_directory_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_output(out, "first")
    (out / "extra").write_text("from the first run")
    _write_output(out, "second")
    assert sorted(p.name for p in out.iterdir()) == ["marker.json"] and (out / "marker.json").read_text() == "second"
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_output(empty, "x")
    assert (empty / "marker.json").is_file()
    assert not _siblings(out) and not _siblings(empty)
    with pytest.raises(XLNetError, match="out: exists and is not empty"):  # no kind: only new or empty
        with atomic_dir(out):
            pass


def test_destination_is_checked_again_after_the_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(XLNetError, match="not a test output"):
        with atomic_dir(out, replaces=KIND) as tmp:
            (tmp / "marker.json").write_text("new")
            out.mkdir()  # someone else's directory appears while we work
            (out / "theirs").write_text("keep")
    assert [p.name for p in out.iterdir()] == ["theirs"] and not _siblings(out)


def test_stale_old_from_a_crashed_swap_does_not_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_output(out, "first")
    (tmp_path / ".out.old").write_text("a file where the old code put the previous output")
    _write_output(out, "second")
    (tmp_path / ".out.old").unlink()
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "leftover").write_text("x")
    _write_output(out, "third")
    assert (out / "marker.json").read_text() == "third"
    assert _siblings(out) == [".out.old"]  # not ours to delete: it is left alone


def test_failed_swap_puts_the_previous_output_back(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    _write_output(out, "first")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out and Path(src).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(OSError):
        _write_output(out, "second")
    assert (out / "marker.json").read_text() == "first" and not _siblings(out)


def test_check_replaceable_kinds_of_the_verbs(tmp_path: Path) -> None:
    check_replaceable(tmp_path / "absent", MODEL_DIR)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    check_replaceable(tmp_path / "m", MODEL_DIR)
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "mine.txt").write_text("x")
    with pytest.raises(XLNetError, match=r"best: exists and is not a model directory \(no config.json\)"):
        check_outputs(tmp_path / "run")
    (tmp_path / "run" / "best" / "config.json").write_text("{}")
    (tmp_path / "run" / "dev").mkdir()
    (tmp_path / "run" / "dev" / "mine.txt").write_text("x")
    with pytest.raises(XLNetError, match=r"dev: exists and is not a predictions directory \(no predictions\.\*\)"):
        check_outputs(tmp_path / "run")
    (tmp_path / "run" / "dev" / "predictions.tsv").write_text("index\tprediction\n")
    check_outputs(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(XLNetError, match="file: exists and is not a directory"):
        check_outputs(tmp_path / "file")


def test_training_checkpoint_replaces_its_own_step_but_not_a_foreign_dir(tmp_path: Path) -> None:
    model = XLNetLMHeadModel(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    path = TR.checkpoint_path(tmp_path, 5)
    TR.save_checkpoint(path, model, opt, None, {"step": 5})
    TR.save_checkpoint(path, model, opt, None, {"step": 5, "again": True})
    assert '"again"' in (path / TR.TRAINER_STATE).read_text()
    foreign = TR.checkpoint_path(tmp_path, 6)
    foreign.mkdir()
    (foreign / "notes").write_text("x")
    with pytest.raises(XLNetError, match=r"not a training checkpoint \(no trainer_state.json\)"):
        TR.save_checkpoint(foreign, model, opt, None, {"step": 6})
    assert [p.name for p in foreign.iterdir()] == ["notes"]


def test_sha256_file_from_an_offset(tmp_path: Path) -> None:
    f = tmp_path / "b"
    f.write_bytes(b"header" + b"payload" * 1000)
    assert sha256_file(f, chunk=7, offset=6) == hashlib.sha256(b"payload" * 1000).hexdigest()
    assert sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_dir_lock_is_exclusive_until_released(tmp_path):
    first = fileio.DirLock(tmp_path)
    with pytest.raises(XLNetError, match="is in use by another xlnet run"):
        fileio.DirLock(tmp_path)
    first.release()
    fileio.DirLock(tmp_path).release()  # free again
    assert list(tmp_path.iterdir()) == []  # no lock file left behind
