"""Model directories: `save_pretrained` / `from_pretrained` for our format and Hugging Face XLNet directories.

A directory holds `config.json` and `model.safetensors`. Ours writes our dataclass config (plus the head's
`architecture`); HF's writes `model_type: xlnet`. Tensor names are the same in both, so loading is a matter of
validating shapes and filling in whatever the file does not carry (a fresh task head, the tied LM weight).
Weights are read with safetensors; legacy `pytorch_model.bin` only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from xlnet.config import XLNetConfig, read_config_json
from xlnet.errors import XLNetError
from xlnet.fileio import DirKind, atomic_dir, follow_umask, require_dir, sha256_file

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "pytorch_model.bin"
BODY = "transformer."
TIED = ("lm_loss.weight",)  # re-tied to the word embedding on load, never stored (as HF)
SHARED_BIASES = ("r_w_bias", "r_r_bias", "r_s_bias")  # shared across layers when untie_r is False
MODEL_DIR = DirKind("config.json", "a model directory")  # what save_pretrained may replace
# Header metadata key: sha256 of the file's data section (everything after the header), checked on load.
DIGEST_KEY = "xlnet_data_sha256"
_PLACEHOLDER = "-" * 64  # same length as a hex sha256; '-' cannot occur in tensor names, dtypes or offsets
Unfit = dict[str, str]  # head tensor -> why the file's copy is not used

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedMixin:
    """Adds directory save/load to XLNetModel and every head (they define `config` and `hf_architecture`)."""

    config: XLNetConfig
    hf_architecture: str = "XLNetModel"

    def save_pretrained(self, directory: str | Path, hf: bool = False) -> Path:
        """Write config.json + model.safetensors atomically. `hf=True` writes HF's config.json instead of ours."""
        module: nn.Module = self  # type: ignore[assignment]
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()
                   if k not in TIED}
        if hf:
            config = self.config.to_hf_dict(architectures=[self.hf_architecture])
        else:
            config = {"architecture": self.hf_architecture, **self.config.to_dict()}
        directory = Path(directory)
        with atomic_dir(directory, replaces=MODEL_DIR) as tmp:
            write_weights(tensors, tmp / WEIGHTS)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, strict: bool = False, verbose: bool = True,
                        reinit_head: bool = False, **overrides: Any) -> M:
        """Load our or HF's directory into this class; `overrides` change config fields (e.g. num_labels,
        dropout, mem_len). Head tensors the file lacks are freshly initialised and reported (strict: an error).
        `reinit_head` (fine-tuning for a new task): so are head tensors whose shape does not fit the config (else an
        error), and the label layer when the file's label names are not this task's (QNLI's 2 rows read as
        SST-2's); when the file's head does not fit, one line on stderr, whatever `verbose`, says which and why."""
        directory = Path(directory)
        require_dir(directory, "model directory")
        saved = XLNetConfig.load(directory)
        config = XLNetConfig(**{**saved.to_dict(), **overrides}) if overrides else saved
        model = cls(config)  # type: ignore[call-arg]
        weights, source = read_weights(directory)
        unfit: Unfit = {}
        if reinit_head:
            weights, unfit = drop_unfit_head(model, weights, saved.label_names)  # type: ignore[arg-type]
        fresh = load_into(model, weights, source)  # type: ignore[arg-type]
        if fresh and strict:
            raise XLNetError(f"{source}: tensor {fresh[0]} is missing for {cls.__name__}")
        # not the usual fresh head on a pretrained body: the file's own head is (partly) thrown away
        note = head_note(model, weights, unfit, fresh, source) if reinit_head else ""  # type: ignore[arg-type]
        if fresh and verbose and not note:
            note = (f"note: {len(fresh)} tensor(s) not in {source.name} were initialised fresh: "
                    f"{', '.join(sorted(fresh)[:6])}{' ...' if len(fresh) > 6 else ''}")
        if note and os.environ.get("RANK", "0") == "0":  # under torchrun every process loads; one says so
            print(note, file=sys.stderr)
        return model


