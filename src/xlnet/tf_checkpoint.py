"""Original XLNet checkpoints (TensorFlow), read without TensorFlow: `xlnet convert --from-tf`.

A TF checkpoint PREFIX is a tensor bundle. PREFIX.index is a sorted string table (LevelDB's table format) from each
variable's name to a BundleEntryProto (dtype, shape, shard, offset, size, CRC32C); PREFIX.data-0000S-of-0000N hold
the raw tensors. Both formats are small and read here directly, every block and tensor checked against its CRC32C;
nothing is unpickled or executed. The names are those of the original code (zihangdai/xlnet): `model/transformer/`
for the body, `model/lm_loss/bias` for the pretrained LM head; run_classifier.py's `model/sequnece_summary/` (sic)
and `model/{classification,regression}_<task>/logit/`, run_squad.py's `start_logits/`, `end_logits/` and
`answer_class/`, run_race.py's summary and `logits/` for fine-tuned models.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from xlnet.config import XLNetConfig, read_config_json
from xlnet.errors import XLNetError

TF_CONFIG = "xlnet_config.json"
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48  # two block handles padded to 40 bytes, then the magic number
BLOCK_TRAILER_LEN = 5  # compression type, masked CRC32C
# TF DataType enum values -> torch dtypes (the numeric ones a model checkpoint holds)
DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
          9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16}
BODY, LM_BIAS, SUMMARY = "model/transformer/", "model/lm_loss/bias", "model/sequnece_summary/summary/"
# the original config's keys -> ours
CONFIG_KEYS = {"n_token": "vocab_size", "d_model": "d_model", "n_layer": "n_layer", "n_head": "n_head",
               "d_head": "d_head", "d_inner": "d_inner", "ff_activation": "ff_activation", "untie_r": "untie_r"}
# not weights, never read: the step counter, optimizer slots, TF 2's object graph (a string tensor)
NOT_WEIGHTS = re.compile(r"(^|/)(global_step|beta[12]_power)$|/(Adam(_\d+)?|adam_[mv]|Momentum)$"
                         r"|^_CHECKPOINTABLE_OBJECT_GRAPH$")


# ---------------------------------------------------------------------------------------------- formats
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varint/fixed fields, bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def crc32c(data: bytes) -> int:
    try:
        import google_crc32c  # a declared dependency; an install from before it lacks it
    except ImportError:
        raise XLNetError("reading TensorFlow checkpoints needs google-crc32c: pip install google-crc32c") from None
    return google_crc32c.value(data)


def unmasked_crc(masked: int) -> int:
    """LevelDB and TF store CRC32C rotated and offset ("masked"), so that CRCs of CRCs stay well spread."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _block(data: bytes, handle: bytes, path: Path) -> bytes:
    """The contents of the block `handle` (varint offset, varint size) points at, CRC-checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + BLOCK_TRAILER_LEN > len(data):
        raise XLNetError(f"{path}: truncated (a block ends past the end of the file)")
    kind, crc = data[end], int.from_bytes(data[end + 1:end + 5], "little")
    if crc32c(data[offset:end + 1]) != unmasked_crc(crc):
        raise XLNetError(f"{path}: corrupt (CRC32C of the block at byte {offset} differs)")
    if kind != 0:
        raise XLNetError(f"{path}: compressed index blocks (type {kind}) are not supported")
    return data[offset:end]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Key/value pairs of a table block: each key shares a prefix with the previous one; restart offsets at the end."""
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 * (restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        own, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + own]
        pos += own
        yield key, block[pos:pos + size]
        pos += size


def read_table(path: Path) -> dict[str, bytes]:
    """Every key/value of a LevelDB-format table file (what a TF checkpoint's .index is)."""
    data = path.read_bytes()
    if len(data) < FOOTER_LEN or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise XLNetError(f"{path}: not a TensorFlow checkpoint index (no table footer)")
    footer = data[-FOOTER_LEN:-8]
    try:
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
        index = _block(data, footer[pos:], path)
        return {key.decode(): value
                for _, handle in _block_entries(index) for key, value in _block_entries(_block(data, handle, path))}
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as e:
        raise XLNetError(f"{path}: corrupt checkpoint index ({e})") from None


