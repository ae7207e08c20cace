"""XLNetConfig: a plain dataclass with named presets, saved as JSON, and mapped to/from HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from xlnet.cliconf import typed_values
from xlnet.errors import XLNetError
from xlnet.fileio import atomic_write


Activation = Literal["gelu", "relu", "gelu_new", "silu"]


@dataclass
class XLNetConfig:
    vocab_size: int = 32000
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_head: int = 64
    d_inner: int = 3072
    ff_activation: Activation = "gelu"
    dropout: float = 0.1
    dropatt: float = 0.1  # dropout on attention probabilities (HF uses `dropout` for both)
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    mem_len: int = 0  # states cached per layer for the next segment; 0 = no recurrence
    reuse_len: int = 0  # leading tokens of each segment that the next segment reuses; 0 = all
    clamp_len: int = -1  # clip relative distances to this; -1 = no clipping
    bi_data: bool = False  # second half of the batch uses backward relative positions
    attn_type: Literal["bi", "uni"] = "bi"
    same_length: bool = False  # uni only: every query sees the same number of keys
    untie_r: bool = True  # per-layer r_w/r_r/r_s biases; False shares layer 0's across layers
    attn_impl: Literal["reference", "fast"] = "fast"  # "reference": the readable einsum path (parity tests)
    # heads
    num_labels: int = 2
    summary_last_dropout: float = 0.1
    start_n_top: int = 5
    end_n_top: int = 5
    pad_token_id: int = 5
    bos_token_id: int = 1
    eos_token_id: int = 2
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            (self.d_model == self.n_head * self.d_head, f"d_model ({self.d_model}) must equal n_head * d_head "
                                                        f"({self.n_head} * {self.d_head})"),
            (self.attn_type in ("bi", "uni"), f"attn_type must be 'bi' or 'uni', not {self.attn_type!r}"),
            (self.ff_activation in get_args(Activation),
             f"ff_activation must be one of {', '.join(get_args(Activation))}, not {self.ff_activation!r}"),
            (self.attn_impl in ("reference", "fast"),
             f"attn_impl must be 'reference' or 'fast', not {self.attn_impl!r}"),
            (self.d_model % 2 == 0, "d_model must be even (sinusoid positions)"),
            (self.mem_len >= 0 and self.reuse_len >= 0, "mem_len and reuse_len must be >= 0"),
            (min(self.vocab_size, self.n_layer, self.n_head, self.d_inner) > 0, "sizes must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise XLNetError(f"invalid XLNetConfig: {message}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "XLNetConfig":
        if name not in PRESETS:
            raise XLNetError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- our own JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "XLNetConfig":
        if data.get("model_type") == "xlnet":
            return cls.from_hf_dict(data, source)
        if "model_type" in data:  # another Hugging Face architecture: say so rather than list its keys
            raise XLNetError(f"{source}: a {data['model_type']!r} model, not XLNet (model_type must be 'xlnet')")
        data = {k: v for k, v in data.items() if k != "architecture"}  # the head class, stored beside the config
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise XLNetError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        return cls(**typed_values(cls, data, source))

    def save(self, path: str | Path) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "XLNetConfig":
        data, path = read_config_json(path)
        return cls.from_dict(data, source=str(path))

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> "XLNetConfig":
        summary = hf.get("summary_type", "last")
        if summary not in ("last", None):  # our heads read the last position (<cls>), as XLNet's own do
            raise XLNetError(f"{source}: summary_type {summary!r} is not supported (the heads here summarize by "
                             f"the last token, summary_type 'last')")
        ours = {name: hf[name] for name in _SHARED_WITH_HF if hf.get(name) is not None}
        ours.update(mem_len=hf.get("mem_len") or 0, reuse_len=hf.get("reuse_len") or 0, dropatt=hf.get("dropout", 0.1))
        labels = hf.get("id2label")
        if labels:
            ordered = [labels[k] for k in sorted(labels, key=int)]
            ours["num_labels"] = len(ordered)
            if not all(name == f"LABEL_{i}" for i, name in enumerate(ordered)):
                ours["label_names"] = ordered
        elif hf.get("num_labels"):
            ours["num_labels"] = hf["num_labels"]
        ours = typed_values(cls, ours, source)
        ours.setdefault("d_head", ours.get("d_model", 0) // max(ours.get("n_head", 1), 1))
        return cls(**ours)

    def to_hf_dict(self, architectures: list[str] | None = None) -> dict[str, Any]:
        hf = {name: getattr(self, name) for name in _SHARED_WITH_HF}
        labels = self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
        hf.update(
            model_type="xlnet",
            mem_len=self.mem_len or None,
            reuse_len=self.reuse_len or None,
            summary_type="last",
            summary_use_proj=True,
            summary_activation="tanh",
            id2label={str(i): name for i, name in enumerate(labels)},
            label2id={name: i for i, name in enumerate(labels)},
        )
        if architectures:
            hf["architectures"] = architectures
        return hf


def read_config_json(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON object in `path` (or `path`/config.json), with one-line errors for missing or broken files."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise XLNetError(f"config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XLNetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise XLNetError(f"{path}: expected a JSON object")
    return data, path


# Keys whose meaning is identical in our config and HF's XLNetConfig.
_SHARED_WITH_HF = (
    "vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner", "ff_activation", "dropout",
    "layer_norm_eps", "initializer_range", "clamp_len", "bi_data", "attn_type", "same_length", "untie_r",
    "summary_last_dropout", "start_n_top", "end_n_top", "pad_token_id", "bos_token_id", "eos_token_id",
)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo; the shape benchmarks/throughput.py profiles.
    "tiny": dict(vocab_size=8000, d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024),
    # The demo's and `xlnet pretrain`'s default. Init std scaled to the width (0.02 at d_model 768 is 0.55 / sqrt(d);
    # at 128 that is 0.05): with 0.02 it sat on the unigram plateau for a third of the demo's pretraining.
    "mini": dict(vocab_size=8000, d_model=128, n_layer=4, n_head=4, d_head=32, d_inner=512, initializer_range=0.05),
    # The paper's sizes (Base is the ablation setting; Large the released model).
    "base": dict(vocab_size=32000, d_model=768, n_layer=12, n_head=12, d_head=64, d_inner=3072),
    "large": dict(vocab_size=32000, d_model=1024, n_layer=24, n_head=16, d_head=64, d_inner=4096),
}