def write_weights(tensors: dict[str, Tensor], path: Path) -> None:
    """save_file with the sha256 of the data section recorded in the header. The digest can only be known once
    the data is laid out, so the header is written with a placeholder of the same length and patched in place:
    one write and one read, no second copy of the tensors."""
    save_file(tensors, str(path), metadata={"format": "pt", DIGEST_KEY: _PLACEHOLDER})
    with open(path, "r+b") as f:
        header_len, header = _read_header(f)
        at = header.find(_PLACEHOLDER.encode())
        if at < 0 or header.count(_PLACEHOLDER.encode()) != 1:
            raise RuntimeError(f"{path}: digest placeholder not found once in the safetensors header")
        digest = sha256_file(path, offset=8 + header_len)
        f.seek(8 + at)
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())
    follow_umask(path)  # safetensors creates the file 0600


def _read_header(f: IO[bytes]) -> tuple[int, bytes]:
    """(length, bytes) of a safetensors header: an 8-byte little-endian length, then that much JSON."""
    (length,) = struct.unpack("<Q", f.read(8))
    return length, f.read(length)


def verify_weights(path: Path) -> None:
    """Recompute the data section's sha256 when the header records one (ours do; HF's and older files load
    unchecked): a flipped byte inside a tensor would otherwise load silently. Call after the header parsed."""
    with open(path, "rb") as f:
        header_len, header = _read_header(f)
    recorded = (json.loads(header).get("__metadata__") or {}).get(DIGEST_KEY)
    if recorded is not None and sha256_file(path, offset=8 + header_len) != recorded:
        raise XLNetError(f"{path}: weights are corrupt (sha256 of the tensor data does not match the one "
                         "recorded when it was written)")


def load_verified(path: Path) -> dict[str, Tensor]:
    tensors = load_file(str(path))  # parses and checks the header (a clear error for a truncated file)
    verify_weights(path)
    return tensors


def read_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of a directory (single file, HF sharded index, or legacy .bin), verified readable and, where
    the file records its sha256 (ours do), intact."""
    single, legacy, index = directory / WEIGHTS, directory / LEGACY_WEIGHTS, directory / f"{WEIGHTS}.index.json"
    try:
        if single.is_file():
            return load_verified(single), single
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, Tensor] = {}
            for shard in shards:
                out.update(load_verified(directory / shard))
            return out, index
        if legacy.is_file():
            state = torch.load(legacy, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise XLNetError(f"{legacy}: expected a state dict")
            return state, legacy
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, json.JSONDecodeError) as e:
        bad = single if single.is_file() else (index if index.is_file() else legacy)
        raise XLNetError(f"{bad}: cannot read weights ({str(e).splitlines()[0]})") from None
    raise XLNetError(f"{directory}: no {WEIGHTS} or {LEGACY_WEIGHTS} found")


def normalize_keys(weights: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A bare XLNetModel file has no `transformer.` prefix; a head file loaded into the bare body has one."""
    has_body = hasattr(model, "transformer")
    prefixed = any(k.startswith(BODY) for k in weights)
    if has_body and not prefixed:
        return {BODY + k: v for k, v in weights.items()}
    if not has_body and prefixed:
        return {k[len(BODY):]: v for k, v in weights.items() if k.startswith(BODY)}
    return weights


def load_into(model: nn.Module, weights: dict[str, Tensor], source: Path) -> list[str]:
    """Copy `weights` into `model`, failing with one line that names the first tensor that does not fit the
    config. Returns the head tensors that were missing (left at their fresh initialisation)."""
    weights = normalize_keys(weights, model)
    has_body = hasattr(model, "transformer")
    state = model.state_dict()
    for key in state:  # model order, so the first tensor named is the first that does not fit
        if key in weights and tuple(weights[key].shape) != tuple(state[key].shape):
            raise XLNetError(f"{source}: tensor {key} has shape {tuple(weights[key].shape)} but the config "
                             f"expects {tuple(state[key].shape)}")
        if key in weights and state[key].is_floating_point():  # else training reports a NaN loss, not the file
            if not weights[key].is_floating_point():
                raise XLNetError(f"{source}: tensor {key} is {weights[key].dtype}, not floating point")
            if not torch.isfinite(weights[key]).all():
                raise XLNetError(f"{source}: tensor {key} holds NaN or infinite values")
    for key in weights:
        if key not in state and is_body_key(key, has_body):
            raise XLNetError(f"{source}: tensor {key} is not part of a model with this config "
                             f"(n_layer={getattr(model, 'config').n_layer})")
    missing = [k for k in state if k not in weights and k not in TIED]
    body_missing = [k for k in missing if is_body_key(k, has_body)]
    if body_missing:
        raise XLNetError(f"{source}: tensor {body_missing[0]} is missing ({len(body_missing)} body tensor(s) absent)")
    check_shared_biases(model, weights, source)
    with torch.no_grad():
        for key, tensor in weights.items():
            if key in state:
                state[key].copy_(tensor.to(state[key].dtype))
    return missing


