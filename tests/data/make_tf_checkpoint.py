"""Write tests/data/tf_xlnet: tiny TensorFlow checkpoints made by the original XLNet code, with its outputs.

The oracle for `xlnet convert --from-tf` is the original implementation itself, not our reading of it: this
script imports `modeling.py` from a checkout of https://github.com/zihangdai/xlnet (Apache-2.0; not copied
here), builds its graph under TensorFlow 2's v1 compatibility layer with random weights, saves them with TF's
own Saver (the tensor-bundle format of the released checkpoints) and records what the graph computes:

- pretrained/: transformer + lm_loss, as released (xlnet_config.json, xlnet_model.ckpt.*). Outputs of the
  two-stream pretraining graph (perm_mask, target_mapping, memory, padding, two segments), with and without
  bi_data: the query stream at the targets, the new memory, the LM loss of each target.
- classifier/: transformer (without mask_emb) + sequnece_summary + classification_demo (run_classifier.py's scopes), saved as
  model.ckpt-7 with TF's `checkpoint` state file. Outputs of the fine-tuning graph: the class logits.

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

CONFIG = dict(n_token=37, d_model=12, n_layer=2, n_head=3, d_head=4, d_inner=20, ff_activation="gelu",
              untie_r=True)
BSZ, QLEN, MLEN, NUM_PREDICT, MEM_LEN, REUSE_LEN, N_CLASS = 2, 6, 3, 2, 4, 4, 3


def v1_shim():
    """A `tensorflow` module for the original code: tf.compat.v1 plus stand-ins for tf.layers / tf.contrib."""
    import tensorflow as real_tf
    v1 = real_tf.compat.v1
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
    return real_tf, v1, shim


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
    return dict(input_ids=ids, seg_id=seg, input_mask=input_mask, perm_mask=perm_mask,
                target_mapping=target_mapping, inp_q=inp_q, mems=mems, target=labels)


def build(modeling, v1, x: dict[str, np.ndarray]) -> dict[str, object]:
    init = v1.initializers.random_normal(stddev=0.02)
    common = dict(n_token=CONFIG["n_token"], n_layer=CONFIG["n_layer"], d_model=CONFIG["d_model"],
                  n_head=CONFIG["n_head"], d_head=CONFIG["d_head"], d_inner=CONFIG["d_inner"],
                  ff_activation=CONFIG["ff_activation"], untie_r=CONFIG["untie_r"], is_training=False,
                  use_tpu=False, dropout=0.0, dropatt=0.0, initializer=init, clamp_len=-1, same_length=False,
                  attn_type="bi", scope="transformer")
    c = {k: v1.constant(v) for k, v in x.items()}
    mems = [c["mems"][i] for i in range(CONFIG["n_layer"])]
    out: dict[str, object] = {}
    with v1.variable_scope("model", reuse=v1.AUTO_REUSE):
        for bi_data in (False, True):
            tag = "_bi" if bi_data else ""
            g, new_mems, table = modeling.transformer_xl(
                inp_k=c["input_ids"], seg_id=c["seg_id"], input_mask=c["input_mask"], mems=mems,
                perm_mask=c["perm_mask"], target_mapping=c["target_mapping"], inp_q=c["inp_q"],
                mem_len=MEM_LEN, reuse_len=REUSE_LEN, bi_data=bi_data, **common)
            out["query_stream" + tag] = g
            out["new_mems" + tag] = v1.stack(new_mems)
            out["lm_loss" + tag] = modeling.lm_loss(g, c["target"], CONFIG["n_token"], CONFIG["d_model"], init,
                                                    lookup_table=table, tie_weight=True, bi_data=bi_data)
        h, _, _ = modeling.transformer_xl(inp_k=c["input_ids"], seg_id=c["seg_id"], input_mask=c["input_mask"],
                                          mems=None, perm_mask=None, target_mapping=None, inp_q=None, mem_len=0,
                                          reuse_len=None, bi_data=False, **common)
        out["content_stream"] = h
        summary = modeling.summarize_sequence("last", h, CONFIG["d_model"], CONFIG["n_head"], CONFIG["d_head"],
                                              0.0, 0.0, c["input_mask"], False, init, scope="sequnece_summary")
        _, logits = modeling.classification_loss(summary, v1.zeros([BSZ], v1.int32), N_CLASS, init,
                                                 scope="classification_demo", return_logits=True)
        out["class_logits"] = logits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--xlnet-repo", required=True, help="checkout of zihangdai/xlnet (its modeling.py)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "tf_xlnet"))
    args = parser.parse_args()
    real_tf, v1, shim = v1_shim()
    sys.modules["tensorflow"] = shim
    sys.path.insert(0, args.xlnet_repo)
    import modeling  # the original XLNet code

    rng = np.random.default_rng(0)
    x = inputs(rng)
    outputs = build(modeling, v1, x)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("pretrained", "classifier"):
        (out / sub).mkdir(parents=True)
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        for var in v1.global_variables():  # weights far from init, so that a swapped or transposed one shows
            shape = var.shape.as_list()
            base = 1.0 if var.name.endswith("gamma:0") else 0.0
            var.load((base + rng.normal(scale=0.3, size=shape)).astype(np.float32), sess)
        step = v1.Variable(7, name="global_step", dtype=real_tf.int64)  # as in every TF run's checkpoint
        sess.run(step.initializer)
        values = sess.run(outputs)
        variables = {v.op.name: v for v in v1.global_variables()}
        lm = [v for name, v in variables.items() if not name.startswith(("model/sequnece", "model/classification"))]
        # run_classifier's graph has no query stream, so its checkpoints have no mask_emb
        cls = [v for name, v in variables.items() if not name.startswith(("model/lm_loss", "model/transformer/mask"))]
        v1.train.Saver(lm).save(sess, str(out / "pretrained" / "xlnet_model.ckpt"), write_meta_graph=False,
                                write_state=False)
        with chdir(out / "classifier"):  # a relative prefix: TF's `checkpoint` file then names it relatively
            v1.train.Saver(cls).save(sess, "model.ckpt", global_step=7, write_meta_graph=False)
    for sub in ("pretrained", "classifier"):  # the release's config format
        (out / sub / "xlnet_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    np.savez(out / "expected.npz", **x, **values)
    print(f"wrote {out}: {sorted(values)}; tensorflow {real_tf.__version__}")


if __name__ == "__main__":
    main()
