"""Write tests/data/tf_xlnet: tiny TensorFlow checkpoints made by the original XLNet code, with its outputs.

The oracle for `xlnet convert --from-tf` is the original implementation itself, not our reading of it: this
script imports `modeling.py` and `function_builder.py` from a checkout of https://github.com/zihangdai/xlnet
(Apache-2.0; not copied here), builds their graphs under TensorFlow 2's v1 compatibility layer with random
weights, saves them with TF's own Saver (the tensor-bundle format of the released checkpoints) and records what
the graphs compute:

- pretrained/: transformer + lm_loss, as released (xlnet_config.json, xlnet_model.ckpt.*). Outputs of the
  two-stream pretraining graph (perm_mask, target_mapping, memory, padding, two segments): with and without
  bi_data, and with causal attention (`uni`, same_length, clamp_len 3); the query stream at the targets, the new
  memory, the LM loss of each target and the gradient of their sum for every variable (`grad<variant>:<name>`).
- pretrained_tied/: the same model with untie_r false (biases shared by the layers) and relu; the first variant.
- classifier/, squad/, race/: the transformer (without mask_emb: fine-tuning graphs have no query stream) and
  the heads of run_classifier.py, run_squad.py and run_race.py under their own scopes, as those scripts save
  them (model.ckpt-N with TF's `checkpoint` state file). Outputs of function_builder's inference graphs: the
  class logits; SQuAD's top starts and ends (log-probabilities and indices) and answerability logit; RACE's
  four choice logits.

Run once, outside the test environment (TensorFlow is not a dependency of anything here):
    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python -O tests/data/make_tf_checkpoint.py --xlnet-repo PATH/TO/xlnet --out tests/data/tf_xlnet
TF 1.x APIs the original uses that TF 2 dropped (tf.layers, tf.contrib.layers.layer_norm) are stood in for
below with the same variable names and the same arithmetic (dense: x·kernel + bias; layer norm over the last
axis with contrib's epsilon, 1e-12). `-O`: with bi_data the original asserts `bsz % 2 == 0` on a graph tensor,
which never holds as a Python comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from contextlib import chdir
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SPIECE = ROOT / "src" / "xlnet" / "assets" / "tokenizer" / "spiece.model"  # the embedded tokenizer
CONFIG = dict(n_token=37, d_model=12, n_layer=2, n_head=3, d_head=4, d_inner=20, ff_activation="gelu",
              untie_r=True)
BSZ, QLEN, MLEN, NUM_PREDICT, MEM_LEN, REUSE_LEN, N_CLASS = 2, 6, 3, 2, 4, 4, 3
# the pretraining graph's settings (transformer_xl's arguments, not in the config file): output key suffix -> run
VARIANTS = {
    "": dict(bi_data=False, attn_type="bi", same_length=False, clamp_len=-1),
    "_bi": dict(bi_data=True, attn_type="bi", same_length=False, clamp_len=-1),
    # Transformer-XL's causal attention with every query seeing as many keys, distances clipped at 3
    "_uni": dict(bi_data=False, attn_type="uni", same_length=True, clamp_len=3),
}
# untie_r False (one r_w/r_r/r_s_bias for all layers, seg_embed still per layer) and relu: pretrained_tied/
TIED_CONFIG = {**CONFIG, "untie_r": False, "ff_activation": "relu"}
START_N_TOP, END_N_TOP = 2, 2  # at most the unmasked positions (3): no ties among masked ones in top-k


def v1_shim(graph: bool = True):
    """A `tensorflow` module for the original code: tf.compat.v1 plus stand-ins for what TF 2 dropped (tf.layers,
    tf.contrib, tf.gfile, tf.keras without Keras installed). graph=False keeps eager execution (ops run as
    called)."""
    import tensorflow as real_tf
    v1 = real_tf.compat.v1
    if graph:
        v1.disable_eager_execution()

    def dense(inputs, units, activation=None, kernel_initializer=None, name=None, use_bias=True):
        with v1.variable_scope(name, default_name="dense"):
            kernel = v1.get_variable("kernel", [inputs.shape[-1], units], initializer=kernel_initializer)
            out = real_tf.tensordot(inputs, kernel, 1)
            if use_bias:
                out += v1.get_variable("bias", [units], initializer=v1.zeros_initializer())
            return activation(out) if activation is not None else out

    def dropout(inputs, rate, training=False, name=None, **_):
        if training:
            raise ValueError("the fixture graphs run in inference mode")
        return inputs

    def layer_norm(inputs, begin_norm_axis=-1, scope=None, reuse=None):
        with v1.variable_scope(scope, default_name="LayerNorm", reuse=reuse):
            width = inputs.shape[-1]
            beta = v1.get_variable("beta", [width], initializer=v1.zeros_initializer())
            gamma = v1.get_variable("gamma", [width], initializer=v1.ones_initializer())
            mean, var = real_tf.nn.moments(inputs, [-1], keepdims=True)
            return real_tf.nn.batch_normalization(inputs, mean, var, beta, gamma, 1e-12)

    shim = types.ModuleType("tensorflow")
    shim.__getattr__ = lambda name: getattr(v1, name)  # type: ignore[attr-defined]
    shim.layers = types.SimpleNamespace(dense=dense, dropout=dropout)
    shim.contrib = types.SimpleNamespace(layers=types.SimpleNamespace(layer_norm=layer_norm))
    shim.logging = types.SimpleNamespace(info=lambda *a, **k: None)
    shim.gfile = types.SimpleNamespace(Open=open, GFile=open)
    is_sparse = lambda v: isinstance(v, real_tf.SparseTensor)  # noqa: E731
    shim.keras = types.SimpleNamespace(backend=types.SimpleNamespace(is_sparse=is_sparse))
    return real_tf, v1, shim


def generator_args(doc: str, out: str) -> argparse.Namespace:
    """A fixture generator's command line: --xlnet-repo (a checkout of zihangdai/xlnet), --out (default
    tests/data/<out>)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--xlnet-repo", required=True, help="checkout of zihangdai/xlnet")
    parser.add_argument("--out", default=str(Path(__file__).parent / out))
    return parser.parse_args()


