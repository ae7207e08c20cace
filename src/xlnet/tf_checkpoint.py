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

import json
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
from xlnet.fileio import DirKind

TF_CONFIG = "xlnet_config.json"
TF_PREFIX = "xlnet_model.ckpt"  # the release's checkpoint name
TF_DIR = DirKind(TF_PREFIX + ".index", "an original XLNet checkpoint directory")
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


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: int | bytes, fixed32: bool = False) -> bytes:
    """One protobuf field: bytes length-delimited, an int as a varint (or fixed32)."""
    if isinstance(value, bytes):
        return _put_varint(number << 3 | 2) + _put_varint(len(value)) + value
    if fixed32:
        return _put_varint(number << 3 | 5) + value.to_bytes(4, "little")
    return _put_varint(number << 3) + _put_varint(value)


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


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


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

    def encode(self) -> bytes:
        """`parse`'s inverse for a whole tensor (proto3: zero-valued scalars are left out)."""
        dims = b"".join(_field(2, _field(1, d) if d else b"") for d in self.shape)
        ints = b"".join(_field(k, v) for k, v in ((3, self.shard), (4, self.offset), (5, self.size)) if v)
        crc = b"" if self.crc is None else _field(6, self.crc, fixed32=True)
        return _field(1, self.dtype) + _field(2, dims) + ints + crc


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


class _BlockBuilder:
    """A table block: keys prefix-compressed against the previous one, a full key every `restart_interval`, the
    restart offsets at the end."""

    def __init__(self, restart_interval: int = 16) -> None:
        self.buf, self.restarts, self.last, self.interval = bytearray(), [0], b"", restart_interval
        self.count = 0

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count % self.interval:
            while shared < min(len(key), len(self.last)) and key[shared] == self.last[shared]:
                shared += 1
        elif self.count:
            self.restarts.append(len(self.buf))
        self.buf += _put_varint(shared) + _put_varint(len(key) - shared) + _put_varint(len(value))
        self.buf += key[shared:] + value
        self.last, self.count = key, self.count + 1

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))


def _short_key(last: bytes, following: bytes | None) -> bytes:
    """The index's key for a data block: a shortest key >= the block's `last` key and < the `following` block's
    first (LevelDB's bytewise comparator's choice, so that the index is the bytes TF writes)."""
    n = 0
    while following is not None and n < min(len(last), len(following)) and last[n] == following[n]:
        n += 1
    if following is None:  # the last block: any key past `last`
        n = next((i for i, byte in enumerate(last) if byte != 0xFF), len(last))
    if n < len(last) and last[n] < 0xFF and (following is None or n < len(following) and last[n] + 1 < following[n]):
        return last[:n] + bytes([last[n] + 1])
    return last


def table_bytes(items: list[tuple[bytes, bytes]], block_size: int = 256 << 10) -> bytes:
    """A LevelDB-format table of `items` (sorted by key): data blocks that end once past `block_size` bytes
    (TF's size for bundle indexes: one block for any XLNet), an empty metaindex, the index (a key between each
    block and the next, and its handle), the footer. Uncompressed, as TF writes bundles."""
    out = bytearray()

    def put(block: _BlockBuilder) -> bytes:
        raw = block.finish()
        handle = _put_varint(len(out)) + _put_varint(len(raw))
        out.extend(raw + b"\0" + struct.pack("<I", masked_crc(raw + b"\0")))
        return handle

    index, block, pending = _BlockBuilder(restart_interval=1), _BlockBuilder(), None
    for key, value in items:
        if pending:  # the previous block's index entry waits for this key, its upper bound
            index.add(_short_key(pending[0], key), pending[1])
            pending = None
        block.add(key, value)
        if block.size() >= block_size:
            pending, block = (key, put(block)), _BlockBuilder()
    if block.count:
        pending = (block.last, put(block))
    if pending:
        index.add(_short_key(pending[0], None), pending[1])
    handles = put(_BlockBuilder()) + put(index)
    return bytes(out) + handles.ljust(FOOTER_LEN - 8, b"\0") + struct.pack("<Q", TABLE_MAGIC)


