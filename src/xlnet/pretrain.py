"""`xlnet pretrain`: permutation-LM pretraining, resumable to the exact trajectory, torchrun-ready.

`--objective mlm` (BERT's masked LM), `clm` (left-to-right LM) or `infoword` (masked LM plus InfoWord's InfoNCE
term, `infonce` in the logs) trains the same backbone on the same samples with another objective (data/plm.py,
"Objectives"), to compare them downstream.

    xlnet pretrain                                   # mini model on the embedded corpus (~5 min on 2 CPU cores)
    xlnet pretrain --config configs/pretrain-mini.yaml --max-steps 5000 --out-dir runs/mini
    xlnet pretrain --out-dir runs/tiny --resume      # continue from the latest checkpoint
    torchrun --nproc-per-node 8 -m xlnet.cli pretrain --config big.yaml --fsdp true

One optimizer step = `batch_size` stream rows = world_size x grad_accum micro-batches. Every micro-batch owns
fixed rows of the global layout (`PLMSampler.for_rank`) and its own Transformer-XL memory, so 2 ranks x 1
micro-batch compute exactly what 1 rank x 2 micro-batches does. Run directory:

    config.yaml  metrics.jsonl  tensorboard/  loss.png  data/ (embedded corpus, prepared on first use)
    checkpoints/step_00000500/  model.safetensors config.json (from_pretrained-ready)
                                training_state.pt (optimizer, scheduler, RNG, mems)  trainer_state.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from xlnet import training as T
from xlnet.cliconf import add_dataclass_arguments, build_dataclass
from xlnet.config import XLNetConfig
from xlnet.errors import XLNetError
from xlnet.fileio import DirLock, atomic_write, require_dir

if TYPE_CHECKING:  # annotations only; the functions import them where they are used
    from xlnet.data.plm import PLMConfig, PLMSampler, Prefetcher
    from xlnet.data.prepare import Corpus


@dataclass
class PretrainConfig:
    # model: a preset plus optional overrides (None keeps the preset's value)
    model: str = "mini"  # preset: tiny, mini, base, large; the fields below override single values (None = keep)
    vocab_size: int | None = None  # None: the tokenizer's; else it must match the tokenizer's
    d_model: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    d_head: int | None = None  # None with d_model given = d_model / n_head
    d_inner: int | None = None  # feed-forward width
    # no dropout by default: the default run reads each token one or two times (the paper used 0.1; YAML null = 0.1)
    dropout: float | None = 0.0
    dropatt: float | None = 0.0  # dropout on the attention probabilities
    initializer_range: float | None = None  # init std of every weight (None = the preset's: mini 0.05, others 0.02)
    # data ("" = the embedded corpus and tokenizer)
    data_dir: str = ""  # `xlnet prepare`'s output; "" = the embedded corpus, prepared once
    tokenizer_dir: str = ""  # "" = the embedded tokenizer (vocab 8000)
    seq_len: int = 64  # tokens per sample
    reuse_len: int = 32  # the sample's first part, which continues the row's previous sample
    mem_len: int = 48  # Transformer-XL memory: hidden states kept from the previous step (0 = none)
    num_predict: int = 16  # span targets per sample (partial prediction: seq_len / K)
    perm_size: int | None = None  # None = reuse_len (reference)
    bi_data: bool = False  # half of each batch's rows read their streams backwards
    max_ngram: int = 5  # longest span target; 1 = single-token targets (the paper's "- span-based prediction")
    # objective infoword: the InfoNCE term's weight next to the masked-LM loss (at the demo's scale, 1 held the
    # masked-LM loss near the unigram plateau and fine-tuned 4 points worse than 0.1; README)
    infoword_weight: float = 0.1
    objective: Literal["plm", "mlm", "clm", "infoword"] = "plm"  # XLNet's | BERT's masked LM | left-to-right LM
    # clm: predict every next token, or only the span targets (plm's and mlm's tokens, as many: equal signal)
    clm_predict: Literal["all", "targets"] = "all"
    # plm: a sampled factorization order per sample (XLNet), or the identity order: the same targets and query
    # stream, read left to right (the step from XLNet towards a left-to-right LM)
    factorization_order: Literal["random", "left-to-right"] = "random"
    # optimization
    batch_size: int = 32  # stream rows per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per step (batch_size rows in all)
    lr: float = 1.5e-3  # AdamW peak, after linear warm-up, decayed linearly to 0
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    warmup_steps: int = 100
    max_steps: int = 2000
    clip: float = 1.0  # gradient-norm clip
    # evaluation, checkpoints, logging
    eval_every: int = 100  # steps between valid-loss evaluations
    eval_batches: int = 4  # global batches of the valid split per evaluation (same ones every time)
    save_every: int = 250  # steps between checkpoints
    keep_checkpoints: int = 2  # the newest ones kept
    log_every: int = 1  # steps between metrics.jsonl lines
    out_dir: str = "runs/pretrain"  # checkpoints/, metrics.jsonl, loss.png, config.yaml
    seed: int = 0  # weights, samples and dropout
    # runtime (may change on resume)
    device: str = "auto"  # auto = cuda if available, else cpu; or cpu, cuda, cuda:1 ...
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    compile: str = "auto"  # auto = compile every block on a GPU (not under FSDP), eager on CPU; or true / false
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, more time
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    progress: bool = True  # progress bar
    prefetch: int | None = None  # batches built ahead by a worker process (None: 2 on a GPU, 0 on a CPU)
    # profile this many training steps after the first 3 (torch.profiler): profile.txt (time per step, device
    # idle share, ops by time) and profile.json (a trace for Perfetto or chrome://tracing) in out_dir
    profile_steps: int = 0

    def model_config(self, vocab_size: int | None = None) -> XLNetConfig:
        """The preset with this config's overrides; vocab_size (the tokenizer's) where none is set."""
        names = ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner", "dropout", "dropatt",
                 "initializer_range")
        overrides = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        if "d_model" in overrides and "d_head" not in overrides:  # keep n_head * d_head == d_model
            overrides["d_head"] = overrides["d_model"] // overrides.get("n_head", _preset(self.model)["n_head"])
        return XLNetConfig.from_preset(self.model, mem_len=self.mem_len, reuse_len=self.reuse_len,
                                       bi_data=self.bi_data, **overrides)

    def plm_config(self, micro_batch: int, seed: int) -> "PLMConfig":
        from xlnet.data.plm import PLMConfig

        return PLMConfig(seq_len=self.seq_len, reuse_len=self.reuse_len, batch_size=micro_batch,
                         num_predict=self.num_predict, perm_size=self.perm_size, bi_data=self.bi_data, seed=seed,
                         max_ngram=self.max_ngram, objective=self.objective, clm_predict=self.clm_predict,
                         factorization_order=self.factorization_order)


# Fields that may differ between a checkpoint and the run resuming it: they do not change the trajectory
# (max_steps re-stretches the schedule on purpose; grad_accum may trade against the number of processes as long
# as the rows per micro-batch stay the same, which the sampler state checks).
RUNTIME_FIELDS = ("out_dir", "max_steps", "grad_accum", "eval_every", "eval_batches", "save_every", "keep_checkpoints",
                  "log_every", "device", "precision", "compile", "activation_checkpointing", "fsdp", "progress",
                  "prefetch", "profile_steps")


def _preset(name: str) -> dict[str, Any]:
    from xlnet.config import PRESETS

    if name not in PRESETS:
        raise XLNetError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ================================================================================================
# data: corpus + tokenizer -> one train sampler per process (its micro-batches), a fresh valid sampler per eval
# ================================================================================================


def cache_dir() -> Path:
    """$XLNET_CACHE, else $XDG_CACHE_HOME/xlnet, else ~/.cache/xlnet."""
    if os.environ.get("XLNET_CACHE"):
        return Path(os.environ["XLNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xlnet"


def default_data_dir(tokenizer_dir: Path, cache_root: Path) -> Path:
    """Prepare the embedded corpus with `tokenizer_dir` once into `cache_root` (keyed by both checksums)."""
    from xlnet.assets import default_corpus_path
    from xlnet.data.prepare import MANIFEST, prepare
    from xlnet.fileio import sha256_file
    from xlnet.tokenizer import Tokenizer

    corpus = default_corpus_path()
    key = sha256_file(corpus)[:10] + "-" + sha256_file(Tokenizer.load(tokenizer_dir).model_path)[:10]
    out = cache_root / f"embedded-{key}"
    if not (out / MANIFEST).is_file():
        prepare(tokenizer_dir, [corpus], out, valid_fraction=0.02, progress=False)
    return out


@dataclass
class Data:
    train_tokens: Any
    train_sent: Any
    valid_tokens: Any
    valid_sent: Any
    word_start: Any
    vocab_size: int
    data_dir: Path
    tokenizer_dir: Path
    # sha256 of the manifest and of spiece.model, keyed by the fields they stand for: a resumed run checks the
    # files' contents, so data or a tokenizer moved (or the package reinstalled elsewhere) still resumes
    identity: dict[str, str]


def load_data(cfg: PretrainConfig, info: T.DistInfo) -> Data:
    from xlnet.data.prepare import MANIFEST, _read_manifest, load_corpus
    from xlnet.fileio import sha256_file
    from xlnet.tokenizer import Tokenizer, default_tokenizer_dir

    tok_dir = Path(cfg.tokenizer_dir) if cfg.tokenizer_dir else default_tokenizer_dir()
    if not tok_dir.exists():
        raise XLNetError(f"tokenizer directory not found: {tok_dir}")
    tok = Tokenizer.load(tok_dir)
    if cfg.data_dir:
        data_dir = Path(cfg.data_dir)
        require_dir(data_dir, "data directory", " (make one with `xlnet prepare`)")
    else:
        data_dir = default_data_dir(tok_dir, cache_dir()) if info.is_main else None
        T.barrier()  # rank 0 prepares, the others find it ready
        if data_dir is None:
            data_dir = default_data_dir(tok_dir, cache_dir())
    train = load_corpus(data_dir, "train", verify=info.is_main)
    manifest = _read_manifest(data_dir)
    valid = _load_valid(data_dir, manifest, cfg.eval_every, info)
    model_vocab = cfg.vocab_size or tok.vocab_size
    if not (tok.vocab_size == train.vocab_size == model_vocab):
        raise XLNetError(f"vocab sizes disagree: tokenizer {tok_dir} has {tok.vocab_size}, data {data_dir} has "
                         f"{train.vocab_size}, model has {model_vocab} (leave --vocab-size out or use matching "
                         f"files)")
    want = manifest.get("tokenizer", {}).get("sha256")
    tok_sha = sha256_file(tok.model_path)
    if want and want != tok_sha:
        raise XLNetError(f"{data_dir} was prepared with another tokenizer than {tok.model_path} (sha256 differs)")
    identity = {"data_dir": sha256_file(data_dir / MANIFEST), "tokenizer_dir": tok_sha}
    return Data(train.tokens, train.sent_ids, valid.tokens if valid else None, valid.sent_ids if valid else None,
                tok.word_start_table(), tok.vocab_size, data_dir, tok_dir, identity)


def _load_valid(data_dir: Path, manifest: dict[str, Any], eval_every: int, info: T.DistInfo) -> Corpus | None:
    """The valid split; None for data prepared with --valid-fraction 0 when the run never evaluates."""
    from xlnet.data.prepare import load_corpus

    if manifest.get("splits", {}).get("valid", {}).get("shards", True):
        valid = load_corpus(data_dir, "valid", verify=info.is_main)
        if len(valid) > 0:
            return valid
    if eval_every > 0:
        raise XLNetError(f"{data_dir} has no valid split (prepared with --valid-fraction 0): pretrain with "
                         f"--eval-every 0, or prepare it again with --valid-fraction 0.01")
    return None


def make_sampler(cfg: PretrainConfig, data: Data, info: T.DistInfo, split: str) -> "PLMSampler":
    from xlnet.data.plm import PLMSampler

    micro = cfg.batch_size // (info.world_size * cfg.grad_accum)
    tokens, sent = (data.train_tokens, data.train_sent) if split == "train" else (data.valid_tokens, data.valid_sent)
    seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
    try:
        return PLMSampler.for_rank(tokens, sent, data.word_start, cfg.plm_config(micro, seed),
                                   world_size=info.world_size, rank=info.rank, accum_steps=cfg.grad_accum)
    except XLNetError as e:
        hint = (": prepare the data with a larger --valid-fraction, lower --batch-size, or pretrain with --eval-every 0"
                if split == "valid" else "")
        raise XLNetError(f"{split} split of {data.data_dir}: {e}{hint}") from None


# what goes to the device, per objective: perm_mask is rebuilt there from its [B, L] rank form (1/L of the floats)
DEVICE_INPUTS = {
    "plm": ("input_ids", "token_type_ids", "target_index", "labels", "perm_q_rank", "perm_k_rank"),
    "mlm": ("input_ids", "token_type_ids", "target_positions", "labels", "perm_q_rank", "perm_k_rank"),
    "clm": ("input_ids", "token_type_ids", "target_positions", "labels", "perm_q_rank", "perm_k_rank"),
}
# InfoWord's n-gram inputs: batch key -> the model's argument
SPAN_INPUTS = {"span_ids": "input_ids", "span_type_ids": "token_type_ids", "span_mask": "attention_mask"}
DEVICE_INPUTS["infoword"] = DEVICE_INPUTS["mlm"] + tuple(SPAN_INPUTS)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs on `device` (asynchronous from pinned memory), perm_mask and target_mapping built there
    from the compact batch."""
    from xlnet.data.plm import densify

    return densify({k: v.to(device, non_blocking=True) for k, v in batch.items()})