@dataclass(frozen=True)
class BundleEntry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None
    sliced: bool

    @classmethod
    def parse(cls, buf: bytes) -> "BundleEntry":
        f: dict[str, Any] = dict(dtype=0, shape=(), shard=0, offset=0, size=0, crc=None, sliced=False)
        for field, value in _proto_fields(buf):
            if field == 1:
                f["dtype"] = value
            elif field == 2:  # TensorShapeProto: repeated Dim (field 2) with size (field 1)
                f["shape"] = tuple(dict(_proto_fields(dim)).get(1, 0) for k, dim in _proto_fields(value) if k == 2)
            elif field in (3, 4, 5):
                f[("shard", "offset", "size")[field - 3]] = value
            elif field == 6:
                f["crc"] = value
            elif field == 7:
                f["sliced"] = True
        return cls(**f)


def read_bundle(prefix: Path, keep: Callable[[str], bool] = lambda name: True) -> dict[str, Tensor]:
    """The tensors of checkpoint `prefix` whose names `keep` accepts, each verified against its CRC32C."""
    index = prefix.with_name(prefix.name + ".index")
    table = read_table(index)
    try:
        header = dict(_proto_fields(table.pop("", b"")))
        entries = {name: BundleEntry.parse(value) for name, value in table.items() if keep(name)}
    except ValueError as e:
        raise XLNetError(f"{index}: corrupt checkpoint index ({e})") from None
    shards = header.get(1, 1)
    if header.get(2, 0) == 1:
        raise XLNetError(f"{index}: a big-endian checkpoint is not supported")
    tensors: dict[str, Tensor] = {}
    for shard in sorted({e.shard for e in entries.values()}):
        path = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}")
        if not path.is_file():
            raise XLNetError(f"{path}: not found (the checkpoint's data shard {shard} of {shards})")
        with open(path, "rb") as f:
            for name, entry in entries.items():
                if entry.shard == shard:
                    tensors[name] = _read_tensor(f, path, name, entry)
    return tensors


def _read_tensor(f: Any, path: Path, name: str, entry: BundleEntry) -> Tensor:
    dtype = DTYPES.get(entry.dtype)
    if dtype is None or entry.sliced:
        what = "a partitioned variable" if entry.sliced else f"of TF dtype {entry.dtype}"
        raise XLNetError(f"{path}: tensor {name} is {what}, which is not supported")
    if entry.size != math.prod(entry.shape) * dtype.itemsize:
        raise XLNetError(f"{path}: tensor {name} has {entry.size} bytes for shape {entry.shape}")
    f.seek(entry.offset)
    raw = f.read(entry.size)
    if len(raw) != entry.size:
        raise XLNetError(f"{path}: truncated (tensor {name} ends past the end of the file)")
    if entry.crc is not None and crc32c(raw) != unmasked_crc(entry.crc):
        raise XLNetError(f"{path}: corrupt (CRC32C of tensor {name} differs)")
    if not raw:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(entry.shape)


# ---------------------------------------------------------------------------------------------- XLNet
def checkpoint_prefix(src: Path) -> Path:
    """The checkpoint in `src`: a prefix (`src`.index exists), or a directory with TF's `checkpoint` state file
    (its newest checkpoint, also when the run directory has moved since) or exactly one `*.index`. One of the
    checkpoint's own files (PREFIX.index, .meta, .data-*) names its prefix too."""
    own_file = re.fullmatch(r"(.+)\.(index|meta|data-\d{5}-of-\d{5})", src.name)
    if own_file and src.is_file():
        src = src.with_name(own_file.group(1))
    if src.with_name(src.name + ".index").is_file():
        return src
    if not src.is_dir():
        raise XLNetError(f"{src}: no such checkpoint (neither a directory nor a prefix with a .index file)")
    state = src / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(encoding="utf-8", errors="replace"),
                          re.MULTILINE)
        if match:
            for prefix in (src / match.group(1), src / Path(match.group(1)).name):
                if prefix.with_name(prefix.name + ".index").is_file():
                    return prefix
    found = sorted(src.glob("*.index"))
    if len(found) != 1:
        what = "no *.index file" if not found else f"{len(found)} checkpoints ({', '.join(p.stem for p in found)})"
        raise XLNetError(f"{src}: {what}; name one by its prefix, e.g. {src / 'xlnet_model.ckpt'}")
    return found[0].with_suffix("")