def original_code(xlnet_repo: str, graph: bool = True):
    """Make zihangdai/xlnet's modules importable (from `xlnet_repo`) against v1_shim's `tensorflow`."""
    real_tf, v1, shim = v1_shim(graph)
    sys.modules["tensorflow"] = shim
    sys.path.insert(0, xlnet_repo)
    return real_tf, v1, shim


def embedded_spiece():
    """The embedded tokenizer's SentencePiece model, as the original scripts load theirs."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(SPIECE))
    return sp


def inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Time-major arrays, as the original takes them ([len, bsz] ...)."""
    ids = rng.integers(0, CONFIG["n_token"], size=(QLEN, BSZ)).astype(np.int32)
    seg = np.zeros((QLEN, BSZ), np.int32)
    seg[3:] = 1
    seg[-1] = 2  # <cls>'s own segment id, as XLNet's data pipeline gives it
    input_mask = np.zeros((QLEN, BSZ), np.float32)
    input_mask[0, 1] = 1.0  # the second row's first position is padding (XLNet pads on the left)
    # a factorization order per row; the last NUM_PREDICT of it are the targets
    perm_mask = np.zeros((QLEN, QLEN, BSZ), np.float32)
    target_mapping = np.zeros((NUM_PREDICT, QLEN, BSZ), np.float32)
    inp_q = np.zeros((QLEN, BSZ), np.float32)
    for b in range(BSZ):
        order = rng.permutation(QLEN)
        rank = np.empty(QLEN, int)
        rank[order] = np.arange(QLEN)
        targets = order[-NUM_PREDICT:]
        is_target = np.isin(np.arange(QLEN), targets)
        # i may not see j when j comes later in the order, or is a target at i's rank or later (not itself
        # for the content stream: the original adds that through non_tgt_mask)
        perm_mask[:, :, b] = (rank[None, :] > rank[:, None]) | (is_target[None, :] & (rank[None, :] >= rank[:, None]))
        for p, t in enumerate(sorted(targets)):
            target_mapping[p, t, b] = 1.0
            inp_q[t, b] = 1.0
    mems = rng.normal(size=(CONFIG["n_layer"], MLEN, BSZ, CONFIG["d_model"])).astype(np.float32)
    labels = np.einsum("pib,ib->pb", target_mapping, ids.astype(np.float32)).astype(np.int32)
    # SQuAD: question and specials masked out of the answer ([bsz, len], 1 = not an answer position)
    p_mask = np.ones((BSZ, QLEN), np.float32)
    p_mask[:, 2:5] = 0.0
    # RACE: four choices a row, flattened [bsz, 4 * len] as run_race.py feeds them
    race_ids = rng.integers(0, CONFIG["n_token"], size=(BSZ, 4 * QLEN)).astype(np.int32)
    race_seg = np.tile(seg.T[:, None], (1, 4, 1)).reshape(BSZ, -1)
    race_mask = np.zeros((BSZ, 4 * QLEN), np.float32)
    race_mask[:, ::QLEN] = rng.integers(0, 2, size=(BSZ, 4))  # some choices' first position is padding
    return dict(input_ids=ids, seg_id=seg, input_mask=input_mask, perm_mask=perm_mask,
                target_mapping=target_mapping, inp_q=inp_q, mems=mems, target=labels, p_mask=p_mask,
                race_ids=race_ids, race_seg=race_seg, race_mask=race_mask)


