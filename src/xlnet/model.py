"""XLNet in one file: embeddings, two-stream relative attention, Transformer-XL memory, and the LM head.

Layout is batch-first everywhere: hidden states are [B, L, d_model], attention scores [B, n_head, L, K] where
K = M + L keys (M cached memory states followed by the L current tokens). Parameter names and shapes map 1:1
onto Hugging Face's XLNet so checkpoints move between the two without renaming.

Reading order: relative positions -> masks -> RelativeAttention (content stream h, query stream g) ->
FeedForward -> Layer -> XLNetModel (the `transformer`) -> XLNetLMHeadModel (permutation LM).

Two implementations of the attention, chosen once at construction from `config.attn_impl`: "reference" (this
file: the formulation of the paper and HF, three score tensors and dense masks, easy to read) and "fast"
(fast_attention.py: one score tensor per stream, query stream only at the targets, the final layer only where it
is read, cheaper dropout). Same parameters, same function; tests/test_fast_attention.py holds them to each other
and to HF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlnet.checkpoint import PretrainedMixin
from xlnet.config import XLNetConfig
from xlnet.fast_attention import FastDropout, FastInputs, fast_forward, fast_inputs, fast_layer

NEG_INF = 1e30  # subtracted from masked scores (HF's constant: rows with every key masked stay finite)

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class XLNetOutput:
    """What every model returns; fields a head does not produce stay None."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    mems: list[Tensor] | None = None
    last_hidden_state: Tensor | None = None  # content stream h (at target_positions), or query stream g
    # output_hidden_states: the content stream entering each layer and leaving the last (HF's order; the last is
    # [B, 1, d] under cls_only)
    hidden_states: list[Tensor] | None = None
    # question answering (inference): beam over starts x ends, and the answerability logit
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    start_top_log_probs: Tensor | None = None
    start_top_index: Tensor | None = None
    end_top_log_probs: Tensor | None = None
    end_top_index: Tensor | None = None
    cls_logits: Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# relative positions and masks