def read_tf_config(path: Path) -> XLNetConfig:
    """The original xlnet_config.json: n_token, d_model, n_layer, n_head, d_head, d_inner, ff_activation, untie_r."""
    if not path.is_file():
        raise XLNetError(f"{path}: not found (the original XLNet config, beside the checkpoint; --tf-config names "
                         "another)")
    data, _ = read_config_json(path)
    missing = sorted(set(CONFIG_KEYS) - set(data))
    if missing:  # other keys are ignored, as the original's XLNetConfig ignores them
        raise XLNetError(f"{path}: not an original XLNet config (no {', '.join(missing)})")
    ours = {ours: data[key] for key, ours in CONFIG_KEYS.items()}
    if data["ff_activation"] not in ("gelu", "relu"):
        raise XLNetError(f"{path}: ff_activation {data['ff_activation']!r} is not one of the original's (gelu, relu)")
    # the original's gelu is the tanh approximation (HF's configs say gelu and compute the exact one)
    ours["ff_activation"] = "gelu_new" if data["ff_activation"] == "gelu" else "relu"
    return XLNetConfig.from_dict(ours, source=str(path))


def _pick(tensors: dict[str, Tensor], name: str, source: Path) -> Tensor:
    if name not in tensors:
        raise XLNetError(f"{source}: variable {name} is missing (not an XLNet checkpoint of this config?)")
    return tensors.pop(name)


