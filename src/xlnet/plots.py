"""PNG curves from a run's metrics.jsonl (matplotlib with the Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xlnet.fileio import atomic_write


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported here: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path) -> Path:
    """Write `fig` as a PNG atomically, then close it."""
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    pyplot().close(fig)
    return path


def plot_loss_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "pretraining (PLM loss)",
                     key: str = "loss", smooth: float = 0.9) -> Path:
    """Train loss (raw, faint, and smoothed) and valid loss against the optimizer step, one PNG."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    for split, color in (("train", "tab:blue"), ("valid", "tab:orange")):
        pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and r.get(key) is not None]
        if not pts:
            continue
        steps, values = zip(*pts)
        if split == "train" and len(values) > 5:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(list(values), smooth), color=color, label=f"{split} (smoothed)")
        else:
            ax.plot(steps, values, color=color, marker="o" if split == "valid" else None, markersize=3,
                    label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
