"""Check `xlnet convert --to-tf` against the original XLNet code: its graphs, restored from our export, compute
what they computed from TF's own checkpoints (tests/data/tf_xlnet/expected.npz).

Each fixture checkpoint goes TF -> ours (`--from-tf`) -> TF (`--to-tf`), then the original graphs of
make_tf_checkpoint.py (zihangdai/xlnet's modeling.py and function_builder.py, not copied here) restore their
variables from the exported directory with TF's own Saver and run. The same float32 weights through the same
graph: every output and gradient must be equal, not just close. Run outside the test environment, as
make_tf_checkpoint.py:
    /tmp/tfenv/bin/python -O tests/data/check_tf_export.py --xlnet-repo PATH/TO/xlnet --xlnet .venv/bin/xlnet
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from make_tf_checkpoint import (CHECKPOINTS, CONFIG, TIED_CONFIG, VARIANTS, finetuning_graphs, original_code,
                                pretraining_graph)

DATA = Path(__file__).parent / "tf_xlnet"
# the outputs each checkpoint's variables compute (expected.npz's keys, by prefix)
OUTPUTS = {"pretrained": ("query_stream", "new_mems", "lm_loss", "grad"), "classifier": ("class_logits",),
           "squad": ("squad_",), "race": ("race_logits",), "pretrained_tied": ("query_stream_tied", "new_mems_tied",
                                                                                "lm_loss_tied", "grad_tied")}


def export(xlnet: str, work: Path) -> dict[str, Path]:
    """Each fixture through our converter both ways; a classifier's scope is the fixture's (task `demo`)."""
    out = {}
    for sub in OUTPUTS:
        ours, back = work / f"{sub}-ours", work / f"{sub}-tf"
        subprocess.run([xlnet, "convert", "--from-tf", str(DATA / sub), str(ours)], check=True)
        task = ["--tf-task", "demo"] if sub == "classifier" else []
        subprocess.run([xlnet, "convert", "--to-tf", str(ours), str(back), *task], check=True)
        out[sub] = back / "xlnet_model.ckpt"
    return out


def check(v1, outputs: dict, checkpoints: dict[str, Path], expected: dict[str, np.ndarray]) -> list[str]:
    """Restore each checkpoint's variables from our export, run its outputs, compare with TF's own run."""
    failures, variables = [], {v.op.name: v for v in v1.global_variables()}
    with v1.Session() as sess:
        for sub, prefix in checkpoints.items():
            names = [n for n in variables if n.startswith(CHECKPOINTS["pretrained" if "pretrained" in sub else sub][0])
                     and n != "global_step"]
            v1.train.Saver([variables[n] for n in names]).restore(sess, str(prefix))
            wanted = {k: t for k, t in outputs.items() if k.startswith(OUTPUTS[sub])
                      and (sub != "pretrained" or "_tied" not in k)}
            got = sess.run(wanted)
            for key, value in got.items():
                if not np.array_equal(value, expected[key]):
                    failures.append(f"{sub}: {key} differs by {np.abs(value - expected[key]).max():.3g}")
            print(f"{sub}: {len(got)} outputs and gradients compared, {len(names)} variables restored")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--xlnet-repo", required=True, help="checkout of zihangdai/xlnet (its modeling.py)")
    parser.add_argument("--xlnet", default="xlnet", help="our CLI")
    args = parser.parse_args()
    real_tf, v1, _ = original_code(args.xlnet_repo)
    import function_builder  # the original XLNet code
    import modeling

    with np.load(DATA / "expected.npz", allow_pickle=False) as f:
        expected = {k: f[k] for k in f.files}
    x = {k: expected[k] for k in ("input_ids", "seg_id", "input_mask", "perm_mask", "target_mapping", "inp_q",
                                  "mems", "target", "p_mask", "race_ids", "race_seg", "race_mask")}
    with tempfile.TemporaryDirectory() as work:
        exported = export(args.xlnet, Path(work))
        outputs = {**pretraining_graph(modeling, v1, x, CONFIG, VARIANTS),
                   **finetuning_graphs(function_builder, v1, x, DATA / "pretrained" / "xlnet_config.json")}
        failures = check(v1, outputs, {k: v for k, v in exported.items() if k != "pretrained_tied"}, expected)
        with v1.Graph().as_default():
            tied = pretraining_graph(modeling, v1, x, TIED_CONFIG, {"_tied": VARIANTS[""]})
            failures += check(v1, tied, {"pretrained_tied": exported["pretrained_tied"]}, expected)
    print("\n".join(failures) or f"every output equal (tensorflow {real_tf.__version__})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
