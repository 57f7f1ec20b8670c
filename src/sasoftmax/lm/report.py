"""Markdown report (tables and PNG plots) of an experiment grid written by :mod:`sasoftmax.lm.grid`.

``sasoftmax report GRID_DIR [--out DIR]`` reads ``GRID_DIR/runs/*/result.json``, each run's ``metrics.jsonl`` and
(when present) ``GRID_DIR/grid.json``, and writes ``DIR/report.md`` (default ``GRID_DIR/report``) with:

* the date, the machine (``platform.platform()``) and the grid's configuration;
* every run (normalizer, positional encoding, training length, seed, steps, final losses), and the runs that are
  missing, partial (stopped before ``max_steps``), failed or still in progress;
* validation perplexity by evaluation length for every (normalizer, positional, training length) cell, as
  ``mean ± std`` over the runs of the cell (seeds) when there are several, and the ratio of each normalizer's mean
  to ``softmax``'s in the same cell;
* plots: training loss vs step (exponential moving average, weight 0.9), validation perplexity vs evaluation length
  (log2 x axis, log y axis, one figure per positional encoding and training length, one line per normalizer);
* with an ``lr`` axis, the learning-rate sensitivity section of :mod:`sasoftmax.lm.lr_sweep` (final loss vs
  learning rate per setting, LR sensitivity, max attention logit at the highest learning rates);
* gradient diagnostics: every global ``diag/<metric>`` key found in ``metrics.jsonl`` is plotted vs step with a
  table of its first and last values per run; per-layer keys ``diag/<metric>/layer<i>`` get one figure per metric
  with each run's last value per layer. The keys are discovered, not listed here.

Everything reported comes from those files; the only computed quantities are means, standard deviations, ratios
and the smoothing of plotted curves. Axes other than normalizer, positional, training length and seed (e.g. a
learning-rate axis) split cells further and are shown as a ``variant`` column.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_write, format_number, format_table, read_json, utc_now
from .downstream import LM_EVAL_FILE
from .grid import SCHEMA_VERSION, format_value
from .lr_sweep import section as lr_sweep_section
from .metrics import read_metrics

__all__ = ["write_report", "load_grid_dir", "GridData", "RunData", "read_metrics"]

_CELL_AXES = ("model.normalizer", "model.positional", "model.block_size", "seed")
_LAYER_KEY = re.compile(r"^diag/(?P<metric>.+)/layer(?P<layer>\d+)$")
_EMA = 0.9
_MAX_POINTS = 2000


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class RunData:
    """One finished (or partial) run: identity, results and metric rows."""

    run_id: str
    normalizer: str
    positional: str
    train_length: int
    seed: Any
    variant: str
    complete: bool
    summary: dict[str, Any]
    ppl: dict[int, float]
    metrics: list[dict[str, Any]]
    platform: str = ""
    downstream: dict[str, Any] | None = None  # the run's lm-evaluation-harness record (``lm_eval.json``), if any


@dataclass
class GridData:
    """Everything found in a grid directory."""

    directory: Path
    runs: list[RunData]
    grid: dict[str, Any] | None
    missing: list[tuple[str, str]] = field(default_factory=list)  # (run id, why)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def _run_from_result(res: dict[str, Any], run_dir: Path) -> RunData:
    cfg = res.get("train_config", {})
    model = cfg.get("model", {})
    evaluation = res.get("eval", {})
    axes = res.get("axes", {})
    variant = ", ".join(f"{k}={format_value(v)}" for k, v in axes.items() if k not in _CELL_AXES)
    train_length = res.get("train_length") or evaluation.get("train_length") or model.get("block_size")
    return RunData(
        run_id=str(res.get("run_id", run_dir.name)),
        normalizer=str(evaluation.get("normalizer") or model.get("normalizer", "?")),
        positional=str(evaluation.get("positional") or model.get("positional", "?")),
        train_length=int(train_length),
        seed=cfg.get("seed"),
        variant=variant,
        complete=bool(res.get("complete", False)),
        summary=res.get("summary", {}),
        ppl={int(r["length"]): float(r["ppl"]) for r in evaluation.get("results", [])},
        metrics=read_metrics(run_dir / "metrics.jsonl"),
        platform=", ".join(str(res[k]) for k in ("platform", "processor") if res.get(k)),
        downstream=read_json(run_dir / LM_EVAL_FILE),
    )


def load_grid_dir(grid_dir: str | os.PathLike) -> GridData:
    """Read a grid directory. ``ValueError`` when it does not exist or holds no ``runs/`` folder."""
    directory = Path(grid_dir)
    if not (directory / "runs").is_dir():
        raise ValueError(f"report: {directory} is not a grid directory (no runs/ folder inside)")
    meta = read_json(directory / "grid.json")
    grid = meta.get("grid") if meta else None
    data = GridData(directory, [], grid)
    seen = set()
    for run_dir in sorted(p for p in (directory / "runs").iterdir() if p.is_dir()):
        res = read_json(run_dir / "result.json")
        if res is not None and res.get("schema") == SCHEMA_VERSION:
            try:
                run = _run_from_result(res, run_dir)
            except (KeyError, TypeError, ValueError) as err:
                data.ignored.append((str(run_dir / "result.json"), f"malformed: {err}"))
                continue
            data.runs.append(run)
            seen.add(run.run_id)
            continue
        if res is not None:
            data.ignored.append((str(run_dir / "result.json"), f"schema {res.get('schema')!r}, not {SCHEMA_VERSION}"))
        seen.add(run_dir.name)
        data.missing.append((run_dir.name, _why_missing(run_dir)))
    order = {run_id: i for i, run_id in enumerate((grid or {}).get("run_ids", []))}
    for run_id in order:
        if run_id not in seen:
            data.missing.append((run_id, "not started"))
    data.runs.sort(key=lambda r: (order.get(r.run_id, len(order)), r.run_id))
    return data


def _why_missing(run_dir: Path) -> str:
    err = read_json(run_dir / "error.json")
    if err is not None:
        return f"failed: {err.get('error', '?')}"
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if (run_dir / "result.json").exists():
        return "result.json unreadable or of another schema"
    return f"in progress or interrupted (last logged step {max(steps)})" if steps else "started, no metrics yet"


# ------------------------------------------------------------------------------------------------ numbers


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _mean_std_text(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return format_number(mean) if std is None else f"{format_number(mean)} ± {format_number(std)}"


def _norm_order(name: str) -> tuple[int, str]:
    return (0 if name == "softmax" else 1, name)


def _cells(runs: Sequence[RunData]) -> dict[tuple[int, str, str, str], list[RunData]]:
    """Runs by (train length, positional, variant, normalizer)."""
    cells: dict[tuple[int, str, str, str], list[RunData]] = {}
    for run in runs:
        cells.setdefault((run.train_length, run.positional, run.variant, run.normalizer), []).append(run)
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], _norm_order(kv[0][3]))))


# ------------------------------------------------------------------------------------------------ plots


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _smooth(values: Sequence[float]) -> list[float]:
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = _EMA * avg + (1 - _EMA) * v
        out.append(avg / (1 - _EMA**i))
    return out


def _thin(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    k = max(1, math.ceil(len(xs) / _MAX_POINTS))
    xs, ys = list(xs[::k]), list(ys[::k])
    return xs, ys


def _series(run: RunData, key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in run.metrics if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


class _Style:
    """Consistent plot styles for one report: a color per normalizer (the same in every figure), a line style per
    run within a normalizer, and labels made of only the run attributes that differ between the runs."""

    _STYLES = ("-", "--", ":", "-.")

    def __init__(self, runs: Sequence[RunData]) -> None:
        from matplotlib import colormaps

        names = sorted({r.normalizer for r in runs}, key=_norm_order)
        cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
        self.colors = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
        self.varying = [f for f in ("normalizer", "positional", "train_length", "variant", "seed")
                        if len({str(getattr(r, f)) for r in runs}) > 1]
        self.styles: dict[str, str] = {}
        for name in names:
            same = sorted((r for r in runs if r.normalizer == name), key=lambda r: r.run_id)
            for i, r in enumerate(same):
                self.styles[r.run_id] = self._STYLES[i % len(self._STYLES)]

    def color(self, normalizer: str) -> Any:
        return self.colors.get(normalizer)

    def line(self, run: RunData) -> dict[str, Any]:
        parts = []
        for f in self.varying or ["normalizer"]:
            value = getattr(run, f)
            parts.append(str(value) if f in ("normalizer", "positional", "variant") else
                         f"L={value}" if f == "train_length" else f"seed {value}")
        return {"color": self.color(run.normalizer), "linestyle": self.styles.get(run.run_id, "-"),
                "label": ", ".join(parts)}


def _legend(ax, n: int) -> None:
    if n > 4:  # beside the axes, so that it never hides curves
        ax.legend(fontsize=7 if n > 8 else 8, ncol=2 if n > 16 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif n:
        ax.legend(fontsize=8)


def _plot_train_loss(runs: Sequence[RunData], train_length: int, out: Path, style: _Style) -> Path | None:
    fig, ax = _figure()
    n = 0
    for run in runs:
        steps, loss = _series(run, "loss")
        if steps:
            xs, ys = _thin(steps, _smooth(loss))
            ax.plot(xs, ys, linewidth=1.2, **style.line(run))
            n += 1
    if not n:
        return None
    ax.set(xlabel="step", ylabel=f"training loss (EMA {_EMA})", title=f"training loss, train length {train_length}")
    ax.grid(alpha=0.3)
    _legend(ax, n)
    return _save(fig, out)


def _plot_ppl(cells: dict[str, list[RunData]], title: str, out: Path, style: _Style) -> Path | None:
    if len({length for runs in cells.values() for r in runs for length in r.ppl}) < 2:
        return None  # one evaluation length: the table says it all, a curve needs two
    fig, ax = _figure()
    n = 0
    for norm, runs in cells.items():
        lengths = sorted({length for r in runs for length in r.ppl})
        means, stds = [], []
        for length in lengths:
            mean, std = _mean_std([r.ppl[length] for r in runs if length in r.ppl])
            means.append(mean)
            stds.append(std or 0.0)
        if lengths:
            label = f"{norm} (n={len(runs)})" if len(runs) > 1 else norm
            ax.errorbar(lengths, means, yerr=stds if len(runs) > 1 else None, marker="o", capsize=3, label=label,
                        color=style.color(norm))
            n += 1
    if not n:
        return None
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    all_lengths = sorted({length for runs in cells.values() for r in runs for length in r.ppl})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_lengths, [str(n) for n in all_lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    values = [v for runs in cells.values() for r in runs for v in r.ppl.values()]
    if min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set(xlabel="evaluation length (tokens)", ylabel="validation perplexity", title=title)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, n)
    return _save(fig, out)


def _plot_diag_steps(runs: Sequence[RunData], key: str, out: Path, style: _Style) -> Path | None:
    fig, ax = _figure()
    n = 0
    values: list[float] = []
    for run in runs:
        steps, vals = _series(run, key)
        if steps:
            xs, ys = _thin(steps, vals)
            ax.plot(xs, ys, linewidth=1.2, marker="." if len(xs) < 50 else None, **style.line(run))
            values += vals
            n += 1
    if not n:
        return None
    ax.set(xlabel="step", ylabel=key, title=key)
    if min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    _legend(ax, n)
    return _save(fig, out)


def _plot_diag_layers(last: dict[str, dict[int, float]], metric: str, out: Path, style: _Style,
                      by_id: dict[str, RunData]) -> Path | None:
    fig, ax = _figure()
    n = 0
    for run_id, by_layer in last.items():
        if by_layer:
            layers = sorted(by_layer)
            ax.plot(layers, [by_layer[i] for i in layers], marker="o", **style.line(by_id[run_id]))
            n += 1
    if not n:
        return None
    ax.set(xlabel="layer", ylabel=f"diag/{metric} (last value)", title=f"diag/{metric} per layer, last logged step")
    layers = sorted({i for by_layer in last.values() for i in by_layer})
    ax.set_xticks(layers, [str(i) for i in layers])
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax.grid(alpha=0.3)
    _legend(ax, n)
    return _save(fig, out)


# ------------------------------------------------------------------------------------------------ sections


def _header(data: GridData) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    now = utc_now()
    machines = Counter(r.platform or "not recorded" for r in data.runs)
    grid_file = (data.grid or {}).get("source")
    name = Path(str(grid_file)).stem if grid_file else data.directory.resolve().name
    lines = [f"# Grid report: {name}", "",
             f"Generated {now} on {platform.platform()} (Python {platform.python_version()}, torch {ver('torch')}, "
             f"matplotlib {ver('matplotlib')}) from `{data.directory}`.", ""]
    if data.runs:
        where = "; ".join(f"{m} ({n} run{'s' if n > 1 else ''})" for m, n in sorted(machines.items()))
        lines += [f"Runs were trained on: {where}.", ""]
    lines += ["All numbers below are read from the runs' `result.json` and `metrics.jsonl` files; the report only "
              "computes means, standard deviations (over the runs of a cell, i.e. seeds), ratios, and the smoothing "
              "of plotted training curves.", ""]
    return lines


def _config_section(data: GridData) -> list[str]:
    lines = ["## Grid configuration", ""]
    if data.grid is None:
        return lines + ["No `grid.json` in the grid directory; each run's configuration is in its `result.json`.", ""]
    g = data.grid
    lines += [f"- grid file: `{g.get('source')}`", f"- runs in the grid: {len(g.get('run_ids', []))}"]
    if g.get("description"):
        lines.append(f"- description: {g['description']}")
    for key, values in g.get("axes", {}).items():
        lines.append(f"- axis `{key}`: {', '.join(format_value(v) for v in values)}")
    lines.append(f"- evaluation: `{json.dumps(g.get('eval', {}))}`")
    lines += ["", "Base training config (before the axis values):", "", "```json",
              json.dumps(g.get("base", {}), indent=1), "```", ""]
    return lines


def _runs_section(data: GridData) -> list[str]:
    lines = ["## Runs", ""]
    if not data.runs:
        lines += ["No run has a `result.json` yet.", ""]
    else:
        has_variant = any(r.variant for r in data.runs)
        headers = ["run", "normalizer", "positional", "train length", "seed", *(["variant"] if has_variant else []),
                   "steps", "complete", "final train loss", "final val loss", "train time (s)"]
        rows = []
        for r in data.runs:
            s = r.summary
            rows.append([r.run_id, r.normalizer, r.positional, r.train_length, str(r.seed),
                         *([r.variant or "-"] if has_variant else []), s.get("steps"), "yes" if r.complete else "no",
                         s.get("final_loss"), s.get("val_loss"), s.get("elapsed_s")])
        lines += [format_table(headers, rows, markdown=True), ""]
    lines += ["### Missing, failed or incomplete runs", ""]
    items = [f"- `{run_id}`: {why}" for run_id, why in data.missing]
    items += [f"- `{r.run_id}`: partial (stopped at step {r.summary.get('steps')}: "
              f"{r.summary.get('stopped_early') or 'before max_steps'})" for r in data.runs if not r.complete]
    items += [f"- ignored `{path}`: {why}" for path, why in data.ignored]
    lines += (items or ["None: every run of the grid has a complete result."]) + [""]
    return lines


def _ppl_section(data: GridData, out: Path, figures: list[Path]) -> list[str]:
    lines = ["## Validation perplexity by evaluation length", ""]
    if not data.runs:
        return lines + ["No results.", ""]
    cells = _cells(data.runs)
    has_variant = any(r.variant for r in data.runs)
    for train_length in sorted({k[0] for k in cells}):
        group = {k: v for k, v in cells.items() if k[0] == train_length}
        lengths = sorted({length for runs in group.values() for r in runs for length in r.ppl})
        cols = [f"{n} ({n / train_length:g}x)" for n in lengths]
        lead = ["positional", *(["variant"] if has_variant else []), "normalizer"]
        rows, ratios, paired = [], [], []
        for (_, pos, variant, norm), runs in group.items():
            label = [pos, *([variant or "-"] if has_variant else []), norm]
            rows.append([*label, str(len(runs)),
                         *(_mean_std_text([r.ppl[n] for r in runs if n in r.ppl]) for n in lengths)])
            base = group.get((train_length, pos, variant, "softmax"))
            if norm != "softmax" and base:
                ratios.append([*label, *(_ratio(runs, base, n) for n in lengths)])
                paired.append([*label, *(_paired(runs, base, n) for n in lengths)])
        lines += [f"### Trained at length {train_length}", "",
                  "Perplexity, mean ± sample standard deviation over the runs (seeds) of each cell:", "",
                  format_table([*lead, "runs", *cols], rows, markdown=True), ""]
        if ratios:
            lines += ["Ratio of each normalizer's mean perplexity to softmax's in the same cell (< 1: lower "
                      "perplexity than softmax):", "", format_table([*lead, *cols], ratios, markdown=True), "",
                      "Paired by seed: mean of (normalizer - softmax) perplexity over the seeds both ran, with a 95 % "
                      "confidence interval (Student t over the pairs; an interval that excludes 0 is a difference "
                      "these seeds resolve) and the number of pairs in which the normalizer was lower:", "",
                      format_table([*lead, *cols], paired, markdown=True), ""]
        else:
            lines += ["No ratios to softmax: no cell at this training length has both softmax and another "
                      "normalizer.", ""]
        lines += _ppl_figures(group, train_length, out, figures, _Style(data.runs))
    return lines


def _ratio(runs: Sequence[RunData], base: Sequence[RunData], length: int) -> str:
    a = [r.ppl[length] for r in runs if length in r.ppl]
    b = [r.ppl[length] for r in base if length in r.ppl]
    if not a or not b:
        return "-"
    return format_number(statistics.fmean(a) / statistics.fmean(b))


# Two-sided 95 % Student t quantiles by degrees of freedom; beyond the table the next lower entry (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def _t975(df: int) -> float:
    return _T975[max(d for d in _T975 if d <= df)]


def _paired(runs: Sequence[RunData], base: Sequence[RunData], length: int) -> str:
    """``mean [low, high] (k/n lower)`` of the per-seed differences ``runs - base`` at ``length``."""
    by_seed = {str(r.seed): r.ppl[length] for r in base if length in r.ppl}
    diffs = [r.ppl[length] - by_seed[str(r.seed)] for r in runs if length in r.ppl and str(r.seed) in by_seed]
    if not diffs:
        return "-"
    mean = statistics.fmean(diffs)
    lower = sum(d < 0 for d in diffs)
    if len(diffs) < 2:
        return f"{format_number(mean)} ({lower}/1 lower)"
    half = _t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    interval = f"[{format_number(mean - half)}, {format_number(mean + half)}]"
    return f"{format_number(mean)} {interval} ({lower}/{len(diffs)} lower)"


def _ppl_figures(group: dict, train_length: int, out: Path, figures: list[Path], style: _Style) -> list[str]:
    lines = []
    for pos, variant in sorted({(k[1], k[2]) for k in group}):
        by_norm = {k[3]: v for k, v in group.items() if k[1] == pos and k[2] == variant}
        name = f"ppl_{_slug(pos)}_L{train_length}" + (f"_{_slug(variant)}" if variant else "") + ".png"
        title = f"{pos}, trained at {train_length}" + (f", {variant}" if variant else "")
        path = _plot_ppl(by_norm, title, out / name, style)
        if path is not None:
            figures.append(path)
            lines += [f"![validation perplexity, {title}]({name})", ""]
    return lines


def _loss_section(data: GridData, out: Path, figures: list[Path]) -> list[str]:
    lines = ["## Training loss", ""]
    for train_length in sorted({r.train_length for r in data.runs}):
        runs = [r for r in data.runs if r.train_length == train_length]
        name = f"train_loss_L{train_length}.png"
        path = _plot_train_loss(runs, train_length, out / name, _Style(data.runs))
        if path is not None:
            figures.append(path)
            lines += [f"![training loss, train length {train_length}]({name})", ""]
        else:
            lines += [f"No training-loss rows in the metrics of the runs trained at length {train_length}.", ""]
    return lines


def _diag_keys(runs: Sequence[RunData]) -> tuple[list[str], dict[str, set[int]]]:
    """Global ``diag/...`` keys (sorted) and per-layer metrics with their layer indices."""
    global_keys: set[str] = set()
    layered: dict[str, set[int]] = {}
    for run in runs:
        for row in run.metrics:
            for key in row:
                if not key.startswith("diag/"):
                    continue
                m = _LAYER_KEY.match(key)
                if m:
                    layered.setdefault(m.group("metric"), set()).add(int(m.group("layer")))
                else:
                    global_keys.add(key)
    return sorted(global_keys), dict(sorted(layered.items()))


SUMMARY_DIAG_FIGURES = ("diag/score_grad_norm", "diag/score_grad_norm_saturated", "diag/saturated_frac")
"""The diagnostics plotted with ``plots="summary"`` (every metric still gets its table)."""


def _diag_section(data: GridData, out: Path, figures: list[Path], summary: bool = False) -> list[str]:
    lines = ["## Gradient diagnostics", ""]
    global_keys, layered = _diag_keys(data.runs)
    if not global_keys and not layered:
        return lines + ["No `diag/` metrics were found in any run's `metrics.jsonl` (the runs were trained without "
                        "the diagnostics hook, e.g. `diag_interval = 0`).", ""]
    lines += [f"Metrics found: {', '.join(f'`{k}`' for k in global_keys) or 'none global'}; per layer: "
              f"{', '.join(f'`diag/{m}/layer<i>`' for m in layered) or 'none'}.", ""]
    for key in global_keys:
        lines += [f"### `{key}`", ""]
        name = f"diag_{_slug(key[5:])}.png"
        plot = not summary or key in SUMMARY_DIAG_FIGURES
        path = _plot_diag_steps(data.runs, key, out / name, _Style(data.runs)) if plot else None
        if path is not None:
            figures.append(path)
            lines += [f"![{key} vs step]({name})", ""]
        rows = []
        for run in data.runs:
            steps, vals = _series(run, key)
            if steps:
                rows.append([run.run_id, steps[0], vals[0], steps[-1], vals[-1]])
        headers = ["run", "first step", "first value", "last step", "last value"]
        lines += [format_table(headers, rows, markdown=True), ""]
    for metric, layers in layered.items():
        lines += _layer_subsection(data.runs, metric, sorted(layers), out, figures, plot=not summary)
    return lines


def _layer_subsection(runs: Sequence[RunData], metric: str, layers: list[int], out: Path,
                      figures: list[Path], plot: bool = True) -> list[str]:
    last: dict[str, dict[int, float]] = {}
    step_of: dict[str, Any] = {}
    for run in runs:
        values = {}
        for layer in layers:
            steps, vals = _series(run, f"diag/{metric}/layer{layer}")
            if steps:
                values[layer] = vals[-1]
                step_of[run.run_id] = steps[-1]
        if values:
            last[run.run_id] = values
    lines = [f"### `diag/{metric}` per layer", ""]
    name = f"diag_{_slug(metric)}_layers.png"
    by_id = {r.run_id: r for r in runs}
    path = _plot_diag_layers(last, metric, out / name, _Style(runs), by_id) if plot else None
    if path is not None:
        figures.append(path)
        lines += [f"![diag/{metric} per layer]({name})", ""]
    rows = [[run_id, step_of[run_id], *(vals.get(i, "-") for i in layers)] for run_id, vals in last.items()]
    headers = ["run", "step", *(f"layer {i}" for i in layers)]
    lines += ["Last logged value per layer:", "", format_table(headers, rows, markdown=True), ""]
    return lines


def _downstream_section(data: GridData) -> list[str]:
    """lm-evaluation-harness results of the runs that have them (``sasoftmax lm-eval`` writes ``lm_eval.json``)."""
    runs = [r for r in data.runs if r.downstream and r.downstream.get("results")]
    if not runs:
        return []
    rows = []
    for run in runs:
        rec = run.downstream or {}
        for task, metrics in sorted(rec["results"].items()):
            for key, value in sorted(metrics.items()):
                if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                    stderr = metrics.get(key.replace(",", "_stderr,", 1))
                    rows.append([run.run_id, rec.get("step"), task, key.split(",")[0], value,
                                 stderr if isinstance(stderr, (int, float)) else "-"])
    return ["## Downstream tasks (lm-evaluation-harness)", "",
            "From each run's `lm_eval.json` (`sasoftmax lm-eval`); the step is the checkpoint evaluated.", "",
            format_table(["run", "step", "task", "metric", "value", "stderr"], rows, markdown=True), ""]


# ------------------------------------------------------------------------------------------------ entry point


def write_report(grid_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                 plots: str = "all") -> dict[str, Any]:
    """Write ``report.md`` and its PNG figures for the grid in ``grid_dir`` into ``out`` (default
    ``<grid_dir>/report``). ``plots="summary"`` plots only perplexity, training loss and
    :data:`SUMMARY_DIAG_FIGURES` (no per-layer figures; every table stays), for a report small enough to commit.
    Returns ``{"report": path, "figures": [paths], "runs": n, "missing": [run ids]}``."""
    if plots not in ("all", "summary"):
        raise ValueError(f"`plots` must be 'all' or 'summary', got {plots!r}")
    summary = plots == "summary"
    data = load_grid_dir(grid_dir)
    out_dir = Path(out) if out is not None else data.directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    lines = _header(data) + _config_section(data) + _runs_section(data)
    lines += _ppl_section(data, out_dir, figures)
    lines += lr_sweep_section(data.directory, out_dir, figures)
    if data.runs:
        lines += _loss_section(data, out_dir, figures)
    lines += _diag_section(data, out_dir, figures, summary)
    lines += _downstream_section(data)
    text = "\n".join(lines).rstrip() + "\n"
    report = atomic_write(out_dir / "report.md", lambda f: f.write(text.encode()))
    return {"report": str(report), "figures": [str(p) for p in figures], "runs": len(data.runs),
            "missing": [m[0] for m in data.missing]}


if __name__ == "__main__":  # pragma: no cover
    print(write_report(sys.argv[1])["report"])
