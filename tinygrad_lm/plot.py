"""The run's metrics log (metrics.jsonl, one JSON object a line) and its loss curve (loss.png)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from nn.serialization import atomic_write


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the log rows after `step` (the step a run starts or resumes at): rows written
    after the checkpoint by a run that then crashed, or by an earlier run in the same folder."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            pass
    if len(keep) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in keep))


def plot_losses(metrics_path: Path, png: Path) -> bool:
    """Train/val loss curves from the JSONL log into a PNG (skipped without matplotlib, the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["train_loss"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (batch)")
    if ev:
        s, a, b = zip(*ev)
        ax.plot(s, a, "o-", label="train (eval)")
        ax.plot(s, b, "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(png, buf.getvalue())
    return True