def prefetch(sampler: "PLMSampler", device: torch.device, depth: int | None = None) -> "Prefetcher":
    """By default, on a GPU, a worker process builds the next two batches (compact: the dense masks are built on
    the device) while the device works, pinned for asynchronous copies; on a CPU, where the step itself needs
    the cores, inline."""
    from xlnet.data.plm import Prefetcher

    if depth is None:
        depth = 2 if device.type == "cuda" else 0
    return Prefetcher(sampler, depth=depth, device=device, keys=DEVICE_INPUTS[sampler.cfg.objective], dense=False)


# ================================================================================================
# mems of every micro-batch <-> one global [batch_size, mem_len, d_model] tensor per layer (for checkpoints)
# ================================================================================================


def gather_mems(mems: list[list[torch.Tensor] | None]) -> list[torch.Tensor] | None:
    """Global rows in order: rank-major, then micro-batch (the layout PLMSampler.for_rank uses)."""
    if not mems or mems[0] is None:
        return None
    local = [torch.cat([m[layer] for m in mems]) for layer in range(len(mems[0]))]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [t.cpu() for t in local]
    out = []
    for t in local:
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts).cpu())
    return out


def scatter_mems(full: list[torch.Tensor] | None, info: T.DistInfo, grad_accum: int,
                 device: torch.device) -> list[list[torch.Tensor] | None]:
    if not full:
        return [None] * grad_accum
    micro = full[0].shape[0] // (info.world_size * grad_accum)
    out = []
    for m in range(grad_accum):
        start = (info.rank * grad_accum + m) * micro
        out.append([t[start:start + micro].to(device) for t in full])
    return out