def write_bundle(prefix: Path, tensors: dict[str, Tensor]) -> None:
    """`tensors` as checkpoint `prefix`: one data shard in name order, then the index (TF's BundleWriter layout;
    every tensor with its masked CRC32C). Call inside a temporary directory: the files are not atomic."""
    codes = {dtype: code for code, dtype in DTYPES.items()}
    entries = [(b"", _field(1, 1) + _field(3, _field(1, 1)))]  # header: one shard, little-endian, version 1
    with open(prefix.with_name(prefix.name + ".data-00000-of-00001"), "wb") as f:
        for name in sorted(tensors):
            raw = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            entry = BundleEntry(codes[tensors[name].dtype], tuple(tensors[name].shape), shard=0, offset=f.tell(),
                                size=len(raw), crc=masked_crc(raw), sliced=False)
            entries.append((name.encode(), entry.encode()))
            f.write(raw)
    prefix.with_name(prefix.name + ".index").write_bytes(table_bytes(entries))


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


# (TF name, our name, transposed): tf.layers.dense kernels are [in, out], torch Linear weights [out, in]
Mapping = list[tuple[str, str, bool]]
SHARED = ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")  # model/transformer/<name>: a layer axis when per layer
MASK_EMB = (BODY + "mask_emb/mask_emb", "mask_emb")


def _dense(scope: str, ours: str, bias: bool = True) -> Mapping:
    return [(f"{scope}/kernel", f"{ours}.weight", True)] + ([(f"{scope}/bias", f"{ours}.bias", False)] if bias else [])


def _layer_norm(scope: str, ours: str) -> Mapping:
    return [(f"{scope}/LayerNorm/gamma", f"{ours}.weight", False), (f"{scope}/LayerNorm/beta", f"{ours}.bias", False)]


def body_map(config: XLNetConfig) -> Mapping:
    """The word embedding and every layer's own tensors; our names are the body module's (`transformer.` in a
    head class). The attention kernels are [d_model, n_head, d_head] in both."""
    m = [("word_embedding/lookup_table", "word_embedding.weight", False)]
    for i in range(config.n_layer):
        tf, ours = f"layer_{i}/", f"layer.{i}."
        m += [(f"{tf}rel_attn/{name}/kernel", f"{ours}rel_attn.{name}", False) for name in "qkvor"]
        m += _layer_norm(f"{tf}rel_attn", f"{ours}rel_attn.layer_norm") + _layer_norm(f"{tf}ff", f"{ours}ff.layer_norm")
        m += _dense(f"{tf}ff/layer_1", f"{ours}ff.layer_1") + _dense(f"{tf}ff/layer_2", f"{ours}ff.layer_2")
    return [(BODY + tf, ours, transposed) for tf, ours, transposed in m]


def head_map(architecture: str, classifier_scope: str = "") -> Mapping:
    """The head's tensors: run_squad's start/end/answer-class layers, run_race's summary and choice logit,
    run_classifier's summary and `model/<classifier_scope>/logit`, the pretrained LM head's bias (its weight is the
    word embedding). The original has no token-classification head: empty, as for the bare body."""
    summary = _dense(SUMMARY.rstrip("/"), "sequence_summary.summary")
    return {
        "XLNetForQuestionAnswering": _dense("start_logits/dense", "start_logits.dense")
        + _dense("end_logits/dense_0", "end_logits.dense_0") + _layer_norm("end_logits", "end_logits.LayerNorm")
        + _dense("end_logits/dense_1", "end_logits.dense_1") + _dense("answer_class/dense_0", "answer_class.dense_0")
        + _dense("answer_class/dense_1", "answer_class.dense_1", bias=False),
        "XLNetForMultipleChoice": summary + _dense("logits/dense", "logits_proj"),
        "XLNetForSequenceClassification": summary + _dense(f"model/{classifier_scope}/logit", "logits_proj"),
        "XLNetLMHeadModel": [(LM_BIAS, "lm_loss.bias", False)],
    }.get(architecture, [])