def relative_positions(config: XLNetConfig, qlen: int, klen: int, bsz: int, device: torch.device) -> Tensor:
    """Sinusoid embeddings of the relative distances klen, klen-1, ..., -qlen+1 (uni: ..., 0): [B or 1, R, d].

    With bi_data the first half of the batch reads the text forwards and the second half backwards, so the
    second half gets negated distances.
    """
    end = -qlen if config.attn_type == "bi" else -1
    fwd = torch.arange(klen, end, -1, device=device, dtype=torch.float32)
    seqs = [fwd, -fwd] if config.bi_data else [fwd]
    if config.clamp_len > 0:
        seqs = [s.clamp(-config.clamp_len, config.clamp_len) for s in seqs]
    freq = torch.arange(0, config.d_model, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / torch.pow(10000, freq / config.d_model)
    embs = [torch.cat([torch.sin(s[:, None] * inv_freq), torch.cos(s[:, None] * inv_freq)], dim=-1) for s in seqs]
    if not config.bi_data:
        return embs[0][None]
    half = bsz // 2
    return torch.cat([embs[0][None].expand(half, -1, -1), embs[1][None].expand(bsz - half, -1, -1)])


def causal_mask(config: XLNetConfig, qlen: int, mlen: int, device: torch.device) -> Tensor:
    """uni attention: [L, K] bool, True = masked. Query i sees memory and tokens <= i; with same_length every
    query sees exactly mlen + 1 keys (the oldest ones drop out of view)."""
    ones = torch.ones(qlen, mlen + qlen, dtype=torch.bool, device=device)
    mask = ones.triu(mlen + 1)
    if config.same_length:
        mask[:, :qlen] |= ones[:, :qlen].tril(-1)
    return mask


def attention_masks(config: XLNetConfig, qlen: int, mlen: int, attention_mask: Tensor | None,
                    perm_mask: Tensor | None, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Boolean masks [B or 1, L, K] (True = may not attend) for the content stream h and the query stream g.

    The query stream follows perm_mask as given (a target never sees itself); the content stream additionally
    always sees its own token. Memory is never masked by padding or permutation.
    """
    mask = causal_mask(config, qlen, mlen, device)[None] if config.attn_type == "uni" else None
    data = None
    if attention_mask is not None:
        data = (attention_mask == 0)[:, None, :]  # padding keys
    if perm_mask is not None:
        data = perm_mask > 0 if data is None else data | (perm_mask > 0)
    if data is not None:
        data = F.pad(data, (mlen, 0), value=False)
        mask = data if mask is None else mask | data
    if mask is None:
        return None, None
    self_key = F.pad(torch.eye(qlen, dtype=torch.bool, device=device), (mlen, 0))  # key mlen + i of query i
    return mask & ~self_key, mask


def segment_matrix(token_type_ids: Tensor | None, mlen: int) -> Tensor | None:
    """[B, L, K] bool: True where query i and key j are in different segments (memory counts as segment 0)."""
    if token_type_ids is None:
        return None
    keys = F.pad(token_type_ids, (mlen, 0), value=0)
    return token_type_ids[:, :, None] != keys[:, None, :]


def rel_shift(bd: Tensor, klen: int) -> Tensor:
    """Turn scores against the distance table [.., L, R] into scores by key [.., L, K], entry (i, j) holding
    distance mlen + i - j. Row i of the table starts at distance klen, so key j sits at column L - i + j;
    viewing the buffer with one row fewer slides row i left by L - i without a gather."""
    *lead, qlen, rlen = bd.shape
    bd = bd.reshape(*lead, rlen, qlen)[..., 1:, :]
    return bd.reshape(*lead, qlen, rlen - 1)[..., :klen]


# ---------------------------------------------------------------------------------------------------------------
# layers


class RelativeAttention(nn.Module):
    """Two-stream relative multi-head attention with the post-LN residual (HF: `rel_attn`)."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        d, n, dh = config.d_model, config.n_head, config.d_head
        self.n_head, self.d_head, self.scale = n, dh, 1.0 / math.sqrt(dh)
        for name in ("q", "k", "v", "o", "r"):  # einsum weights [d_model, n_head, d_head]
            setattr(self, name, nn.Parameter(torch.empty(d, n, dh)))
        self.r_w_bias = nn.Parameter(torch.empty(n, dh))  # u: content bias
        self.r_r_bias = nn.Parameter(torch.empty(n, dh))  # v: position bias
        self.r_s_bias = nn.Parameter(torch.empty(n, dh))  # b: segment bias
        self.seg_embed = nn.Parameter(torch.empty(2, n, dh))  # s+ (same segment), s- (different)
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fast = config.attn_impl == "fast"
        self.dropout = (FastDropout if self.fast else nn.Dropout)(config.dropout)
        self.dropatt = nn.Dropout(config.dropatt)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, k_r: Tensor, seg: Tensor | None, mask: Tensor | None) -> Tensor:
        """Reference attention core. q [B, L, n, dh]; k, v [B, K, n, dh]; k_r [B, R, n, dh]; -> [B, L, n, dh]."""
        ac = torch.einsum("bind,bjnd->bnij", q + self.r_w_bias, k)  # content
        bd = rel_shift(torch.einsum("bind,bjnd->bnij", q + self.r_r_bias, k_r), klen=k.shape[1])  # position
        score = ac + bd
        if seg is not None:  # segment: (q + b) . s+/- picked by whether i and j share a segment
            ef = torch.einsum("bind,snd->bnis", q + self.r_s_bias, self.seg_embed)
            score = score + torch.where(seg[:, None], ef[..., 1:], ef[..., :1])
        score = score * self.scale
        if mask is not None:
            score = score - NEG_INF * mask[:, None].to(score.dtype)
        prob = self.dropatt(torch.softmax(score, dim=-1))
        return torch.einsum("bnij,bjnd->bind", prob, v)

    def post_attention(self, x: Tensor, attn_vec: Tensor) -> Tensor:
        out = torch.einsum("bind,hnd->bih", attn_vec, self.o)
        return self.layer_norm(x + self.dropout(out))

    def forward(self, h: Tensor, g: Tensor | None, pos_emb: Tensor, mem: Tensor | None, seg: Tensor | None = None,
                mask_h: Tensor | None = None, mask_g: Tensor | None = None, target_mapping: Tensor | None = None,
                fast: FastInputs | None = None) -> tuple[Tensor, Tensor | None]:
        if self.fast:
            return fast_forward(self, h, g, pos_emb, fast, mem)
        cat = h if mem is None else torch.cat([mem, h], dim=1)
        k = torch.einsum("bjh,hnd->bjnd", cat, self.k)
        v = torch.einsum("bjh,hnd->bjnd", cat, self.v)
        k_r = torch.einsum("brh,hnd->brnd", pos_emb, self.r).expand(h.shape[0], -1, -1, -1)
        q_h = torch.einsum("bih,hnd->bind", h, self.q)
        h_out = self.post_attention(h, self.attend(q_h, k, v, k_r, seg, mask_h))
        if g is None:
            return h_out, None
        # Query stream: each prediction slot asks from the position target_mapping assigns it; queries are
        # scattered to positions (so relative distances and masks are those of the position) and gathered back.
        q_g = torch.einsum("bmh,hnd->bmnd", g, self.q)
        q_g = torch.einsum("bmnd,bml->blnd", q_g, target_mapping)
        attn_g = self.attend(q_g, k, v, k_r, seg, mask_g)
        attn_g = torch.einsum("blnd,bml->bmnd", attn_g, target_mapping)
        return h_out, self.post_attention(g, attn_g)


class FeedForward(nn.Module):
    """Position-wise FFN with post-LN residual (HF: `ff`)."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.layer_1 = nn.Linear(config.d_model, config.d_inner)
        self.layer_2 = nn.Linear(config.d_inner, config.d_model)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = (FastDropout if config.attn_impl == "fast" else nn.Dropout)(config.dropout)
        self.activation = ACTIVATIONS[config.ff_activation]

    def forward(self, x: Tensor) -> Tensor:
        y = self.dropout(self.activation(self.layer_1(x)))
        return self.layer_norm(x + self.dropout(self.layer_2(y)))


class Layer(nn.Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.rel_attn = RelativeAttention(config)
        self.ff = FeedForward(config)
        self.fast = config.attn_impl == "fast"

    def forward(self, h: Tensor, g: Tensor | None, h_keep: int | None = None,
                **attn: Any) -> tuple[Tensor | None, Tensor | None]:
        """h_keep: the content stream's output at the last h_keep positions only (None: all, 0: none); the fast
        path computes just those rows, the reference computes all and slices."""
        if self.fast:  # both streams through one FFN call
            return fast_layer(self, h, g, h_keep=h_keep, **attn)
        h, g = self.rel_attn(h, g, **attn)
        if h_keep is not None:
            h = h[:, h.shape[1] - h_keep:] if h_keep else None
        return (None if h is None else self.ff(h)), (None if g is None else self.ff(g))


# ---------------------------------------------------------------------------------------------------------------
# the transformer


class XLNetModel(PretrainedMixin, nn.Module):
    """The XLNet body (HF: `XLNetModel`, stored as `transformer` inside every head)."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = config
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.d_model))  # w: query stream input g^(0)
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.n_layer))
        self.dropout = (FastDropout if config.attn_impl == "fast" else nn.Dropout)(config.dropout)
        self.blocks_compiled = False  # set by training.compile_blocks
        if not config.untie_r:  # one set of relative biases shared by every layer (original TF `untie_r=False`)
            first = self.layer[0].rel_attn
            for layer in self.layer[1:]:
                for name in ("r_w_bias", "r_r_bias", "r_s_bias"):
                    setattr(layer.rel_attn, name, getattr(first, name))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (RelativeAttention, XLNetModel)):
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=std)

    def cache_mem(self, h: Tensor, prev: Tensor | None) -> Tensor:
        """Next segment's memory: the reused prefix of this segment's layer input, appended to the old memory and
        cut to mem_len (0 keeps everything). Gradients never flow into memory."""
        if self.config.reuse_len > 0:
            h = h[:, : self.config.reuse_len]
        keep = self.config.mem_len
        if keep > 0:  # only the rows kept: no cat of everything to slice it afterwards
            h = h[:, -keep:]
            prev = None if prev is None or h.shape[1] == keep else prev[:, h.shape[1] - keep:]
        new = h if prev is None else torch.cat([prev, h], dim=1)
        # a buffer of its own: the same layout every step (torch.compile guards on strides) and no larger one kept
        return new.detach().contiguous()

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                perm_mask: Tensor | None = None, target_mapping: Tensor | None = None,
                mems: list[Tensor] | None = None, use_mems: bool | None = None, cls_only: bool = False,
                output_hidden_states: bool = False) -> XLNetOutput:
        """cls_only: last_hidden_state only at the last position (<cls>), [B, 1, d], for heads that read nothing
        else; the final layer then computes its content stream for that row alone. With a query stream the final
        layer's content stream is never read (mems cache layer inputs) and is skipped in any case.
        output_hidden_states: also return every layer's content stream (e.g. for distillation)."""
        bsz, qlen = input_ids.shape
        mlen = mems[0].shape[1] if mems else 0
        device = input_ids.device
        use_mems = self.config.mem_len > 0 if use_mems is None else use_mems
        if self.config.bi_data and bsz % 2:
            raise ValueError(f"bi_data needs an even batch, got {bsz}")
        if output_hidden_states and target_mapping is not None:
            raise ValueError("output_hidden_states returns the content stream; not with a query stream")

        mask_h, mask_g = attention_masks(self.config, qlen, mlen, attention_mask, perm_mask, device)
        pos_emb = self.dropout(relative_positions(self.config, qlen, mlen + qlen, bsz, device))
        h = self.dropout(self.word_embedding(input_ids))  # content stream h^(0) = e(x)
        g = None
        if target_mapping is not None:  # query stream g^(0) = w at every prediction slot
            target_mapping = target_mapping.to(h.dtype)
            # materialized, not an expand: every block sees the same strides (compiled blocks share one graph)
            g = self.dropout(self.mask_emb.repeat(bsz, target_mapping.shape[1], 1))
        if self.config.attn_impl == "fast":  # additive masks gathered at the targets, segments for the core
            rlen = pos_emb.shape[1]
            attn = dict(fast=fast_inputs(qlen, mlen, rlen, mask_h, mask_g, token_type_ids, target_mapping, h.dtype,
                                          device, compiled=self.blocks_compiled or torch.compiler.is_compiling()))
        else:
            attn = dict(seg=segment_matrix(token_type_ids, mlen), mask_h=mask_h, mask_g=mask_g,
                        target_mapping=target_mapping)

        new_mems = []
        hidden_states = [h] if output_hidden_states else None
        last_keep = 0 if g is not None else (1 if cls_only else None)  # what the final layer's h must hold
        for i, layer in enumerate(self.layer):
            mem = mems[i] if mems else None
            if use_mems:
                new_mems.append(self.cache_mem(h, mem))
            h_keep = last_keep if i == len(self.layer) - 1 else None
            h, g = layer(h, g, pos_emb=pos_emb, mem=mem, h_keep=h_keep, **attn)
            if hidden_states is not None:
                hidden_states.append(h)
        out = self.dropout(h if g is None else g)
        return XLNetOutput(last_hidden_state=out, mems=new_mems if use_mems else None, hidden_states=hidden_states)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self, weight_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay the matrices, spare biases (incl. the relative r_*_bias) and LayerNorms, as the
    original `exclude_from_weight_decay` (LayerNorm, layer_norm, bias). Tied tensors are listed once."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if p.requires_grad:
            (no_decay if ("bias" in name or "layer_norm" in name or "LayerNorm" in name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class XLNetPreTrainedHead(PretrainedMixin, nn.Module):
    """Base of every head: the `transformer` body plus HF-style init of the head's own layers."""

    label_layer: str | None = None  # the layer with a row per label name (checkpoint.drop_unfit_head)

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = config
        self.transformer = XLNetModel(config)

    def init_head(self) -> None:
        for name, module in self.named_children():
            if name != "transformer":
                module.apply(self.transformer._init_weights)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return param_groups(self, weight_decay)

    def body(self, input_ids: Tensor, **kw: Any) -> XLNetOutput:
        return self.transformer(input_ids, **kw)


class XLNetLMHeadModel(XLNetPreTrainedHead):
    """Language-model head: predicts tokens through the tied word embedding (HF: `lm_loss` with bias).

    Permutation LM: the query stream at each target slot (`target_mapping`, with `perm_mask`). Content-stream
    objectives (masked LM, left-to-right LM with a causal `perm_mask`): `target_positions` [B, P] picks the
    positions whose content stream predicts `labels` [B, P]. With neither, every position has logits.
    """

    hf_architecture = "XLNetLMHeadModel"

    def __init__(self, config: XLNetConfig):
        super().__init__(config)
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size)
        self.init_head()
        self.lm_loss.weight = self.transformer.word_embedding.weight

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, target_positions: Tensor | None = None,
                **kw: Any) -> XLNetOutput:
        if target_positions is not None and kw.get("target_mapping") is not None:
            raise ValueError("target_positions reads the content stream; pass it without a target_mapping")
        out = self.body(input_ids, **kw)
        if target_positions is not None:
            h = out.last_hidden_state
            out.last_hidden_state = h.gather(1, target_positions[:, :, None].expand(-1, -1, h.shape[-1]))
        out.logits = self.lm_loss(out.last_hidden_state)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), labels.reshape(-1))
        return out
