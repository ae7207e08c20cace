"""Parity with Hugging Face's XLNet (the numerical oracle): outputs, losses, mems and parameter gradients."""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: E402

from helpers import CONFIGS as SHARED_CONFIGS, B, L, P, V, assert_close, plm_inputs, tiny_config  # noqa: E402
from xlnet.config import XLNetConfig  # noqa: E402
from xlnet.heads import (  # noqa: E402
    XLNetForMultipleChoice,
    XLNetForQuestionAnswering,
    XLNetForSequenceClassification,
    XLNetForTokenClassification,
)
from xlnet.data.plm import perm_mask_from_ranks  # noqa: E402
from xlnet.model import XLNetLMHeadModel, XLNetModel  # noqa: E402





def twins(ours_cls, config: XLNetConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = ours_cls(config)
    hf_cls = getattr(transformers, ours_cls.hf_architecture)
    hf = hf_cls(transformers.XLNetConfig(**config.to_hf_dict()))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_loss.weight" for k in missing), (missing, unexpected)
    return ours, hf


def hf_compatible(x: dict, config: XLNetConfig) -> dict:
    """HF's uni attention adds the data mask in place and breaks for batch > 1 (a broadcast error), so uni
    cases run on one padded row."""
    return {k: v[1:2] for k, v in x.items()} if config.attn_type == "uni" else x




def assert_head_matches(ours, hf, config: XLNetConfig, x: dict, labels: torch.Tensor) -> None:
    """Logits, loss and every parameter gradient of one training step agree with the HF twin."""
    o, h = ours(**x, labels=labels), hf(**x, labels=labels)
    assert_close(o.logits, h.logits, "logits")
    assert_close(o.loss, h.loss, "loss")
    o.loss.backward(), h.loss.backward()
    assert_grads_match(ours, hf, config)


def assert_grads_match(ours, hf, config: XLNetConfig) -> None:
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if p.grad is None:
            continue
        shared = not config.untie_r and name.split(".")[-1] in ("r_w_bias", "r_r_bias", "r_s_bias")
        if shared:  # one tensor in ours, a copy per layer in HF: ours collects the sum of their gradients
            suffix = name.split("layer.0.", 1)[1]
            ref = sum(hf_params[f"transformer.layer.{i}.{suffix}"].grad for i in range(config.n_layer))
        else:
            ref = hf_params[name].grad
        assert ref is not None, name
        assert_close(p.grad, ref, f"grad {name}")
        checked += 1
    assert checked > 10


CONFIGS = {**SHARED_CONFIGS, "relu": {"ff_activation": "relu"}}


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("two_stream", [True, False])
def test_lm_head_matches_hf_with_grads(variant: str, two_stream: bool) -> None:
    config = tiny_config(**CONFIGS[variant])
    ours, hf = twins(XLNetLMHeadModel, config)
    x = hf_compatible(plm_inputs(padding=True, two_stream=two_stream), config)
    labels = x["input_ids"][:, :P].clone() if two_stream else x["input_ids"].clone()
    if two_stream and config.attn_type == "bi":
        labels[0, -1] = -100
    assert_head_matches(ours, hf, config, x, labels)


@pytest.mark.parametrize("variant", ["bi", "uni", "uni_same_length", "bi_data", "clamp_len", "tied_r"])
def test_mems_across_three_segments(variant: str) -> None:
    config = tiny_config(mem_len=12, reuse_len=5, **CONFIGS[variant])
    ours, hf = twins(XLNetLMHeadModel, config)
    ours.train(), hf.train()  # dropout is 0: train mode exercises the gradient path through mems
    mems_o = mems_h = None
    for step in range(3):
        x = hf_compatible(plm_inputs(seed=10 + step), config)
        labels = x["input_ids"][:, :P].contiguous()
        o = ours(**x, labels=labels, mems=mems_o)
        h = hf(**x, labels=labels, mems=mems_h, use_mems=True)
        assert_close(o.logits, h.logits, f"segment {step} logits")
        assert len(o.mems) == config.n_layer
        for mo, mh in zip(o.mems, h.mems):
            assert not mo.requires_grad and mo.is_contiguous()  # own buffer: one layout for torch.compile
            assert_close(mo, mh.transpose(0, 1), f"segment {step} mems")
        ours.zero_grad(), hf.zero_grad()
        o.loss.backward()
        h.loss.backward()
        assert_grads_match(ours, hf, config)
        mems_o, mems_h = o.mems, h.mems
    assert mems_o[0].shape == (len(x["input_ids"]), 12, config.d_model)  # 3 x reuse 5 = 15 cut to mem_len 12


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_base_model_hidden_states_match_hf(impl: str) -> None:
    """The last state and every layer's content stream (output_hidden_states, as distillation reads them)."""
    config = tiny_config(attn_impl=impl)
    ours, hf = twins(XLNetModel, config)
    x = plm_inputs(padding=True, two_stream=False)
    o, h = ours(**x, output_hidden_states=True), hf(**x, output_hidden_states=True)
    assert_close(o.last_hidden_state, h.last_hidden_state, "hidden")
    assert len(o.hidden_states) == len(h.hidden_states) == config.n_layer + 1
    for i, (a, b) in enumerate(zip(o.hidden_states, h.hidden_states)):
        assert_close(a, b, f"hidden state {i}")
    cls = ours(**x, output_hidden_states=True, cls_only=True).hidden_states  # the last layer: <cls> alone
    assert cls[-1].shape == (len(x["input_ids"]), 1, config.d_model)
    assert_close(cls[-1][:, 0], h.hidden_states[-1][:, -1], "cls_only last state")
    assert ours(**x).hidden_states is None
    with pytest.raises(ValueError, match="query stream"):
        ours(**plm_inputs(), output_hidden_states=True)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classification_and_regression(num_labels: int, impl: str) -> None:
    config = tiny_config(num_labels=num_labels, attn_impl=impl)
    ours, hf = twins(XLNetForSequenceClassification, config)
    x = plm_inputs(padding=True, two_stream=False)
    labels = torch.tensor([0, 2, 1, 1]) if num_labels > 1 else torch.tensor([0.5, -1.0, 2.0, 0.0])
    assert_head_matches(ours, hf, config, x, labels)



def test_regression_targets_are_not_rounded_under_bf16_autocast() -> None:
    """Under bf16 autocast the logits are bf16; the squared error still reads its targets in float32 (3.8, not
    bf16's 3.797), as STS-B's 0-5 scores need."""
    torch.manual_seed(0)
    model = XLNetForSequenceClassification(tiny_config(num_labels=1, attn_impl="fast"))
    x = plm_inputs(padding=True, two_stream=False)
    labels = torch.tensor([3.8, 4.2, 0.3, 1.1])
    with torch.autocast("cpu", torch.bfloat16):
        out = model(**x, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.equal(out.loss, torch.nn.functional.mse_loss(out.logits.float().squeeze(-1), labels))

@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_multiple_choice(impl: str) -> None:
    config = tiny_config(attn_impl=impl)
    ours, hf = twins(XLNetForMultipleChoice, config)
    x = plm_inputs(padding=True, two_stream=False)
    x = {k: v.view(2, 2, L) for k, v in x.items()}  # 2 questions x 2 choices
    labels = torch.tensor([1, 0])
    assert_head_matches(ours, hf, config, x, labels)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_token_classification(impl: str) -> None:
    config = tiny_config(attn_impl=impl)
    ours, hf = twins(XLNetForTokenClassification, config)
    x = plm_inputs(padding=True, two_stream=False)
    labels = torch.randint(0, 3, (B, L))
    labels[:, 0] = -100
    assert_head_matches(ours, hf, config, x, labels)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_question_answering_training_loss_and_beam(impl: str) -> None:
    config = tiny_config(start_n_top=3, end_n_top=2, attn_impl=impl)
    ours, hf = twins(XLNetForQuestionAnswering, config)
    x = plm_inputs(padding=True, two_stream=False)
    p_mask = torch.zeros(B, L)
    p_mask[:, :2] = 1
    train = dict(start_positions=torch.tensor([3, 4, 5, 8]), end_positions=torch.tensor([4, 6, 5, 8]),
                 is_impossible=torch.tensor([0.0, 0.0, 1.0, 1.0]), cls_index=torch.full((B,), L - 1),
                 p_mask=p_mask)
    o, h = ours(**x, **train), hf(**x, **{k: v.clone() for k, v in train.items()})
    assert_close(o.loss, h.loss, "loss")
    o.loss.backward(), h.loss.backward()
    assert_grads_match(ours, hf, config)
    ours.eval(), hf.eval()
    with torch.no_grad():
        o, h = ours(**x, p_mask=p_mask), hf(**x, p_mask=p_mask)
    for name in ("start_top_log_probs", "end_top_log_probs", "cls_logits"):
        assert_close(getattr(o, name), getattr(h, name), name)
    for name in ("start_top_index", "end_top_index"):
        assert torch.equal(getattr(o, name), getattr(h, name)), name


def test_query_stream_never_sees_its_own_token() -> None:
    """Changing the token at a target position must not change that slot's prediction."""
    config = tiny_config()
    torch.manual_seed(0)
    model = XLNetLMHeadModel(config).eval()
    x = plm_inputs(two_stream=True)
    pos = x["target_mapping"][1, 0].argmax()
    changed = {**x, "input_ids": x["input_ids"].clone()}
    changed["input_ids"][1, pos] = (changed["input_ids"][1, pos] + 1) % V
    with torch.no_grad():
        a, b = model(**x).logits[1, 0], model(**changed).logits[1, 0]
    assert_close(a, b, "own-token leak")
    # ...whereas the content stream at that position does see it
    with torch.no_grad():
        h1 = model.transformer(x["input_ids"]).last_hidden_state[1, pos]
        h2 = model.transformer(changed["input_ids"]).last_hidden_state[1, pos]
    assert (h1 - h2).abs().max() > 1e-3


def test_bi_data_needs_even_batch() -> None:
    model = XLNetModel(tiny_config(bi_data=True))
    with pytest.raises(ValueError, match="even"):
        model(torch.ones(3, 4, dtype=torch.long))


def _content_objective_inputs(objective: str, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Inputs of the content-stream objectives as `xlnet pretrain` builds them: (model inputs, target_positions,
    labels); masked LM: P sorted random positions (row 0's last slot padding); left-to-right: every next token."""
    x = plm_inputs(seed=seed, two_stream=False)
    ids = x["input_ids"]
    if objective == "clm":
        order = torch.arange(L).repeat(B, 1)
        x["perm_mask"] = perm_mask_from_ranks(order, order)
        return x, order[:, :-1], ids[:, 1:]
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(L, generator=g)[:P].sort().values for _ in range(B)])
    labels = ids.gather(1, positions)
    labels[0, -1] = -100
    return x, positions, labels


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_content_stream_objectives_match_hf_with_mems(objective: str, impl: str) -> None:
    """Masked and left-to-right LM through `target_positions` == HF's LM head on all positions with the labels
    placed at those positions (-100 elsewhere): logits there, loss and every gradient, with memory."""
    config = tiny_config(mem_len=12, reuse_len=5, attn_impl=impl)
    ours, hf = twins(XLNetLMHeadModel, config)
    ours.train(), hf.train()
    first, _, _ = _content_objective_inputs(objective, seed=4)
    mems_o, mems_h = ours(**first).mems, hf(**first, use_mems=True).mems
    x, positions, labels = _content_objective_inputs(objective, seed=5)
    hf_labels = torch.full_like(x["input_ids"], -100).scatter(1, positions, labels)
    o = ours(**x, labels=labels, target_positions=positions, mems=mems_o)
    h = hf(**x, labels=hf_labels, mems=mems_h, use_mems=True)
    assert o.logits.shape == (B, positions.shape[1], V)
    assert_close(o.logits, h.logits.gather(1, positions[:, :, None].expand(-1, -1, V)), "logits at the positions")
    assert_close(o.loss, h.loss, "loss")
    o.loss.backward(), h.loss.backward()
    assert_grads_match(ours, hf, config)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_left_to_right_batches_are_causal(impl: str) -> None:
    """A `clm` batch's logits at position i do not move when tokens after i change (and do for tokens before)."""
    from xlnet.data.plm import clm_batch

    torch.manual_seed(0)
    model = XLNetLMHeadModel(tiny_config(attn_impl=impl)).eval()
    ids = torch.randint(9, V, (B, L))
    seg = torch.zeros(B, L, dtype=torch.long)

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        b = clm_batch(tokens.numpy(), seg.numpy())
        return model(b["input_ids"], token_type_ids=b["token_type_ids"], perm_mask=b["perm_mask"],
                     target_positions=b["target_positions"]).logits

    base, cut = logits(ids), 5
    changed = ids.clone()
    changed[:, cut:] = torch.randint(9, V, (B, L - cut))
    assert torch.equal(logits(changed)[:, :cut], base[:, :cut])  # positions < cut read no changed token
    assert not torch.allclose(logits(changed)[:, cut:], base[:, cut:])


def test_target_positions_refuse_a_target_mapping() -> None:
    model = XLNetLMHeadModel(tiny_config())
    x = plm_inputs()
    with pytest.raises(ValueError, match="content stream"):
        model(**x, target_positions=torch.zeros(B, P, dtype=torch.long))