def _orient(t: Tensor, transposed: bool) -> Tensor:
    """A dense kernel between TF's [in, out] and torch's [out, in] (either way: its own inverse)."""
    return t.T.contiguous() if transposed else t


def _take(tensors: dict[str, Tensor], mapping: Mapping, source: Path, prefix: str = "") -> dict[str, Tensor]:
    """Our tensors named by `mapping`, popped from the original's `tensors`."""
    return {prefix + ours: _orient(_pick(tensors, tf, source), transposed) for tf, ours, transposed in mapping}


def body_weights(tensors: dict[str, Tensor], config: XLNetConfig, source: Path) -> dict[str, Tensor]:
    """Our `transformer.*` tensors from the original's `model/transformer/*` (popped from `tensors`);
    r_w/r_r/r_s_bias carry a layer axis when untie_r, seg_embed always does. Fine-tuned checkpoints have no
    mask_emb (no query stream in their graphs)."""
    out = {}
    for name in SHARED:  # first: a config with another n_layer shows here, by the missing layer axis
        value, per_layer = _pick(tensors, BODY + name, source), config.untie_r or name == "seg_embed"
        for i in range(config.n_layer):
            out[f"transformer.layer.{i}.rel_attn.{name}"] = _layer_slice(value, i, per_layer, name, config, source)
    out.update(_take(tensors, body_map(config), source, "transformer."))
    if MASK_EMB[0] in tensors:
        out.update(_take(tensors, [(*MASK_EMB, False)], source, "transformer."))
    return out


def _layer_slice(value: Tensor, i: int, per_layer: bool, name: str, config: XLNetConfig, source: Path) -> Tensor:
    if per_layer and (value.dim() == 0 or value.shape[0] != config.n_layer):
        raise XLNetError(f"{source}: variable {BODY}{name} has shape {tuple(value.shape)}, without the layer axis "
                         f"of {config.n_layer} that untie_r={config.untie_r} implies")
    return value[i] if per_layer else value


def head_weights(tensors: dict[str, Tensor], config: XLNetConfig, source: Path) -> tuple[str, dict[str, Tensor]]:
    """The head class the checkpoint's variables name and its tensors (popped from `tensors`); for a classifier
    config.num_labels is set from its logit layer. Without any head's variables: the LM head (its bias if any)."""
    if "model/sequnece_summary/summary_bias" in tensors:
        raise XLNetError(f"{source}: summary_type 'attn' is not supported (the heads here read the last token)")
    scopes = sorted({m.group(1) for name in tensors
                     if (m := re.match(r"model/((?:classification|regression)_[^/]+)/logit/kernel$", name))})
    if len(scopes) > 1:
        raise XLNetError(f"{source}: {len(scopes)} classifier heads ({', '.join(scopes)}); convert needs one")
    if "start_logits/dense/kernel" in tensors:
        architecture = "XLNetForQuestionAnswering"
    elif "logits/dense/kernel" in tensors:
        architecture = "XLNetForMultipleChoice"
    elif scopes:
        architecture = "XLNetForSequenceClassification"
        config.num_labels = tensors[f"model/{scopes[0]}/logit/kernel"].shape[1]
    else:
        architecture = "XLNetLMHeadModel"
        if LM_BIAS not in tensors:
            return architecture, {}
    return architecture, _take(tensors, head_map(architecture, scopes[0] if scopes else ""), source)


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