def body_weights(tensors: dict[str, Tensor], config: XLNetConfig, source: Path) -> dict[str, Tensor]:
    """Our `transformer.*` tensors from the original's `model/transformer/*` (popped from `tensors`). Dense
    kernels are [in, out] in TF, [out, in] in torch; the attention kernels are [d_model, n_head, d_head] in both;
    r_w/r_r/r_s_bias carry a layer axis when untie_r; seg_embed always does."""
    def take(name: str) -> Tensor:
        return _pick(tensors, BODY + name, source)

    out = {"transformer.word_embedding.weight": take("word_embedding/lookup_table")}
    if BODY + "mask_emb/mask_emb" in tensors:  # absent from fine-tuned checkpoints: no query stream there
        out["transformer.mask_emb"] = take("mask_emb/mask_emb")
    biases = {name: take(name) for name in ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")}
    for i in range(config.n_layer):
        tf, ours = f"layer_{i}/", f"transformer.layer.{i}."
        for name in "qkvor":
            out[f"{ours}rel_attn.{name}"] = take(f"{tf}rel_attn/{name}/kernel")
        for block, norm in (("rel_attn", "rel_attn.layer_norm"), ("ff", "ff.layer_norm")):
            out[f"{ours}{norm}.weight"] = take(f"{tf}{block}/LayerNorm/gamma")
            out[f"{ours}{norm}.bias"] = take(f"{tf}{block}/LayerNorm/beta")
        for j in (1, 2):
            out[f"{ours}ff.layer_{j}.weight"] = take(f"{tf}ff/layer_{j}/kernel").T.contiguous()
            out[f"{ours}ff.layer_{j}.bias"] = take(f"{tf}ff/layer_{j}/bias")
        for name, value in biases.items():
            per_layer = config.untie_r or name == "seg_embed"
            out[f"{ours}rel_attn.{name}"] = _layer_slice(value, i, per_layer, name, config, source)
    return out


def _layer_slice(value: Tensor, i: int, per_layer: bool, name: str, config: XLNetConfig, source: Path) -> Tensor:
    if per_layer and (value.dim() == 0 or value.shape[0] != config.n_layer):
        raise XLNetError(f"{source}: variable {BODY}{name} has shape {tuple(value.shape)}, without the layer axis "
                         f"of {config.n_layer} that untie_r={config.untie_r} implies")
    return value[i] if per_layer else value


def _dense(tensors: dict[str, Tensor], scope: str, ours: str, source: Path, bias: bool = True) -> dict[str, Tensor]:
    """tf.layers.dense's kernel [in, out] and bias as torch Linear's weight [out, in] and bias."""
    out = {f"{ours}.weight": _pick(tensors, f"{scope}/kernel", source).T.contiguous()}
    if bias:
        out[f"{ours}.bias"] = _pick(tensors, f"{scope}/bias", source)
    return out


def _summary(tensors: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    if "model/sequnece_summary/summary_bias" in tensors:
        raise XLNetError(f"{source}: summary_type 'attn' is not supported (the heads here read the last token)")
    return _dense(tensors, SUMMARY.rstrip("/"), "sequence_summary.summary", source)


def head_weights(tensors: dict[str, Tensor], config: XLNetConfig, source: Path) -> tuple[str, dict[str, Tensor]]:
    """The head class and its tensors (popped from `tensors`): run_squad's start/end/answer-class layers,
    run_race's summary and choice logit, run_classifier's summary and logit layer (config.num_labels set from its
    rows), else the LM head's bias."""
    if "start_logits/dense/kernel" in tensors:
        return "XLNetForQuestionAnswering", {
            **_dense(tensors, "start_logits/dense", "start_logits.dense", source),
            **_dense(tensors, "end_logits/dense_0", "end_logits.dense_0", source),
            "end_logits.LayerNorm.weight": _pick(tensors, "end_logits/LayerNorm/gamma", source),
            "end_logits.LayerNorm.bias": _pick(tensors, "end_logits/LayerNorm/beta", source),
            **_dense(tensors, "end_logits/dense_1", "end_logits.dense_1", source),
            **_dense(tensors, "answer_class/dense_0", "answer_class.dense_0", source),
            **_dense(tensors, "answer_class/dense_1", "answer_class.dense_1", source, bias=False)}
    if "logits/dense/kernel" in tensors:
        return "XLNetForMultipleChoice", {**_summary(tensors, source),
                                          **_dense(tensors, "logits/dense", "logits_proj", source)}
    scopes = sorted({m.group(1) for name in tensors
                     if (m := re.match(r"model/((?:classification|regression)_[^/]+)/logit/kernel$", name))})
    if len(scopes) > 1:
        raise XLNetError(f"{source}: {len(scopes)} classifier heads ({', '.join(scopes)}); convert needs one")
    if scopes:
        config.num_labels = tensors[f"model/{scopes[0]}/logit/kernel"].shape[1]
        return "XLNetForSequenceClassification", {**_summary(tensors, source),
                                                  **_dense(tensors, f"model/{scopes[0]}/logit", "logits_proj", source)}
    bias = tensors.pop(LM_BIAS, None)
    return "XLNetLMHeadModel", {} if bias is None else {"lm_loss.bias": bias}


def load_tf_model(src: str | Path, config_path: str | Path | None = None) -> tuple[nn.Module, list[str]]:
    """The model in an original XLNet checkpoint (directory or prefix) and notes about it: variables left out,
    tensors the checkpoint lacks (kept at their fresh initialisation)."""
    from xlnet.checkpoint import load_into
    from xlnet.heads import ARCHITECTURES  # heads import most of the package

    src = Path(src)
    prefix = checkpoint_prefix(src)
    config = read_tf_config(Path(config_path) if config_path else prefix.parent / TF_CONFIG)
    source = prefix.with_name(prefix.name + ".index")
    tensors = read_bundle(prefix, keep=lambda name: not NOT_WEIGHTS.search(name))  # optimizer slots: 2x the model
    weights = body_weights(tensors, config, source)
    architecture, head = head_weights(tensors, config, source)
    model = ARCHITECTURES[architecture](config)
    notes = []
    if "transformer.mask_emb" not in weights:  # fine-tuned checkpoints: the graph had no query stream
        weights["transformer.mask_emb"] = model.transformer.mask_emb.detach().clone()
        notes.append("the checkpoint has no mask_emb (the query stream's input; fine-tuning does not use it): "
                     "initialised fresh")
    if architecture == "XLNetLMHeadModel" and not head:
        notes.append(f"the checkpoint has no {LM_BIAS}: the LM head's bias starts at zero")
    left = sorted(tensors)
    if left:
        notes.append(f"{len(left)} variable(s) not converted: {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
    load_into(model, {**weights, **head}, source)
    return model, notes


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"xlnet convert: note: {note}", file=sys.stderr)
