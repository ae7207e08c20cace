"""Fine-tuning heads on the content stream. Module names match HF so task checkpoints load both ways."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlnet.config import XLNetConfig
from xlnet.model import XLNetLMHeadModel, XLNetModel, XLNetOutput, XLNetPreTrainedHead

MASKED_LOGIT = 1e30  # HF's value for positions that cannot hold an answer (p_mask = 1)


class SequenceSummary(nn.Module):
    """XLNet summarises a sequence by its last token (`<cls>`): Linear + tanh + dropout (HF: `sequence_summary`)."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.summary = nn.Linear(config.d_model, config.d_model)
        self.last_dropout = nn.Dropout(config.summary_last_dropout)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.last_dropout(torch.tanh(self.summary(hidden[:, -1])))


class XLNetForSequenceClassification(XLNetPreTrainedHead):
    """Classification (cross-entropy) or, with num_labels == 1, regression (MSE)."""

    hf_architecture = "XLNetForSequenceClassification"
    label_layer = "logits_proj"

    def __init__(self, config: XLNetConfig):
        super().__init__(config)
        self.sequence_summary = SequenceSummary(config)
        self.logits_proj = nn.Linear(config.d_model, config.num_labels)
        self.init_head()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kw: Any) -> XLNetOutput:
        out = self.body(input_ids, cls_only=True, **kw)
        out.logits = self.logits_proj(self.sequence_summary(out.last_hidden_state))
        if labels is not None:
            if self.config.num_labels == 1:
                # in float32: under bf16 autocast the targets would round (3.8 -> 3.797)
                out.loss = F.mse_loss(out.logits.squeeze(-1).float(), labels.float().reshape(-1))
            else:
                out.loss = F.cross_entropy(out.logits, labels.reshape(-1))
        return out


class XLNetForMultipleChoice(XLNetPreTrainedHead):
    """One score per choice from each choice's summary; softmax over choices. Inputs are [B, n_choices, L]."""

    hf_architecture = "XLNetForMultipleChoice"

    def __init__(self, config: XLNetConfig):
        super().__init__(config)
        self.sequence_summary = SequenceSummary(config)
        self.logits_proj = nn.Linear(config.d_model, 1)
        self.init_head()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kw: Any) -> XLNetOutput:
        n_choices = input_ids.shape[1]
        flat = {k: (v.reshape(-1, *v.shape[2:]) if isinstance(v, Tensor) and k != "mems" else v)
                for k, v in kw.items()}
        out = self.body(input_ids.reshape(-1, input_ids.shape[-1]), cls_only=True, **flat)
        out.logits = self.logits_proj(self.sequence_summary(out.last_hidden_state)).view(-1, n_choices)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits, labels.reshape(-1))
        return out


class XLNetForTokenClassification(XLNetPreTrainedHead):
    """A label per token (labels -100 are ignored)."""

    hf_architecture = "XLNetForTokenClassification"
    label_layer = "classifier"

    def __init__(self, config: XLNetConfig):
        super().__init__(config)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.init_head()

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **kw: Any) -> XLNetOutput:
        out = self.body(input_ids, **kw)
        out.logits = self.classifier(out.last_hidden_state)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.reshape(-1, self.config.num_labels), labels.reshape(-1))
        return out


def mask_logits(x: Tensor, p_mask: Tensor | None) -> Tensor:
    return x if p_mask is None else x * (1 - p_mask) - MASKED_LOGIT * p_mask


class PoolerStartLogits(nn.Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, 1)

    def forward(self, hidden: Tensor, p_mask: Tensor | None = None) -> Tensor:
        return mask_logits(self.dense(hidden).squeeze(-1), p_mask)