def pretraining_graph(modeling, v1, x: dict[str, np.ndarray], config: dict, variants: dict) -> dict[str, object]:
    """train_gpu.py's model: the two-stream pass over memory (each of `variants`) and the LM loss."""
    init = v1.initializers.random_normal(stddev=0.02)
    common = dict(**config, is_training=False, use_tpu=False, dropout=0.0, dropatt=0.0, initializer=init,
                  scope="transformer")
    c = {k: v1.constant(v) for k, v in x.items()}
    mems = [c["mems"][i] for i in range(config["n_layer"])]
    out: dict[str, object] = {}
    with v1.variable_scope("model", reuse=v1.AUTO_REUSE):
        for tag, run in variants.items():
            g, new_mems, table = modeling.transformer_xl(
                inp_k=c["input_ids"], seg_id=c["seg_id"], input_mask=c["input_mask"], mems=mems,
                perm_mask=c["perm_mask"], target_mapping=c["target_mapping"], inp_q=c["inp_q"],
                mem_len=MEM_LEN, reuse_len=REUSE_LEN, **run, **common)
            out["query_stream" + tag] = g
            out["new_mems" + tag] = v1.stack(new_mems)
            out["lm_loss" + tag] = modeling.lm_loss(g, c["target"], config["n_token"], config["d_model"], init,
                                                    lookup_table=table, tie_weight=True, bi_data=run["bi_data"])
            # the gradient of the summed loss for every variable of the pretrained checkpoint
            names = [v for v in v1.trainable_variables() if v.op.name.startswith(CHECKPOINTS["pretrained"][0])]
            grads = v1.gradients(v1.reduce_sum(out["lm_loss" + tag]), names)
            out.update({f"grad{tag}:{v.op.name}": v1.convert_to_tensor(grad) for v, grad in zip(names, grads)})
    return out


def finetuning_graphs(function_builder, v1, x: dict[str, np.ndarray], config_path: Path) -> dict[str, object]:
    """run_classifier.py's, run_squad.py's and run_race.py's heads, built by the original function_builder
    (inference mode: SQuAD's start/end beam and answerability logit)."""
    flags = types.SimpleNamespace(
        model_config_path=str(config_path), use_tpu=False, use_bfloat16=False, dropout=0.0, dropatt=0.0,
        init="normal", init_range=0.1, init_std=0.02, clamp_len=-1, summary_type="last", use_summ_proj=True,
        cls_scope=None, task_name="demo", start_n_top=START_N_TOP, end_n_top=END_N_TOP)
    features = {"input_ids": x["input_ids"].T, "segment_ids": x["seg_id"].T, "input_mask": x["input_mask"].T,
                "label_ids": np.zeros(BSZ, np.int32), "cls_index": np.full(BSZ, QLEN - 1, np.int32),
                "p_mask": x["p_mask"]}
    features = {k: v1.constant(v) for k, v in features.items()}
    out: dict[str, object] = {}
    out["class_logits"] = function_builder.get_classification_loss(flags, features, N_CLASS, False)[2]
    for key, value in function_builder.get_qa_outputs(flags, features, False).items():
        out["squad_" + key] = value
    race = {k: v1.constant(v) for k, v in (("input_ids", x["race_ids"]), ("segment_ids", x["race_seg"]),
                                          ("input_mask", x["race_mask"]), ("label_ids", np.zeros(BSZ, np.int32)))}
    out["race_logits"] = function_builder.get_race_loss(flags, race, False)[2]
    return out