# ================================================================================================
# the loop
# ================================================================================================


def predictions_per_row(cfg: PretrainConfig) -> int:
    """Tokens a row predicts: the PLM and MLM targets, or every next token (left-to-right)."""
    return cfg.seq_len - 1 if cfg.objective == "clm" and cfg.clm_predict == "all" else cfg.num_predict


def check_config(cfg: PretrainConfig, info: T.DistInfo) -> None:
    from xlnet.data.plm import check_objective

    check_objective(cfg.objective)  # before anything is written (the sampler checks it again)
    n = info.world_size * cfg.grad_accum
    checks = [
        (cfg.batch_size > 0 and cfg.grad_accum > 0, "batch_size and grad_accum must be positive"),
        (cfg.batch_size % n == 0, f"batch_size {cfg.batch_size} must be divisible by world_size x grad_accum = {n}"),
        (not cfg.bi_data or (cfg.batch_size // max(n, 1)) % 2 == 0,
         "bi_data needs an even micro-batch (forward + reversed rows)"),
        (cfg.max_steps > 0, "max_steps must be positive"),
        (0 <= cfg.warmup_steps, "warmup_steps must be >= 0"),
        (cfg.eval_every >= 0 and cfg.save_every >= 0 and cfg.log_every > 0,
         "eval_every/save_every must be >= 0 and log_every > 0"),
        (cfg.mem_len >= 0, "mem_len must be >= 0"),
        (cfg.objective != "infoword" or not cfg.fsdp, "objective infoword runs two forward passes a step; not "
                                                     "with fsdp (use DDP)"),
        (cfg.infoword_weight >= 0, "infoword_weight must be >= 0"),
        (cfg.prefetch is None or cfg.prefetch >= 0, "prefetch must be >= 0"),
        (cfg.profile_steps >= 0, "profile_steps must be >= 0"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (cfg.weight_decay >= 0 and cfg.adam_eps > 0, "weight_decay must be >= 0 and adam_eps > 0"),
        (all(p is None or 0 <= p < 1 for p in (cfg.dropout, cfg.dropatt)), "dropout and dropatt must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise XLNetError(f"invalid pretrain config: {message}")
    if cfg.batch_size % n == 0:  # the sampler's own checks (lengths, targets), before anything is written
        cfg.plm_config(cfg.batch_size // n, cfg.seed).validate()


def resolve_resume(cfg: PretrainConfig, resume: str | None) -> Path | None:
    out = Path(cfg.out_dir)
    if resume is None:
        if T.latest_checkpoint(out) is not None:
            raise XLNetError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out-dir")
        return None
    if resume in ("latest", "auto", ""):
        ckpt = T.latest_checkpoint(out)
        if ckpt is None:
            root = out / T.CHECKPOINT_DIR
            partial = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
            raise XLNetError(f"--resume: no checkpoint under {root}" + (
                f" ({', '.join(partial)} without {T.TRAINER_STATE}: incomplete or damaged)" if partial else ""))
        return ckpt
    ckpt = Path(resume)
    if not ckpt.is_dir():
        raise XLNetError(f"--resume: no such checkpoint directory: {ckpt}")
    if not (ckpt / T.TRAINER_STATE).is_file():
        raise XLNetError(f"--resume: {ckpt} is not a training checkpoint (no {T.TRAINER_STATE})")
    return ckpt


def saved_config(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's PretrainConfig fields (trainer_state.json); fields added since it was written: defaults."""
    return {**dataclasses.asdict(PretrainConfig()), **state.get("config", {})}


def check_resume_config(state: dict[str, Any], cfg: PretrainConfig, identity: dict[str, str], ckpt: Path) -> None:
    """The checkpoint's config against this run's; the data and tokenizer by content where the checkpoint recorded
    it (checkpoints from before that compare the paths)."""
    now = dataclasses.asdict(cfg)
    saved = saved_config(state)
    saved_identity = state.get("identity", {})

    def same(k: str) -> bool:
        if k in saved_identity:
            return saved_identity[k] == identity[k]
        if k in identity and isinstance(saved.get(k), str):  # a path, recorded relative before runs resolved it
            return Path(saved[k]).resolve() == Path(now[k]).resolve()
        return saved.get(k) == now[k]

    diff = [k for k in now if k not in RUNTIME_FIELDS and not same(k)]
    if diff:
        k = diff[0]
        what = (f"{now[k]!r} holds other files than the checkpoint's {saved.get(k)!r} (sha256 differs)"
                if k in saved_identity else f"is {now[k]!r}, the checkpoint has {saved.get(k)!r}")
        raise XLNetError(f"config does not match checkpoint {ckpt}: {k} {what}"
                         f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}")


def build_model(cfg: PretrainConfig, model_cfg: XLNetConfig, ckpt: Path | None, info: T.DistInfo,
                precision: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain model, wrapped model to train): AC, then compile (per block, in place), then FSDP2 or DDP."""
    from xlnet.model import XLNetLMHeadModel

    if ckpt is not None:
        model = XLNetLMHeadModel.from_pretrained(ckpt, verbose=False)
        if model.config != model_cfg:
            raise XLNetError(f"{ckpt}/config.json does not match the model this config builds")
    else:
        model = XLNetLMHeadModel(model_cfg)
    model.to(info.device)
    wrapped: torch.nn.Module = model
    if cfg.activation_checkpointing:
        T.apply_activation_checkpointing(model)
    T.maybe_compile(model, cfg.compile, info.device, cfg.fsdp)
    if cfg.fsdp:
        if not info.distributed:
            raise XLNetError("--fsdp needs torchrun with more than one process")
        wrapped = T.apply_fsdp(model, precision)
    elif info.distributed:
        # without a query stream (every objective but plm) its input, mask_emb, gets no gradient
        wrapped = T.wrap_ddp(model, info, find_unused=cfg.objective != "plm")
    return model, wrapped


def infonce(global_states: Tensor, local_states: Tensor) -> Tensor:
    """InfoWord's term: each row's masked sentence (its <cls> state) scores every row's n-gram (the n-gram's
    own <cls> state) by a dot product, scaled by 1/sqrt(d) as attention scores are (layer-normed states would
    otherwise start with scores of +-d); cross-entropy towards its own n-gram, the other rows' as negatives."""
    scores = global_states.float() @ local_states.float().T / math.sqrt(global_states.shape[-1])
    return F.cross_entropy(scores, torch.arange(len(scores), device=scores.device))


def split_spans(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the LM pass's inputs, InfoWord's n-gram inputs under the model's argument names; empty otherwise)."""
    return ({k: v for k, v in batch.items() if k not in SPAN_INPUTS},
            {SPAN_INPUTS[k]: v for k, v in batch.items() if k in SPAN_INPUTS})


def objective_losses(model: torch.nn.Module, batch: dict[str, Tensor],
                     mems: list | None) -> tuple[Any, Tensor, Tensor | None]:
    """(model output, LM loss, InfoNCE term or None). infoword: the masked-LM pass, whose last slot reads the
    sentence's <cls>, then a pass over each row's n-gram alone."""
    inputs, spans = split_spans(batch)
    out = model(**inputs, mems=mems)
    if not spans:
        return out, out.loss, None
    # past DDP's wrapper: it allows one forward per backward (the gradients from both passes still meet in each
    # parameter's single accumulation, which is where DDP's hooks reduce them)
    local = T.unwrap(model)(**spans, use_mems=False)
    return out, out.loss, infonce(out.last_hidden_state[:, -1], local.last_hidden_state[:, -1])


def forward_backward(model: torch.nn.Module, batches: Iterator[dict[str, torch.Tensor]], mems: list,
                     cfg: PretrainConfig, info: T.DistInfo, precision: str) -> tuple[Tensor, dict[str, Tensor]]:
    """One step's micro-batches: gradients accumulate (synced on the last one), each micro-batch carries its
    own memory (`mems[m]`, updated in place). Returns the step's mean LM loss over all ranks, and InfoWord's
    InfoNCE term (which the gradient adds, times infoword_weight) when the objective has it, on the device."""
    loss_sum = torch.zeros((), device=info.device)
    nce_sum = torch.zeros((), device=info.device)
    for m in range(cfg.grad_accum):
        last = m == cfg.grad_accum - 1
        batch = to_device(next(batches), info.device)
        if cfg.fsdp:
            T.set_fsdp_sync(model, last)
        with T.no_sync(model, not last), T.autocast(info.device, precision):
            out, loss, nce = objective_losses(model, batch, mems[m])
            total = loss if nce is None else loss + cfg.infoword_weight * nce
        (total / cfg.grad_accum).backward()
        mems[m] = out.mems
        loss_sum += loss.detach().float() / cfg.grad_accum
        if nce is not None:
            nce_sum += nce.detach().float() / cfg.grad_accum
    extras = {"infonce": T.all_reduce(nce_sum, "mean")} if cfg.objective == "infoword" else {}
    return T.all_reduce(loss_sum, "mean"), extras


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: PretrainConfig, data: Data, info: T.DistInfo, precision: str) -> float:
    """Mean loss (of the run's objective) over the same `eval_batches` valid batches every time, memory carried
    within the pass."""
    batches = prefetch(make_sampler(cfg, data, info, "valid"), info.device)
    was_training = model.training
    model.eval()
    mems: list[list[torch.Tensor] | None] = [None] * cfg.grad_accum
    total = torch.zeros((), device=info.device)
    try:
        for _ in range(cfg.eval_batches):
            for m in range(cfg.grad_accum):
                batch = to_device(next(batches), info.device)
                with T.autocast(info.device, precision):  # the LM loss (InfoWord's n-gram pass is not needed)
                    out = model(**split_spans(batch)[0], mems=mems[m])
                mems[m] = out.mems
                total += out.loss.float()
    finally:
        batches.close()
    model.train(was_training)
    total /= max(1, cfg.eval_batches * cfg.grad_accum)
    return float(T.all_reduce(total, "mean"))


def pretrain(cfg: PretrainConfig, resume: str | None = None, info: T.DistInfo | None = None,
             stop_after_steps: int | None = None, resume_hint: str = "continue with --resume") -> dict[str, Any]:
    """Run (or continue) pretraining; returns the summary printed at the end. Call once per process.

    `stop_after_steps` ends this run after that many steps as a signal would (checkpoint, then `--resume`):
    time-sliced jobs on preemptible machines, and the resume tests. `resume_hint` ends the line printed when a
    signal stops the run (a caller such as `xlnet demo` continues another way).
    """
    wall_start = time.perf_counter()
    run = Pretraining(cfg, resume, info or T.init_distributed(cfg.device))
    try:
        run.train(stop_after_steps, resume_hint)
        return run.summary(wall_start)
    finally:
        run.release()


class Pretraining:
    """One run: set up, or restored from a checkpoint, on construction; `train` steps it to the end or a stop."""

    def __init__(self, cfg: PretrainConfig, resume: str | None, info: T.DistInfo):
        check_config(cfg, info)
        self.cfg, self.info = cfg, info
        self.compiling = T.resolve_compile(cfg.compile, info.device, cfg.fsdp)  # fails before anything is written
        self.precision = T.resolve_precision(cfg.precision, info.device)
        self.out_dir = Path(cfg.out_dir)
        ckpt = resolve_resume(cfg, resume)
        saved = T.read_trainer_state(ckpt) if ckpt is not None else None
        self.data = load_data(cfg, info)
        self.model_cfg = cfg.model_config(self.data.vocab_size)
        # absolute: finetune and convert find the tokenizer from any directory (trainer_state.json records it)
        self.resolved = dataclasses.replace(cfg, data_dir=str(self.data.data_dir.resolve()),
                                            tokenizer_dir=str(self.data.tokenizer_dir.resolve()))
        if saved is not None:
            check_resume_config(saved, self.resolved, self.data.identity, ckpt)  # type: ignore[arg-type]
            self._note_new_schedule(saved)
        # the samplers fail on a split too small for the batch before anything is written (no torch RNG draws)
        self.sampler = make_sampler(self.resolved, self.data, info, "train")
        if cfg.eval_every > 0:
            make_sampler(self.resolved, self.data, info, "valid")
        self.lock = self._hold_out_dir()

        T.set_seed(cfg.seed)  # same on every rank: dropout streams stay identical, so rank 0's RNG resumes all
        self.model, self.wrapped = build_model(cfg, self.model_cfg, ckpt, info, self.precision)
        self.optimizer = T.build_optimizer(T.decay_groups(self.model, cfg.weight_decay), cfg.lr, eps=cfg.adam_eps)
        self.scheduler = T.build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.step, self.tokens_seen, self.mems = 0, 0, [None] * cfg.grad_accum
        self.train_loss = float("nan")
        self.last_valid: float | None = None
        self.first_valid: float | None = None
        self.last_ckpt: Path | None = ckpt
        self.saved_at: int | None = None  # the step last saved by this run
        self.stopped: str | None = None
        if saved is not None:
            self._restore(ckpt, saved)  # type: ignore[arg-type]
        self.start_step = self.step
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.throughput = T.Throughput(
            T.xlnet_flops_per_token(self.model_cfg.d_model, self.model_cfg.n_layer, self.model_cfg.d_inner,
                                    self.model_cfg.vocab_size, cfg.seq_len, cfg.mem_len, predictions_per_row(cfg),
                                    cfg.objective == "plm"),
            T.peak_flops(info.device, self.precision))
        self.logger = T.MetricsLogger(self.out_dir, enabled=info.is_main,
                                      resume_step=self.step if ckpt is not None else None)
        self.bar = T.Progress(cfg.max_steps, initial=self.step, enabled=info.is_main and cfg.progress,
                              desc="pretrain", echo=info.is_main)

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _note_new_schedule(self, saved: dict[str, Any]) -> None:
        before, now = saved_config(saved)["max_steps"], self.cfg.max_steps
        if self.info.is_main and before != now:
            print(f"note: --max-steps {now}, the checkpoint's run had {before}: the learning rate decays to step "
                  f"{now} from here (a jump at step {saved['step'] + 1}; not the trajectory of a run started with "
                  f"{now})", file=sys.stderr)

    def _hold_out_dir(self) -> DirLock:
        """Rank 0 locks the run directory (held until `release`), clears a killed run's debris and writes
        config.yaml."""
        if not self.info.is_main:
            return DirLock(self.out_dir, enabled=False)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = DirLock(self.out_dir)  # before the debris, which may be a live run's
        T.remove_checkpoint_debris(self.out_dir)  # a killed run's half-written or half-pruned checkpoints
        with atomic_write(self.out_dir / "config.yaml", "w") as f:
            yaml.safe_dump(dataclasses.asdict(self.resolved), f, sort_keys=False)
        return lock

    def _restore(self, ckpt: Path, saved: dict[str, Any]) -> None:
        """Optimizer, scheduler, RNG, sampler position and memory as the checkpoint's run left them."""
        cfg, info = self.cfg, self.info
        tensors = T.load_training_state(ckpt, self.wrapped, self.optimizer, self.scheduler)
        try:
            self.sampler.load_state_dict(saved["sampler"])
        except XLNetError as e:
            raise XLNetError(f"{ckpt}: cannot continue with {info.world_size} process(es) x grad_accum "
                             f"{cfg.grad_accum} (keep the rows per micro-batch): {e}") from None
        self.step, self.tokens_seen = int(saved["step"]), int(saved["tokens"])
        self.mems = scatter_mems(tensors.get("mems"), info, cfg.grad_accum, info.device)
        if cfg.max_steps != saved["config"]["max_steps"]:  # the schedule is rebuilt for the new length
            for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                g["lr"] = base * self.scheduler.lr_lambdas[0](self.step)
        # what the checkpoint's run last measured, until this run measures again
        self.last_valid, self.first_valid = saved.get("valid_loss"), saved.get("valid_loss_start")
        self.train_loss = saved.get("train_loss", self.train_loss)

    # -- steps ----------------------------------------------------------------------------------------------------

    def train(self, stop_after_steps: int | None, resume_hint: str) -> None:
        """Step to max_steps, or to a signal or `stop_after_steps` (then save). The host queues step n + 1
        before it reads step n's scalars, so the device never waits for the host between steps; except after a
        step that is evaluated or saved (they must see the model as that step left it) or that ends the
        profiled window. `launched` counts the steps queued, `self.step` those read; `queued` is the one in
        between."""
        cfg = self.cfg
        if self.compiling:
            self.bar.write("torch.compile: the first steps and evaluations compile the blocks (slow first steps; "
                           "--compile false skips it)")
        if self.step == 0 and cfg.eval_every > 0:
            self._evaluate()
        self.wrapped.train()
        self.batches = prefetch(self.sampler, self.info.device, cfg.prefetch)
        self.profiler = T.StepProfiler(cfg.profile_steps, self.start_step + 3, self.out_dir, self.info)
        launched, queued = self.step, None
        self.clock = time.perf_counter()
        try:
            with T.StopSignal() as stop:
                while True:
                    stop_now = stop.agreed(self.info.device)
                    if stop_after_steps is not None and launched - self.start_step >= stop_after_steps \
                            and launched < cfg.max_steps:
                        stop.requested, stop_now = stop.requested or "stop_after_steps", True
                    ahead = None
                    if not stop_now and launched < cfg.max_steps and not (
                            queued is not None and self._reads_first(launched)):
                        self.profiler.before(launched)
                        ahead = self._launch()
                        launched += 1
                    if queued is not None:
                        self._read(queued, queued_next=ahead is not None)
                    queued = ahead
                    if queued is None and (stop_now or launched >= cfg.max_steps):
                        break
                if stop_now:
                    if self.saved_at != self.step:
                        self.last_ckpt = self._save()
                    self.stopped = stop.requested or "signal"
                    self.bar.write(f"{self.stopped}: saved {self.last_ckpt}; {resume_hint}")
        finally:
            self.profiler.close()
            self.batches.close()
            self.bar.close()
            self.logger.close()

    def _launch(self) -> dict[str, Any]:
        """Queue one training step; its scalars are read once the next step is queued (PendingScalars)."""
        loss_t, extras_t = forward_backward(self.wrapped, self.batches, self.mems, self.cfg, self.info,
                                            self.precision)
        norm_t = T.clip_grad_norm(self.wrapped, self.cfg.clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "scalars": T.PendingScalars(loss=loss_t, grad_norm=norm_t, **extras_t)}

    def _reads_first(self, at: int) -> bool:
        """Whether step `at` (just read) must be read before the next is queued."""
        return self._evaluates(at) or self._saves(at) or self.profiler.closes_after(at)

    def _evaluates(self, at: int) -> bool:
        return self.cfg.eval_every > 0 and (at % self.cfg.eval_every == 0 or at == self.cfg.max_steps)

    def _saves(self, at: int) -> bool:
        return (self.cfg.save_every > 0 and at % self.cfg.save_every == 0) or at == self.cfg.max_steps

    def _read(self, queued: dict[str, Any], queued_next: bool) -> None:
        """Read a queued step's scalars, then log, evaluate and save as that step asks. A non-finite step is never
        saved: the run stops there."""
        cfg = self.cfg
        extras = queued["scalars"].read()
        self.train_loss, grad_norm = extras.pop("loss"), extras.pop("grad_norm")
        if not (math.isfinite(self.train_loss) and math.isfinite(grad_norm)):
            raise XLNetError(f"non-finite {'loss' if not math.isfinite(self.train_loss) else 'gradient norm'} at "
                             f"step {self.step + 1}; stopped without saving (last good checkpoint: "
                             f"{self.last_ckpt or 'none'}); try a lower --lr or --precision fp32")
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        now = time.perf_counter()
        self.throughput.step(self.tokens_per_step, now - self.clock)
        self.profiler.after(self.step)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self.logger.log("train", self.step, loss=self.train_loss, lr=queued["lr"], grad_norm=grad_norm,
                            tokens=self.tokens_seen, tokens_per_s=round(self.throughput.tokens_per_s, 1),
                            mfu=self.throughput.mfu, mem_gib=T.cuda_memory_gib(self.info.device), **extras)
        if self._evaluates(self.step):
            self._evaluate()
            self.bar.write(f"step {self.step}: valid loss {self.last_valid:.4f}")
        self.bar.update(1, loss=f"{self.train_loss:.3f}", tok_s=f"{self.throughput.tokens_per_s:,.0f}",
                        valid=None if self.last_valid is None else f"{self.last_valid:.3f}")
        if self._saves(self.step):
            self.last_ckpt, self.saved_at = self._save(), self.step
        self.clock = now if queued_next else time.perf_counter()  # evaluation and saving are not timed

    def _evaluate(self) -> None:
        self.last_valid = evaluate(self.wrapped, self.resolved, self.data, self.info, self.precision)
        self.first_valid = self.last_valid if self.first_valid is None else self.first_valid
        self.logger.log("valid", self.step, loss=self.last_valid)

    def _save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens_seen, "config": dataclasses.asdict(self.resolved),
                 "identity": self.data.identity, "world_size": self.info.world_size,
                 "sampler": self.sampler.state_dict(), "train_loss": self.train_loss,
                 "valid_loss": self.last_valid, "valid_loss_start": self.first_valid}
        return T.save_checkpoint(T.checkpoint_path(self.out_dir, self.step), self.wrapped, self.optimizer,
                                 self.scheduler, state, {"mems": gather_mems(self.mems)}, is_main=self.info.is_main,
                                 keep_last=self.cfg.keep_checkpoints)

    # -- the end --------------------------------------------------------------------------------------------------

    def summary(self, wall_start: float) -> dict[str, Any]:
        """Plot the loss curves (rank 0) and return the run's summary."""
        plot = None
        if self.info.is_main:
            from xlnet.plots import plot_loss_curves  # matplotlib is slow to import; only needed here

            plot = plot_loss_curves(T.read_metrics(self.logger.path), self.out_dir / "loss.png",
                                    title=f"pretraining ({self.cfg.objective.upper()} loss)")
        tp = self.throughput
        return {
            "steps": self.step, "run_steps": self.step - self.start_step, "tokens": self.tokens_seen,
            "tokens_per_s": tp.total_tokens / max(tp.total_time, 1e-9),
            "recent_tokens_per_s": tp.tokens_per_s, "recent_steps": tp.recent_steps,
            "mfu": tp.mfu, "train_loss": self.train_loss, "valid_loss_start": self.first_valid,
            "valid_loss": self.last_valid, "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "plot": str(plot) if plot else None, "stopped": self.stopped, "train_s": tp.total_time,
            "wall_s": time.perf_counter() - wall_start, "out_dir": str(self.out_dir),
            "objective": self.cfg.objective, "profile": self.profiler.written,
        }

    def release(self) -> None:
        self.lock.release()


def format_summary(s: dict[str, Any]) -> str:
    def f(v: float | None, spec: str = ".4f") -> str:
        return "-" if v is None else format(v, spec)

    # the whole run's rate includes compiling (GPU); MFU is the steady rate's, over the last steps
    recent = (f"; the last {s['recent_steps']} steps {s['recent_tokens_per_s']:,.0f} tokens/s, MFU {s['mfu']:.1%}"
              if s["mfu"] is not None else "")
    speed = (f"{s['tokens_per_s']:,.0f} tokens/s while training{recent}" if s["train_s"] > 0 else
             "the checkpoint had finished: nothing to train")
    # steps and tokens are the whole run's, resumed or not; the time is this process's
    run_steps = s.get("run_steps", s["steps"])
    resumed = f"; {run_steps} of the steps" if 0 < run_steps < s["steps"] else ""
    lines = [
        f"{'stopped by ' + s['stopped'] if s['stopped'] else 'done'}: {s['steps']} steps, {s['tokens']:,} tokens"
        f"{resumed} in {s['wall_s']:.0f}s this run ({speed})",
        f"{s['objective'].upper()} train loss {f(s['train_loss'])}   valid loss {f(s['valid_loss_start'])} -> "
        f"{f(s['valid_loss'])}",
        f"checkpoint {s['checkpoint'] or '-'}",
        f"plot       {s['plot'] or '-'}",
    ] + ([f"profile    {s['profile']} (and profile.json, the trace)"] if s.get("profile") else [])
    return "\n".join(lines)


# ================================================================================================
# CLI
# ================================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="options as YAML keys (flags override them)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                        help="continue the exact trajectory from CHECKPOINT (default: the latest in --out-dir)")
    add_dataclass_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    cfg = build_dataclass(PretrainConfig, args.config, args)
    info, summary = T.run_on_ranks(cfg.device, lambda info: pretrain(cfg, resume=args.resume, info=info))
    if info.is_main:
        print(format_summary(summary))
    if summary["stopped"]:
        return 130 if summary["stopped"] == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    from xlnet.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))
