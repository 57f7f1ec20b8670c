"""Learning-rate sensitivity of a grid with an ``lr`` axis: the report's section (Wortsman et al. 2023, "Small-scale
proxies for large-scale Transformer training instabilities").

A *setting* is everything that identifies a run except its learning rate and seed: the normalizer and any other axis
(e.g. ``qk_norm=true``). For each setting and seed the sweep gives the final validation loss ``L(lr)``; a run that
diverged (the trainer stopped it with a non-finite loss: ``error.json`` with a ``FloatingPointError`` message) counts
as the loss at initialization ``L0`` (its first logged training loss), and so does any loss above ``L0``. Then

    LR sensitivity = mean over the swept learning rates of min(L(lr), L0)  -  min over lr of L(lr)

(0 = the same loss at every learning rate; larger = more sensitive), computed per seed and reported as mean ± std
over seeds, with the best learning rate and its loss. Figures: final loss vs learning rate per setting (log x axis,
mean over seeds, the seeds' range as error bars), and ``diag/max_logit`` (the largest attention logit, logged by
the trainer's diagnostics) vs step at the two highest learning rates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import atomic_write, format_number, format_table, read_json
from .grid import format_value
from .metrics import read_metrics

__all__ = ["SweepPoint", "collect", "lr_sensitivity", "section"]

_LR = "lr"
_SEED = "seed"


@dataclass(frozen=True)
class SweepPoint:
    """One run of a learning-rate sweep."""

    setting: str
    lr: float
    seed: Any
    loss: float  # final validation loss; the loss at initialization for a diverged run
    init_loss: float  # the first logged training loss (step 1, before any update has had an effect)
    diverged: bool
    max_logit: list[tuple[int, float]]  # (step, diag/max_logit)


def _setting(axes: dict[str, Any]) -> str:
    norm = format_value(axes.get("model.normalizer", "?"))
    rest = [f"{k.split('.')[-1]}={format_value(v)}" for k, v in axes.items()
            if k not in (_LR, _SEED, "model.normalizer")]
    return ", ".join([norm, *rest])


def _point(run_dir: Path, axes: dict[str, Any], loss: float | None, diverged: bool) -> SweepPoint | None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r and isinstance(r["loss"], (int, float))]
    if not losses:
        return None
    init = float(losses[0])
    logits = [(int(r["step"]), float(r["diag/max_logit"])) for r in rows if "diag/max_logit" in r]
    value = init if diverged or loss is None or not math.isfinite(loss) else float(loss)
    return SweepPoint(_setting(axes), float(axes[_LR]), axes.get(_SEED), value, init, diverged, logits)


def collect(grid_dir: str | Path) -> list[SweepPoint]:
    """Every finished or diverged run of the grid in ``grid_dir`` whose axes include ``lr``; runs in progress, or
    failed for another reason, are left out (the report's run table lists them)."""
    points = []
    for run_dir in sorted(p for p in (Path(grid_dir) / "runs").iterdir() if p.is_dir()):
        res = read_json(run_dir / "result.json")
        err = read_json(run_dir / "error.json")
        if res is not None and _LR in res.get("axes", {}):
            point = _point(run_dir, res["axes"], res.get("summary", {}).get("val_loss"), False)
        elif err is not None and _LR in err.get("axes", {}):  # (the grid writes error.json only for a non-finite loss)
            point = _point(run_dir, err["axes"], None, True)
        else:
            continue
        if point is not None:
            points.append(point)
    return points


def lr_sensitivity(points: Sequence[SweepPoint]) -> float:
    """Wortsman et al.'s LR sensitivity of one setting and seed (``points``: one per learning rate)."""
    capped = [min(p.loss, p.init_loss) for p in points]
    return statistics.fmean(capped) - min(p.loss for p in points)


def _order(setting: str) -> tuple[str, int, str]:
    """Settings grouped by their other axes, softmax first within a group."""
    norm, _, rest = setting.partition(", ")
    return (rest, 0 if norm == "softmax" else 1, norm)


def _by(points: Sequence[SweepPoint]) -> dict[str, dict[Any, list[SweepPoint]]]:
    out: dict[str, dict[Any, list[SweepPoint]]] = {}
    for p in sorted(points, key=lambda p: _order(p.setting)):
        out.setdefault(p.setting, {}).setdefault(p.seed, []).append(p)
    return out


def _colors(points: Sequence[SweepPoint]) -> dict[str, str]:
    return {s: f"C{i % 10}" for i, s in enumerate(_by(points))}


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return format_number(values[0])
    return f"{format_number(statistics.fmean(values))} ± {format_number(statistics.stdev(values))}"


def _figure(ncols: int = 1, width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))