# variables of each checkpoint, by name prefix; fine-tuning graphs have no query stream, so no mask_emb
BODY = ("model/transformer/r_", "model/transformer/seg_embed", "model/transformer/word_embedding",
        "model/transformer/layer_")
CHECKPOINTS = {
    "pretrained": (BODY + ("model/transformer/mask_emb", "model/lm_loss/"), "xlnet_model.ckpt", None),
    "classifier": (BODY + ("model/sequnece_summary/", "model/classification_demo/", "global_step"), "model.ckpt", 7),
    "squad": (BODY + ("start_logits/", "end_logits/", "answer_class/"), "model.ckpt", 11),
    "race": (BODY + ("model/sequnece_summary/", "logits/"), "model.ckpt", 13),
}


def run_and_save(v1, real_tf, outputs: dict, checkpoints: dict, rng: np.random.Generator, out: Path) -> dict:
    """Random weights for the default graph's variables, `outputs` computed, each of `checkpoints` saved."""
    with v1.Session() as sess:
        v1.Variable(7, name="global_step", dtype=real_tf.int64, trainable=False)  # as in every TF run's checkpoint
        sess.run(v1.global_variables_initializer())
        for var in v1.trainable_variables():  # weights far from init, so that a swapped or transposed one shows
            base = 1.0 if var.name.endswith("gamma:0") else 0.0
            var.load((base + rng.normal(scale=0.3, size=var.shape.as_list())).astype(np.float32), sess)
        values = sess.run(outputs)
        variables = {v.op.name: v for v in v1.global_variables()}
        for sub, (prefixes, name, step_no) in checkpoints.items():
            saver = v1.train.Saver([v for n, v in variables.items() if n.startswith(prefixes)])
            with chdir(out / sub):  # a relative prefix: TF's `checkpoint` file then names it relatively
                saver.save(sess, name, global_step=step_no, write_meta_graph=False, write_state=step_no is not None)
    return values


def main() -> None:
    args = generator_args(__doc__, "tf_xlnet")
    real_tf, v1, _ = original_code(args.xlnet_repo)
    import function_builder  # the original XLNet code
    import modeling

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    for sub in CHECKPOINTS:
        (out / sub).mkdir(parents=True)
        (out / sub / "xlnet_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")  # the release's format
    rng = np.random.default_rng(0)
    x = inputs(rng)
    outputs = {**pretraining_graph(modeling, v1, x, CONFIG, VARIANTS),
               **finetuning_graphs(function_builder, v1, x, out / "pretrained" / "xlnet_config.json")}
    values = run_and_save(v1, real_tf, outputs, CHECKPOINTS, rng, out)
    with v1.Graph().as_default():  # the shared-bias variant in a graph of its own (its r_*_bias have no layer axis)
        tied = pretraining_graph(modeling, v1, x, TIED_CONFIG, {"_tied": VARIANTS[""]})
        (out / "pretrained_tied").mkdir()
        (out / "pretrained_tied" / "xlnet_config.json").write_text(json.dumps(TIED_CONFIG, indent=2) + "\n")
        values.update(run_and_save(v1, real_tf, tied, {"pretrained_tied": CHECKPOINTS["pretrained"]}, rng, out))
    np.savez_compressed(out / "expected.npz", **x, **values)
    print(f"wrote {out}: {sorted(values)}; tensorflow {real_tf.__version__}")


if __name__ == "__main__":
    main()
