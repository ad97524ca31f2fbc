"""What a training run leaves for people to read: metrics as JSONL and TensorBoard, and PNG plots.

GAN losses say little on their own; the plots put the generator's terms, the
discriminator's view of real and fake, and the mask statistics (a mask stuck at 0 or
1 everywhere is the CGN's typical failure) side by side, refreshed at every log, so
a run can be judged from the working directory without TensorBoard. On resume the
records after the checkpoint are dropped (JSONL rewritten, TensorBoard purged), so the
curves show the run that the checkpoints describe.

Only one process writes (`enabled`); the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping

# (file name, [(panel title, [metric names])]); metrics absent from the records are skipped
PLOTS = (
    ("losses.png", (("generator", ("g_loss", "g_adv", "g_mask", "g_perc", "g_frame")),
                    ("discriminator", ("d_loss", "d_loss_real", "d_loss_fake")),
                    ("discriminator output", ("d_real", "d_fake")))),
    ("mask.png", (("mask mean", ("mask_mean",)), ("mask variance", ("mask_var",)))),
    # MNIST sample sheets: per class, the mask on the canvas frame (cgn_jax.mask_stats; above 0.5: inverted)
    ("mask_by_class.png", (("mask on the canvas frame (> 0.5: inverted)",
                            tuple(f"mask_frame_c{k}" for k in range(10))),)),
    # ... and the share of its foreground / background outputs stuck at |tanh| ~ 1 (no gradient gets through)
    ("saturation_by_class.png", (("foreground: share |out| > 0.999",
                                  tuple(f"fg_saturated_c{k}" for k in range(10))),
                                 ("background: share |out| > 0.999",
                                  tuple(f"bg_saturated_c{k}" for k in range(10))))),
)


_CLASS_SUFFIX = re.compile(r"_c(\d+)$")


class MetricsLogger:
    """`write(step, {name: float})` appends to `metrics.jsonl`, TensorBoard (`tb/`) and redraws `plots/*.png`."""

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, plots: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.plot_dir = self.workdir / "plots"
        self.records: list[dict] = []
        self._plots = plots
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.records = _read_jsonl(self.path)
            if resume_step is not None:
                kept = [r for r in self.records if r.get("step", 0) <= resume_step]
                if len(kept) != len(self.records):
                    self.records = kept
                    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tb"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(_tb_tag(name), float(value), int(step))
            self._tb.flush()
        if self._plots:
            self.plot()

    def plot(self) -> list[Path]:
        """Redraw the PNG plots from all records so far."""
        if not self.enabled or not self.records:
            return []
        present = set().union(*self.records)
        return [plot_metrics(self.records, panels, self.plot_dir / name) for name, panels in PLOTS
                if present.intersection(n for _, names in panels for n in names)]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tb_tag(name: str) -> str:
    prefix = {"g": "generator", "d": "discriminator", "mask": "mask", "fg": "mechanisms", "bg": "mechanisms"}.get(
        name.split("_")[0], "train")
    return f"{prefix}/{name}"


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash: everything after it is unreliable
    return records


def plot_metrics(records: list[dict], panels, path: str | Path, x: str = "step") -> Path:
    """One row of line plots (metric vs `x`, a record key), one panel per (title, names).

    Per-class panels (`*_c{k}` curves) are labelled "class k" with the legend beside the
    panel, where it cannot hide the curves.
    """
    fig, axes = panel_figure(len(panels))
    for ax, (title, names) in zip(axes, panels):
        per_class = all(_CLASS_SUFFIX.search(n) for n in names)
        for name in names:
            pts = [(r[x], r[name]) for r in records
                   if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
            if pts:
                xs, ys = zip(*pts)
                label = f"class {_CLASS_SUFFIX.search(name).group(1)}" if per_class else name
                ax.plot(xs, ys, label=label, marker="." if len(pts) < 30 else None)
        finish_panel(ax, title, x, legend_right=per_class)
    return save_figure(fig, path)


def panel_figure(n_panels: int, size: tuple[float, float] = (4.2, 3.2)):
    """(figure, axes): one row of `n_panels` panels, drawn without a display (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * n_panels, size[1]), dpi=100)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def finish_panel(ax, title: str, xlabel: str, legend_size: int = 8, legend_below: bool = False,
                 legend_right: bool = False) -> None:
    """Title, grid and legend; `legend_below` / `legend_right` keep a long legend off curves that fill the panel."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        if legend_below:
            ax.legend(fontsize=legend_size, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        elif legend_right:
            ax.legend(fontsize=legend_size - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.legend(fontsize=legend_size)


def save_figure(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # legends placed outside the axes stay in the picture
    return path
