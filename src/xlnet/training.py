"""What every training loop here shares: devices and torchrun, optimizer and schedule, checkpoints,
metrics, progress, signals, throughput/MFU, and the scale wrappers (DDP, FSDP2, activation checkpointing).

Pretraining (`xlnet.pretrain`) and fine-tuning use the same pieces; none of them knows about the model's
internals beyond `model.transformer.layer` (the list of blocks the wrappers act on) and
`model.param_groups(weight_decay)` (decay / no-decay split, when the model offers one).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from xlnet.checkpoint import WEIGHTS
from xlnet.errors import XLNetError
from xlnet.fileio import DirKind, atomic_dir, atomic_write

# ================================================================================================
# Devices and torchrun
# ================================================================================================


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is there, else cpu; 'cuda' -> cuda:<local_rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XLNetError(f"device {name!r} requested but CUDA is not available")
    return device


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Read torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK); init NCCL on GPU, gloo on CPU. timeout_s: how
    long a collective may wait for a rank (None: torch's default, 10 minutes for NCCL), e.g. while rank 0
    alone evaluates."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":  # kernels, streams and events go to the current device: --device cuda:1 must be it
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        wait = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size, **wait)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def run_on_ranks(device: str, work: Callable[[DistInfo], Any], timeout_s: float | None = None) -> tuple[DistInfo, Any]:
    """work(info) on every rank of a torchrun job (or the one process), then a barrier and the group torn down,
    also on error. The barrier holds the other ranks until rank 0 has written its last outputs: a rank that
    tore gloo down while another was still working was seen to abort at exit."""
    info = init_distributed(device, timeout_s)
    try:
        result = work(info)
        barrier()
    finally:
        teardown_distributed()
    return info, result


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """In-place sum/mean/max over ranks (no-op in a single process); returns `t`."""
    if multi_process():
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(t, op=reduce_op)
        if op == "mean":
            t /= dist.get_world_size()
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for 'bf16' (GPU, or CPU when asked explicitly); a no-op for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise XLNetError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return precision


def resolve_compile(value: bool | str, device: torch.device, fsdp: bool = False) -> bool:
    """torch.compile or not: 'auto' compiles on a single GPU or DDP (on an H200 the compiled base-model PLM step
    ran 1.5x the eager one, fine-tuning 1.9x: benchmarks/README.md) and stays eager on CPU, where inductor's
    backward was slower than the eager step, and under FSDP2, not tried on GPUs here."""
    from argparse import ArgumentTypeError

    from xlnet.cliconf import parse_bool

    if str(value).lower() == "auto":
        return device.type == "cuda" and not fsdp
    try:
        return parse_bool(str(value))
    except ArgumentTypeError:
        raise XLNetError(f"compile must be auto, true or false, not {value!r}") from None


def allow_recompiles(limit: int = 64) -> None:
    """Let one compiled function keep up to `limit` variants (dynamo's default, 8, would send the rest to eager
    code): each block or attention call has one per stream, dropout on or off, memory or none and shape."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compile_blocks(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: torch.compile every transformer block in place (names, state dict and wrappers
    unchanged). The blocks share one code object, so one compiled graph serves them all, plus variants for the
    final block (fewer rows), the first segment (no memory), evaluation and each new shape: a cold compile of the
    base model took 70 s instead of 232 s for the whole model as one graph, at the same step time (CPU, 2 threads,
    benchmarks/README.md). Shapes stay static (a training run repeats one shape)."""
    allow_recompiles()
    for block in transformer_blocks(model):
        block.compile(**{"dynamic": False, **options})
    body = unwrap(model)
    getattr(body, "transformer", body).blocks_compiled = True  # the attention core then suits a compiled block
    return model


def maybe_compile(model: nn.Module, value: bool | str, device: torch.device, fsdp: bool = False) -> bool:
    """compile_blocks(model) when resolve_compile says so; True if it did. Under 'auto' a frame that fails to
    compile runs eager with a warning (a GPU machine without the C compiler Triton's launcher needs, say); asked
    for explicitly, a failure is an error."""
    if not resolve_compile(value, device, fsdp):
        return False
    if str(value).lower() == "auto":
        torch._dynamo.config.suppress_errors = True
    compile_blocks(model)
    return True


# ================================================================================================
# Seeds and RNG state
# ================================================================================================


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors/ints so `weights_only=True` loads them."""
    _, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": (torch.tensor(py_keys, dtype=torch.int64), py_gauss),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_keys, py_gauss = state["python"]
    random.setstate((3, tuple(int(k) for k in py_keys.tolist()), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count: keep the fresh CUDA state
            torch.cuda.set_rng_state_all(state["cuda"])


# ================================================================================================
# Optimizer and schedule
# ================================================================================================


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The model's own decay / no-decay split when it has one; else matrices decay, vectors don't."""
    model = unwrap(model)
    if hasattr(model, "param_groups"):
        return model.param_groups(weight_decay)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def default_layer_depth(name: str, n_layer: int) -> int:
    """0 for embeddings, i+1 for `...layer.<i>...`, n_layer for everything above the stack (heads)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(k in name for k in ("word_embedding", "mask_emb")):
        return 0
    return n_layer


def layerwise_lr_groups(model: nn.Module, weight_decay: float, lr_decay: float, n_layer: int,
                        depth: Callable[[str, int], int] = default_layer_depth) -> list[dict[str, Any]]:
    """Layer-wise lr decay (paper, fine-tuning): block l of L gets lr * lr_decay**(L - l), embeddings
    lr * lr_decay**L, heads the full lr. Groups carry `lr_scale`, which `build_optimizer` applies;
    the decay / no-decay split of `decay_groups` is kept inside each depth."""
    no_decay_ids = set()
    for g in decay_groups(model, weight_decay):
        if g.get("weight_decay", weight_decay) == 0.0:
            no_decay_ids.update(id(p) for p in g["params"])
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        d = min(max(depth(name, n_layer), 0), n_layer)
        buckets.setdefault((d, id(p) in no_decay_ids), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_scale": lr_decay ** (n_layer - d)}
            for (d, nd), ps in sorted(buckets.items())]


def build_optimizer(groups: list[dict[str, Any]], lr: float, eps: float = 1e-6,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over param groups; a group's `lr_scale` (layer-wise decay) multiplies `lr`."""
    groups = [dict(g, lr=lr * g.get("lr_scale", 1.0)) for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    # the fused kernel: one pass per tensor instead of a dozen for-each passes (CUDA: 7 ms of a 146 ms XLNet-base
    # step on an H100; CPU: 5 ms instead of 31 ms for the tiny preset on one thread); plain tensors only (FSDP2's
    # DTensors keep the default)
    fused = all(p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor for p in params) or None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def warmup_linear_decay(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier for update number `step` (0-based): linear ramp to 1 over `warmup_steps`, then
    linear decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = (total_steps - step) / max(1, total_steps - warmup_steps)
        return max(min_ratio, remaining)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup_steps, total_steps, min_ratio))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0: measure only); returns the total norm before clipping, on the device (read it
    with the step's other scalars, `PendingScalars`). FSDP2-safe."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


class PendingScalars:
    """A step's scalars (loss, gradient norm, loss terms) on their way to the host in one copy, started when the
    step has been queued (on a GPU asynchronously, into pinned memory, behind an event). `read()` waits for that
    step alone, so a loop that reads step n after queueing step n + 1 keeps the host a step ahead of the device;
    a plain `.item()` would also wait for everything queued since, and leave the device idle until the host
    queues more."""

    def __init__(self, **values: torch.Tensor) -> None:
        self.names = list(values)
        self._event: torch.cuda.Event | None = None
        self._flat = torch.stack([v.detach().float().reshape(()) for v in values.values()]) if values else None
        if self._flat is not None and self._flat.is_cuda:
            stream = torch.cuda.current_stream(self._flat.device)  # the copy's, whichever device is current
            host = torch.empty(self._flat.shape, dtype=self._flat.dtype, pin_memory=True)
            self._flat = host.copy_(self._flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def read(self) -> dict[str, float]:
        if self._event is not None:
            self._event.synchronize()
        return {} if self._flat is None else dict(zip(self.names, self._flat.tolist()))



# ================================================================================================
# Scale wrappers: applied from outside, in this order: activation checkpointing, compile, FSDP2 or DDP
# ================================================================================================


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile and DDP wrappers (FSDP2 shards in place, nothing to strip)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    model = unwrap(model)
    blocks = getattr(getattr(model, "transformer", model), "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise XLNetError(f"{type(model).__name__} has no `transformer.layer` list to wrap")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block in backward: wraps the block's `forward` (names and state dict unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in transformer_blocks(model):
        if getattr(block, "_xlnet_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._xlnet_checkpointed = True
    return model


def apply_fsdp(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """FSDP2: shard every block, then the root (embeddings + tied LM head stay together in the root)."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the root returns mems (detached views of layer inputs); nothing modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """find_unused: some parameters get no gradient in a step (DDP then searches the graph for them each step)."""
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def is_fsdp(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in unwrap(model).parameters())


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-batches before the last one (DDP); FSDP2 uses its own flag."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def set_fsdp_sync(model: nn.Module, sync: bool) -> None:
    inner = unwrap(model)
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(sync)


# ================================================================================================
# Training checkpoints: <out>/checkpoints/step_00001000/{model.safetensors, config.json,
#   training_state.pt (optimizer, scheduler, RNG, extra tensors), trainer_state.json (step, data position, ...)}
# ================================================================================================

CHECKPOINT_DIR = "checkpoints"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT = DirKind(TRAINER_STATE, "a training checkpoint")  # what save_checkpoint may replace


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with trainer_state.json), oldest first."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# atomic_dir's temp name for a checkpoint (mkdtemp: `.step_N.` + 8 of [a-z0-9_] + `.tmp`), and those that
# save_pretrained's own atomic_dir makes beside it for the weights (its name again, prefixed by `.`)
_CHECKPOINT_TMP_RE = re.compile(r"\.?\.step_\d+\.[a-z0-9_]{8}\.tmp(?:\.[a-z0-9_]{8}\.(?:tmp|old))?")
_CHECKPOINT_FILES = frozenset({WEIGHTS, "config.json", TRAINING_STATE, TRAINER_STATE})


def remove_checkpoint_debris(out_dir: str | Path) -> list[str]:
    """Remove what a killed process left in out_dir/checkpoints and nothing else: half-written checkpoints under
    their temp names, and step_* directories without trainer_state.json (a prune cut short) that hold nothing
    but checkpoint files. Neither is ever listed, so nothing else would remove them. Call on the main rank, holding
    the run directory's lock (the temp directories of a live run look the same), before training; says on stderr
    what it removed. `.step_*.old` directories stay: a crash inside atomic_dir's
    swap can leave the only copy of a complete checkpoint there."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir() or root.is_symlink():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        if _CHECKPOINT_TMP_RE.fullmatch(p.name):
            what = "half-written"
        elif re.fullmatch(r"step_\d+", p.name) and not (p / TRAINER_STATE).exists():
            if any(c.name not in _CHECKPOINT_FILES or not c.is_file() or c.is_symlink() for c in p.iterdir()):
                continue  # something a checkpoint never holds: not ours to delete
            what = "incomplete"
        else:
            continue
        shutil.rmtree(p, ignore_errors=True)  # debris that will not go must not stop the run
        if not p.exists():
            removed.append(f"{p.name} ({what})")
    if removed:
        print(f"note: removed leftovers of an interrupted checkpoint save or prune in {root}: {', '.join(removed)}",
              file=sys.stderr)
    return removed


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                with_model: bool) -> tuple[dict | None, dict | None]:
    """Whole (unsharded, CPU) model and optimizer state keyed by parameter names; collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = unwrap(model)
    msd = get_model_state_dict(inner, options=opts) if with_model else None
    osd = get_optimizer_state_dict(inner, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any | None, trainer_state: dict[str, Any], tensors: dict[str, Any] | None = None,
                    *, is_main: bool = True, keep_last: int = 0) -> Path:
    """Write one checkpoint directory atomically (call on every rank; only `is_main` writes).

    The directory loads with `from_pretrained`. `trainer_state` must be JSON (step, data position, config);
    `tensors` (e.g. mems) go into training_state.pt beside optimizer, scheduler and RNG states.
    `keep_last` > 0 removes older step_* siblings beyond that many.
    """
    path = Path(path)
    inner = unwrap(model)
    msd, osd = _full_state(inner, optimizer, with_model=is_fsdp(inner))  # FSDP: gather the weights too
    if is_main:
        with atomic_dir(path, replaces=CHECKPOINT) as tmp:
            if msd is None:
                inner.save_pretrained(tmp)
            else:  # FSDP: load the gathered weights into an unsharded CPU copy and let it write itself
                plain = type(inner)(inner.config)
                plain.load_state_dict(msd, strict=False)
                plain.save_pretrained(tmp)
            state = {"optimizer": osd, "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng": rng_state(), "tensors": tensors or {}}
            with atomic_write(tmp / TRAINING_STATE) as f:
                torch.save(state, f)
            with atomic_write(tmp / TRAINER_STATE, "w") as f:
                json.dump(trainer_state, f, indent=2)
        if keep_last > 0:
            older = [p for p in list_checkpoints(path.parent.parent) if p != path]
            for stale in older[:max(0, len(older) - (keep_last - 1))]:
                # renamed to a temp name first (atomic), so a prune cut short leaves debris that
                # remove_checkpoint_debris recognises, never a step_* that lost some of its files
                with contextlib.suppress(OSError):
                    stale = stale.rename(stale.with_name(f".{stale.name}.{secrets.token_hex(4)}.tmp"))
                shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / TRAINER_STATE
    if not file.is_file():
        raise XLNetError(f"not a training checkpoint (no {TRAINER_STATE}): {path}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise XLNetError(f"{file}: not valid JSON ({e})") from None


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint (the weights come from `from_pretrained`
    before wrapping). Returns the extra tensors saved with it (e.g. mems), on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    file = Path(path) / TRAINING_STATE
    if not file.is_file():
        raise XLNetError(f"not a training checkpoint (no {TRAINING_STATE}): {path}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file is a user-facing problem
        raise XLNetError(f"{file}: cannot load ({str(e).splitlines()[0]})") from None
    if optimizer is not None and state.get("optimizer") is not None:
        set_optimizer_state_dict(unwrap(model), optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state.get("tensors", {})


# ================================================================================================
# Metrics: JSONL (the source of truth, plotted at the end) + TensorBoard
# ================================================================================================


class MetricsLogger:
    """`log("train", step, loss=..., lr=...)` appends a JSON line and TensorBoard scalars `train/loss`.

    With `resume_step`, rows after that step (from a run that was cut off) are dropped first, so the
    file describes exactly one trajectory. Disabled loggers (ranks > 0) do nothing.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:  # a fresh run: no curves from an earlier run in the same directory
            self.path.unlink(missing_ok=True)
            shutil.rmtree(Path(out_dir) / "tensorboard", ignore_errors=True)
        elif self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_write(self.path, "w") as f:
                f.write("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                         purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:  # tensorboard is a declared dependency; tolerate its absence anyway
                self._tb = None

    def log(self, split: str, step: int, **values: float | int | None) -> None:
        if not self.enabled:
            return
        row = {"split": split, "step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in values.items() if v is not None})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ================================================================================================
# Progress bar (tqdm shows steps, elapsed and ETA; we add loss and tokens/s)
# ================================================================================================


class Progress:
    """`enabled` shows the bar; `echo` (default: same as enabled) lets `write` print messages above it."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 echo: bool | None = None):
        from tqdm.auto import tqdm

        self.echo = enabled if echo is None else echo
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
                        dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=False)
        self.bar.update(n)

    def write(self, message: str) -> None:
        if self.echo:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# ================================================================================================
# SIGTERM / Ctrl-C: finish the step, checkpoint, exit
# ================================================================================================


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGTERM or the first Ctrl-C set `stop.requested` (the loop
    checkpoints and exits at the next step boundary); a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}
        self._pending: PendingScalars | None = None  # the last all-reduced flag, under torchrun

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignal":
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was asked to stop. A single process does not touch the device. Under
        torchrun each call all-reduces this rank's flag and answers with the previous call's result (read as
        PendingScalars), so the ranks agree a call later without a round trip that would wait for every step
        queued since: the loop keeps a step ahead of the device there too."""
        if not multi_process():
            return self.requested is not None
        flag = torch.full((1,), 1.0 if self.requested else 0.0, device=device)  # a fill: no copy that would wait
        previous, self._pending = self._pending, PendingScalars(stop=all_reduce(flag, "max"))
        return previous is not None and previous.read()["stop"] > 0


# ================================================================================================
# Throughput and MFU
# ================================================================================================


def xlnet_flops_per_token(d_model: int, n_layer: int, d_inner: int, vocab_size: int, seq_len: int,
                          mem_len: int = 0, num_predict: int | None = None, query_stream: bool = True) -> float:
    """Training FLOPs per input token (3 x forward matmul FLOPs) of one PLM step, two streams included, counting
    the work whose result is read (as benchmarks/throughput.py's `flops`).

    Content stream per token and layer: q,k,v,o projections 8d², FFN 4·d·d_inner, scores and weighted
    sum over klen = seq_len + mem_len keys (content + position terms) 6·d·klen, position projection
    2d²·(klen + seq_len)/seq_len; in the final layer only k, v and the position projection (nothing reads its
    content stream). The query stream repeats q, o, FFN and attention for the P targets only, and the tied LM
    head costs 2·d·V per target. Without a query stream (masked or left-to-right LM) every layer's content
    stream is read and the P predictions cost only the head.
    """
    d, klen = d_model, seq_len + mem_len
    p = (num_predict if num_predict is not None else seq_len) / seq_len
    positions = 2 * d * d * (klen + seq_len) / seq_len
    content = 8 * d * d + 4 * d * d_inner + 6 * d * klen + positions
    head = p * 2 * d * vocab_size
    if not query_stream:
        return 3.0 * (n_layer * content + head)
    query = p * (4 * d * d + 4 * d * d_inner + 6 * d * klen)
    forward = (n_layer - 1) * content + (4 * d * d + positions) + n_layer * query + head
    return 3.0 * forward


# Dense bf16 tensor-core peaks (fp32 runs use TF32 peaks would be misleading: MFU is reported for bf16 only).
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s used for MFU, or None where unknown (CPU, fp32, unlisted GPU)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16.items() if k in name), None)


class Throughput:
    """Tokens/s and MFU over the last `window` steps (the first, warm-up step is excluded)."""

    def __init__(self, flops_per_token: float, peak: float | None, window: int = 20):
        self.flops_per_token, self.peak, self.window = flops_per_token, peak, window
        self._marks: list[tuple[float, int]] = []
        self.total_tokens = 0
        self.total_time = 0.0

    def step(self, tokens: int, seconds: float) -> None:
        self.total_tokens += tokens
        self.total_time += seconds
        self._marks.append((seconds, tokens))
        del self._marks[:-self.window]

    @property
    def recent_steps(self) -> int:
        """How many steps tokens_per_s and mfu cover (up to `window`)."""
        return len(self._marks)

    @property
    def tokens_per_s(self) -> float:
        t = sum(s for s, _ in self._marks)
        return sum(n for _, n in self._marks) / t if t > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        if self.peak is None:
            return None
        return self.tokens_per_s * self.flops_per_token / self.peak


class StepProfiler:
    """torch.profiler over `steps` training steps from step `first` on (steps 0: off), main process only; then
    out_dir/profile.txt and profile.json, the trace (Perfetto, chrome://tracing). profile.txt opens with the
    window's time per step: wall, host ops and, on a GPU, device kernels, whose shortfall against the wall time
    is how long the device waited for the host. Then the ops by their own time: device time on a GPU, then
    host time (where a host-bound loop spends it). Call before(steps done) and after(steps done) around each
    step, close() at the end."""

    def __init__(self, steps: int, first: int, out_dir: Path, info: "DistInfo") -> None:
        self.first, self.steps = first, steps
        self.pending = steps > 0 and info.is_main
        self.device, self.out_dir = info.device, Path(out_dir)
        self._prof: torch.profiler.profile | None = None
        self._window = (0, 0)  # (steps done when it started, steps done so far)
        self._start = 0.0  # perf_counter when it started
        self.written: str | None = None  # profile.txt, once written

    def before(self, done: int) -> None:
        if self.pending and done >= self.first:
            self.pending = False
            cuda = [torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else []
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, *cuda])
            self._prof.__enter__()
            self._window = (done, done)
            self._start = self._clock()

    def _clock(self) -> float:
        if self.device.type == "cuda":  # the window's wall time covers its kernels
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def closes_after(self, done: int) -> bool:
        """Whether the window closes once step `done` is finished: a loop that queues a step ahead queues none
        beyond it first, so the window holds its steps alone."""
        return self._prof is not None and done - self._window[0] >= self.steps

    def after(self, done: int) -> None:
        if self._prof is not None:
            self._window = (self._window[0], done)
            if done - self._window[0] >= self.steps:
                self.close()

    def close(self) -> None:
        """Write what was recorded (a run that ends inside the window writes its part)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        wall_s = self._clock() - self._start
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        cuda = self.device.type == "cuda"
        with atomic_write(self.out_dir / "profile.txt", "w") as f:
            f.write(f"# torch.profiler, training steps {self._window[0] + 1} to {self._window[1]}, {self.device}\n")
            f.write(time_per_step(events, wall_s, self._window[1] - self._window[0], cuda) + "\n")
            for key in ("self_device_time_total", "self_cpu_time_total")[0 if cuda else 1:]:
                label = "device" if key == "self_device_time_total" else "host"
                f.write(f"# ops by their own {label} time\n" + events.table(sort_by=key, row_limit=40) + "\n")
        tmp = self.out_dir / ".profile.json.tmp"
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, self.out_dir / "profile.json")
        self.written = str(self.out_dir / "profile.txt")


def time_per_step(events, wall_s: float, steps: int, cuda: bool) -> str:
    """'# per step: ...' from a profiler's key_averages over `steps` steps of wall_s seconds: wall time, host ops'
    own time (all threads) and, with CUDA, the kernels' time and the share of the wall time the device idled."""
    from torch.autograd import DeviceType

    def ms(us: float) -> float:
        return us / 1e3 / max(steps, 1)

    wall = wall_s * 1e3 / max(steps, 1)
    host = ms(sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU))
    line = f"# per step: {wall:.1f} ms wall, {host:.1f} ms of host ops (own time)"
    if cuda:
        kernels = ms(sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA))
        line += f", {kernels:.1f} ms of device kernels (the device idle {max(0.0, 1 - kernels / wall):.0%} of it)"
    return line


def cuda_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30