class PoolerEndLogits(nn.Module):
    """End logits conditioned on the start: Linear on [h_j; h_start] + tanh + LayerNorm + Linear."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.dense_0 = nn.Linear(2 * config.d_model, config.d_model)
        self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dense_1 = nn.Linear(config.d_model, 1)

    def forward(self, hidden: Tensor, start_states: Tensor, p_mask: Tensor | None = None) -> Tensor:
        x = self.LayerNorm(torch.tanh(self.dense_0(torch.cat([hidden, start_states], dim=-1))))
        return mask_logits(self.dense_1(x).squeeze(-1), p_mask)


class PoolerAnswerClass(nn.Module):
    """SQuAD 2.0 answerability logit from [h_start; h_cls]."""

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.dense_0 = nn.Linear(2 * config.d_model, config.d_model)
        self.dense_1 = nn.Linear(config.d_model, 1, bias=False)

    def forward(self, start_states: Tensor, cls_states: Tensor) -> Tensor:
        return self.dense_1(torch.tanh(self.dense_0(torch.cat([start_states, cls_states], dim=-1)))).squeeze(-1)


def gather_positions(hidden: Tensor, index: Tensor) -> Tensor:
    """hidden [B, L, d], index [B] or [B, k] -> [B, d] or [B, k, d]."""
    idx = index if index.dim() == 2 else index[:, None]
    out = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    return out if index.dim() == 2 else out[:, 0]


class XLNetForQuestionAnswering(XLNetPreTrainedHead):
    """SQuAD head. Training: start/end cross-entropy (end conditioned on the gold start) plus 0.5 x BCE on
    is_impossible. Inference: keep the top start_n_top starts, for each the top end_n_top ends, and an
    answerability logit from the start distribution's expected state and `<cls>`. As HF's, training feeds the
    answerability layer the gold start's state; the original run_squad.py feeds it the expected state (as at
    inference) and adds dropout after its tanh."""

    hf_architecture = "XLNetForQuestionAnswering"

    def __init__(self, config: XLNetConfig):
        super().__init__(config)
        self.start_logits = PoolerStartLogits(config)
        self.end_logits = PoolerEndLogits(config)
        self.answer_class = PoolerAnswerClass(config)
        self.init_head()

    def forward(self, input_ids: Tensor, start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                is_impossible: Tensor | None = None, cls_index: Tensor | None = None, p_mask: Tensor | None = None,
                **kw: Any) -> XLNetOutput:
        out = self.body(input_ids, **kw)
        hidden = out.last_hidden_state
        if p_mask is not None:
            p_mask = p_mask.to(hidden.dtype)
        start_logits = self.start_logits(hidden, p_mask)
        out.start_logits = start_logits
        cls_states = hidden[:, -1] if cls_index is None else gather_positions(hidden, cls_index.reshape(-1))
        if start_positions is not None and end_positions is not None:
            start_positions, end_positions = start_positions.reshape(-1), end_positions.reshape(-1)
            start_states = gather_positions(hidden, start_positions)
            end_logits = self.end_logits(hidden, start_states[:, None].expand_as(hidden), p_mask)
            out.end_logits = end_logits
            out.loss = (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
            if cls_index is not None and is_impossible is not None:
                cls_logits = out.cls_logits = self.answer_class(start_states, cls_states)
                out.loss = out.loss + 0.5 * F.binary_cross_entropy_with_logits(
                    cls_logits, is_impossible.reshape(-1).to(cls_logits.dtype))
            return out
        return self.decode(out, hidden, start_logits, cls_states, p_mask)

    def decode(self, out: XLNetOutput, hidden: Tensor, start_logits: Tensor, cls_states: Tensor,
               p_mask: Tensor | None) -> XLNetOutput:
        # HF names these "log probs" but they are probabilities; we keep its values for interop.
        k_start, k_end = self.config.start_n_top, self.config.end_n_top
        bsz, slen, _ = hidden.shape
        start_probs = torch.softmax(start_logits, dim=-1)
        out.start_top_log_probs, out.start_top_index = torch.topk(start_probs, k_start, dim=-1)
        start_states = gather_positions(hidden, out.start_top_index)  # [B, k_start, d]
        start_states = start_states[:, None].expand(-1, slen, -1, -1)  # [B, L, k_start, d]
        end_logits = self.end_logits(hidden[:, :, None].expand_as(start_states), start_states,
                                     None if p_mask is None else p_mask[..., None])
        end_probs = torch.softmax(end_logits, dim=1)  # over positions, per start
        top_p, top_i = torch.topk(end_probs, k_end, dim=1)  # [B, k_end, k_start]
        out.end_top_log_probs = top_p.reshape(bsz, k_start * k_end)
        out.end_top_index = top_i.reshape(bsz, k_start * k_end)
        expected_start = torch.einsum("blh,bl->bh", hidden, start_probs)
        out.cls_logits = self.answer_class(expected_start, cls_states)
        return out


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "XLNetModel": XLNetModel,
    "XLNetLMHeadModel": XLNetLMHeadModel,
    "XLNetForSequenceClassification": XLNetForSequenceClassification,
    "XLNetForMultipleChoice": XLNetForMultipleChoice,
    "XLNetForTokenClassification": XLNetForTokenClassification,
    "XLNetForQuestionAnswering": XLNetForQuestionAnswering,
}