def tf_config(config: XLNetConfig) -> tuple[dict[str, Any], list[str]]:
    """The original xlnet_config.json for `config`, and notes on what the original computes otherwise."""
    if config.ff_activation == "silu":
        raise XLNetError("ff_activation silu has no counterpart in the original XLNet code (gelu, relu)")
    notes = []
    if config.ff_activation == "gelu":
        notes.append("ff_activation gelu (exact) is written as the original's gelu, the tanh approximation (gelu_new): "
                     "each activation moves by at most 4.7e-4")
    if config.layer_norm_eps != 1e-12:
        notes.append(f"layer_norm_eps {config.layer_norm_eps:g}: the original's layer norm uses 1e-12")
    out = {key: getattr(config, name) for key, name in CONFIG_KEYS.items()}
    out["ff_activation"] = "relu" if config.ff_activation == "relu" else "gelu"
    return out, notes


def tf_tensors(model: nn.Module, classifier_scope: str) -> tuple[dict[str, Tensor], list[str]]:
    """The original's variables for `model` (any of our head classes) in float32, and notes: a classifier's logit
    layer goes under `model/<classifier_scope>/`."""
    config: XLNetConfig = getattr(model, "config")
    state, architecture = model.state_dict(), type(model).__name__
    body = "transformer." if hasattr(model, "transformer") else ""  # a bare XLNetModel's names have no prefix

    def get(name: str, transposed: bool = False) -> Tensor:
        return _orient(state[name].detach().float(), transposed)

    out = {tf: get(body + ours, transposed) for tf, ours, transposed in body_map(config) + [(*MASK_EMB, False)]}
    for name in SHARED:
        layers = [get(f"{body}layer.{i}.rel_attn.{name}") for i in range(config.n_layer)]
        out[BODY + name] = torch.stack(layers) if config.untie_r or name == "seg_embed" else layers[0]
    out.update({tf: get(ours, transposed) for tf, ours, transposed in head_map(architecture, classifier_scope)})
    notes = []
    if architecture == "XLNetForTokenClassification":
        notes.append("the original code has no token-classification head: only the body is written")
    return out, notes


def classifier_scope(config: XLNetConfig, task: str) -> str:
    """run_classifier.py's scope for a task: classification_<task>, regression_<task> for one output."""
    return f"{'regression' if config.num_labels == 1 else 'classification'}_{task.lower()}"


def save_tf_model(model: nn.Module, directory: Path, task: str = "xlnet") -> list[str]:
    """`model` as the original release lays a model out in `directory` (to be made atomic by the caller):
    xlnet_model.ckpt.{index,data-00000-of-00001}, TF's `checkpoint` state file, xlnet_config.json. Returns notes,
    among them the run settings the original takes as flags, not from its config."""
    config: XLNetConfig = getattr(model, "config")
    scope = classifier_scope(config, task)
    tensors, notes = tf_tensors(model, scope)
    tf_cfg, cfg_notes = tf_config(config)
    write_bundle(directory / TF_PREFIX, tensors)
    (directory / "checkpoint").write_text(f'model_checkpoint_path: "{TF_PREFIX}"\n'
                                          f'all_model_checkpoint_paths: "{TF_PREFIX}"\n', encoding="utf-8")
    (directory / TF_CONFIG).write_text(json.dumps(tf_cfg, indent=2) + "\n", encoding="utf-8")
    flags = {"dropout": config.dropout, "dropatt": config.dropatt, "clamp_len": config.clamp_len}
    if type(model).__name__ == "XLNetLMHeadModel":
        flags.update(mem_len=config.mem_len, bi_data=config.bi_data, same_length=config.same_length)
    if config.attn_type == "uni":
        notes.append("attn_type uni: the original scripts always attend both ways (xlnet.py fixes attn_type bi)")
    if type(model).__name__ == "XLNetForSequenceClassification":
        flag = "--task_name" if config.num_labels == 1 else "--cls_scope"
        notes.append(f"the classifier is under model/{scope}/ (run_classifier.py finds it with {flag}="
                     f"{scope.split('_', 1)[1]})")
    notes.append("run settings the original takes as flags: " + " ".join(f"--{k}={v}" for k, v in flags.items()))
    return cfg_notes + notes


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"xlnet convert: note: {note}", file=sys.stderr)
