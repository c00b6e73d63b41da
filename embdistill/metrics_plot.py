"""A run's ``metrics.jsonl``, read back and drawn (``loss.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import atomic_open
from .errors import UserError


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """One panel per logged quantity against the step (matplotlib, no display needed); a
    validation quantity ``val/<name>`` shares the panel of ``<name>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    # every quantity of any row (some are measured less often than others), in order of appearance
    names = list(dict.fromkeys(k for row in rows for k in row if k not in ("step", "epoch", "elapsed_s")))
    panels = [name for name in names if not (name.startswith("val/") and name[4:] in names)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * max(len(panels), 1)), sharex=True,
                             squeeze=False)
    for axis, name in zip(axes[:, 0], panels):
        for shown, label in ((name, "train"), (f"val/{name}", "validation")):
            points = [(row["step"], row[shown]) for row in rows if shown in row]
            if points:
                axis.plot(*zip(*points), marker=".", label=label)
        if f"val/{name}" in names:
            axis.legend(fontsize=8)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimiser step")
    fig.suptitle(Path(metrics_path).parent.name)
    fig.tight_layout()
    with atomic_open(png_path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