def drop_unfit_head(model: nn.Module, weights: dict[str, Tensor],
                     file_labels: list[str] | None = None) -> tuple[dict[str, Tensor], Unfit]:
    """`weights` without the head tensors that do not fit `model`, and why for each: a shape that differs (a
    3-class classifier's logits_proj under a 2-class task), or a label layer whose rows were trained for other
    label names (`file_labels`, the file's config's). Body tensors are left for load_into to refuse: a body that
    does not fit is another model, not another task."""
    weights = normalize_keys(weights, model)
    has_body = hasattr(model, "transformer")
    labels: list[str] = getattr(model, "config").label_names
    relabel = getattr(model, "label_layer", None) if file_labels and labels and file_labels != labels else None
    unfit: Unfit = {}
    for key, value in model.state_dict().items():
        if key not in weights or is_body_key(key, has_body):
            continue
        was, want = tuple(weights[key].shape), tuple(value.shape)
        if was != want:
            unfit[key] = f"{key} is {was} in the file but {want} here"
        elif relabel and key.split(".")[0] == relabel:
            unfit[key] = f"{key} was trained for labels {_names(file_labels)}, not {_names(labels)}"
    return {k: v for k, v in weights.items() if k not in unfit}, unfit


def _names(labels: list[str] | None) -> str:
    shown = ", ".join(labels[:4]) if labels else ""
    return f"[{shown}{', ...' if labels and len(labels) > 4 else ''}]"


def head_note(model: nn.Module, weights: dict[str, Tensor], unfit: Unfit, fresh: list[str], source: Path) -> str:
    """One line on which head tensors start fresh and why, when the file holds a head that does not fit (its
    shape, or another kind of head); '' for a file whose head fits, or that holds only the pretraining LM head.
    `weights` as drop_unfit_head returns them (keys normalized)."""
    has_body = hasattr(model, "transformer")
    state = model.state_dict()
    unused = sorted({k.split(".")[0] for k in weights if k not in state and not is_body_key(k, has_body)
                     and k not in TIED and k.split(".")[0] != "lm_loss"})  # lm_loss: pretraining's, never kept
    if not unfit and not unused:
        return ""
    reasons = list(unfit.values())
    absent = sorted({k.split(".")[0] for k in fresh if k not in unfit})
    if absent:
        reasons.append(f"{', '.join(absent)} not in the file")
    if unused:
        reasons.append(f"the file's {', '.join(unused)} (another head) not used")
    return f"note: {source}: task head initialised fresh where the file's does not fit: {'; '.join(reasons)}"


def is_body_key(key: str, has_body: bool) -> bool:
    return key.startswith(BODY) if has_body else key.split(".")[0] in ("word_embedding", "mask_emb", "layer")


def check_shared_biases(model: nn.Module, weights: dict[str, Tensor], source: Path) -> None:
    """With untie_r=False every layer shares one set of biases; the file must agree or the load would silently
    keep only the last layer's copy."""
    config: XLNetConfig = getattr(model, "config")
    if config.untie_r:
        return
    for name in SHARED_BIASES:
        copies = [(k, v) for k, v in weights.items() if k.endswith(f"rel_attn.{name}")]
        for key, value in copies[1:]:
            if not torch.equal(value, copies[0][1]):
                raise XLNetError(f"{source}: tensor {key} differs from layer 0's but the config says untie_r=false")


def load_model(directory: str | Path, architecture: str | None = None, **overrides: Any) -> nn.Module:
    """Load a directory into the head class its config names (ours: `architecture`; HF: `architectures`)."""
    from xlnet.heads import ARCHITECTURES  # heads import this module

    directory = Path(directory)
    name = architecture or saved_architecture(directory)
    if name not in ARCHITECTURES:
        raise XLNetError(f"{directory}: unsupported architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name].from_pretrained(directory, **overrides)


def saved_architecture(directory: Path) -> str:
    require_dir(directory, "model directory")
    data, _ = read_config_json(directory)
    if "architecture" in data:
        return str(data["architecture"])
    archs = data.get("architectures") or ["XLNetLMHeadModel"]
    return str(archs[0])