def _plot_sweep(points: Sequence[SweepPoint], out: Path) -> Path:
    fig, (ax,) = _figure()
    colors = _colors(points)
    for setting, seeds in _by(points).items():
        lrs = sorted({p.lr for ps in seeds.values() for p in ps})
        mean, low, high = [], [], []
        for lr in lrs:
            vals = [p.loss for ps in seeds.values() for p in ps if p.lr == lr]
            mean.append(statistics.fmean(vals))
            low.append(mean[-1] - min(vals))
            high.append(max(vals) - mean[-1])
        ax.errorbar(lrs, mean, yerr=[low, high], marker="o", capsize=3, label=setting, color=colors[setting])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (diverged = loss at init)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def _plot_max_logit(points: Sequence[SweepPoint], lrs: Sequence[float], out: Path) -> Path | None:
    chosen = [p for p in points if p.lr in lrs and p.max_logit]
    if not chosen:
        return None
    fig, axes = _figure(len(lrs), width=5.0, height=4.0)
    colors = _colors(points)
    for ax, lr in zip(axes, lrs, strict=True):
        labelled = set()
        for p in sorted(chosen, key=lambda p: (_order(p.setting), str(p.seed))):
            if p.lr != lr:
                continue
            steps, values = zip(*p.max_logit, strict=True)
            ax.plot(steps, values, color=colors[p.setting], alpha=0.8,
                    label=None if p.setting in labelled else p.setting)
            labelled.add(p.setting)
        ax.set_yscale("log")
        ax.set_title(f"lr = {format_value(lr)}")
        ax.set_xlabel("step")
        ax.set_ylabel("max attention logit")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def section(grid_dir: str | Path, out: Path, figures: list[Path]) -> list[str]:
    """The report's markdown lines for the learning-rate sweep (none when no run has an ``lr`` axis)."""
    points = collect(grid_dir)
    if not points:
        return []
    lines = ["## Learning-rate sensitivity", "",
             "Final validation loss by learning rate (mean ± std over seeds; a diverged run counts as the loss at "
             "initialization, and the number of diverged runs is in brackets), and Wortsman et al.'s LR sensitivity "
             "per seed: mean over the swept learning rates of min(loss, loss at init) minus the best loss.", ""]
    lrs = sorted({p.lr for p in points})
    groups = _by(points)
    head = ["setting", *(f"lr {format_value(lr)}" for lr in lrs)]
    rows = []
    for setting, seeds in groups.items():
        row = [setting]
        for lr in lrs:
            at = [p for ps in seeds.values() for p in ps if p.lr == lr]
            div = sum(p.diverged for p in at)
            row.append("-" if not at else _mean_std([p.loss for p in at]) + (f" [{div} div.]" if div else ""))
        rows.append(row)
    lines += [format_table(head, rows, markdown=True), ""]
    sens_rows = []
    for setting, seeds in groups.items():
        full = {seed: ps for seed, ps in seeds.items() if {p.lr for p in ps} == set(lrs)}
        sens = [lr_sensitivity(ps) for ps in full.values()]
        best = [min(ps, key=lambda p: p.loss) for ps in full.values()]
        sens_rows.append([setting, str(len(full)), _mean_std(sens) if sens else "-",
                          ", ".join(format_value(b.lr) for b in best) or "-",
                          _mean_std([b.loss for b in best]) if best else "-",
                          _mean_std([p.init_loss for ps in seeds.values() for p in ps])])
    lines += [format_table(["setting", "seeds with every lr", "LR sensitivity", "best lr (per seed)", "best loss",
                            "loss at init"], sens_rows, markdown=True), ""]
    figures.append(_plot_sweep(points, out / "lr_sweep.png"))
    lines += ["![final loss vs learning rate](lr_sweep.png)", ""]
    top = lrs[-2:]
    path = _plot_max_logit(points, top, out / "lr_max_logit.png")
    if path is not None:
        figures.append(path)
        lines += [f"![max attention logit at lr {', '.join(format_value(x) for x in top)}](lr_max_logit.png)", ""]
    return lines
