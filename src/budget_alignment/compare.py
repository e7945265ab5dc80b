"""`budget-align compare`: the repository's experiments side by side, from `dvc exp show --json`.

Each experiment (the baseline commit, each `dvc exp run` on it, and the workspace when it differs from its baseline)
brings its params (params.yaml) and results (reports/metrics.json, the report stage's flat metrics). For every
experiment x regime x language, accuracy is the mean of the accuracy metric (`report.accuracy_metric`) over the
evaluation sets, and following the mean following; the comparison is one table (`reports/compare.md`: each row with
the params its experiment changed, its two figures, their change against the baseline and whether it is on its
language's Pareto frontier) and one figure (`reports/compare.png`: accuracy against following, one panel per
language, a point per experiment and regime).

It is a tool, not a stage: it reads what DVC has recorded of every experiment and writes two git-ignored files that no
stage reads (not into reports/figures/, the report stage's output, which DVC would then see as modified).
Experiments without results (queued, running, failed) are listed by name and state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.io import atomic_write
from budget_alignment.params import REGIMES
from budget_alignment.report import (
    REGIME_LABELS,
    Point,
    dominates,
    markdown_table,
    percent,
    signed,
)
from budget_alignment.tracking import flatten

PARAMS_FILE = "params.yaml"
METRICS_FILE = "reports/metrics.json"
DEFAULT_METRIC = "pass@1"


class CompareError(StageError, RuntimeError):
    """`dvc exp show` failed, or it lists no experiment with results."""


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str
    params: dict[str, Any]
    metrics: dict[str, float]
    baseline: bool = False


@dataclass(frozen=True)
class Comparison:
    experiments: list[Experiment]
    # Experiments without results: (name, state).
    pending: list[tuple[str, str]] = field(default_factory=list)


# --- reading `dvc exp show --json` ---------------------------------------------------------------------------------


def dvc_exp_show(root: Path | None = None, *, all_commits: bool = False) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repository at `root` (every commit's experiments with `all_commits`)."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        result = subprocess.run(command, cwd=root or paths.repo_root(), capture_output=True, text=True, check=False)
    except OSError as error:
        raise CompareError(f"cannot run dvc: {error}") from None
    if result.returncode != 0:
        raise CompareError(f"dvc exp show failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return json.loads(result.stdout)


def _data(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]] | None:
    """(flat params, flat result metrics) of one revision, or None where it has no results."""
    data = entry.get("data") or {}
    metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
    if entry.get("error") or not metrics:
        return None
    params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
    # Derived from other keys when Hydra composes the file (the stages DVC generates): never a knob of its own.
    params = {key: value for key, value in params.items() if key != "stage_instances"}
    return flatten(params), {k: v for k, v in flatten(metrics).items() if isinstance(v, int | float)}


def experiments_of(show: Sequence[Mapping[str, Any]]) -> Comparison:
    """The experiments with results, each baseline before its experiments (oldest first); the workspace last, and only
    where it differs from the first baseline (after `dvc exp run` without --queue it holds that experiment's results,
    which are already listed under the experiment's name)."""
    experiments: list[Experiment] = []
    pending: list[tuple[str, str]] = []
    workspace = None
    for entry in show:
        if entry.get("rev") == "workspace":
            workspace = _data(entry)
            continue
        found = _data(entry)
        if found:
            experiments.append(Experiment(entry.get("name") or entry["rev"][:7], entry["rev"], *found, baseline=True))
        for experiment in sorted(entry.get("experiments") or [], key=_created):
            revs = experiment.get("revs") or []
            name = experiment.get("name") or (revs[0]["rev"][:7] if revs else "?")
            state = (experiment.get("executor") or {}).get("state")
            # A running experiment already shows figures: its baseline's, until it ends.
            found = _data(revs[0]) if revs and state in (None, "success") else None
            if found:
                experiments.append(Experiment(name, revs[0]["rev"], *found))
            else:
                pending.append((name, state or "no results"))
    if workspace and not any((e.params, e.metrics) == workspace for e in experiments):
        experiments.append(Experiment("workspace", "workspace", *workspace))
    return Comparison(experiments, pending)


def _created(experiment: Mapping[str, Any]) -> str:
    revs = experiment.get("revs") or [{}]
    return ((revs[0].get("data") or {}).get("timestamp")) or ""


def changed_params(experiments: Sequence[Experiment]) -> list[str]:
    """The params keys whose values are not the same in every experiment."""
    keys = sorted({key for e in experiments for key in e.params})
    return [key for key in keys if len({json.dumps(e.params.get(key), sort_keys=True) for e in experiments}) > 1]


def describe(experiment: Experiment, baseline: Experiment, keys: Sequence[str]) -> str:
    """The params an experiment sets differently from the baseline, as `key=value`."""
    if experiment is baseline:
        return "(baseline)"
    changes = [
        f"{key}={_value(experiment.params.get(key))}"
        for key in keys
        if experiment.params.get(key) != baseline.params.get(key)
    ]
    return ", ".join(changes) or "(as the baseline)"


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, dict) else str(value)


# --- the figures: experiment x regime x language --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    experiment: str
    regime: str
    lang: str
    accuracy: float
    following: float
    datasets: int
    on_frontier: bool = False


def result_rows(experiments: Sequence[Experiment], metric: str) -> list[Row]:
    """Every experiment x regime x language of the result metrics (`{regime}.{lang}.{dataset}.{metric}`), averaged
    over the evaluation sets that have both figures; on_frontier: no other row of its language dominates it."""
    rows = []
    for experiment in experiments:
        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for key, value in experiment.metrics.items():
            parts = key.split(".")
            if len(parts) != 4:
                continue
            regime, lang, dataset, name = parts
            following = experiment.metrics.get(f"{regime}.{lang}.{dataset}.following")
            if regime in REGIMES and name == metric and following is not None:
                figures.setdefault((regime, lang), []).append((value, following))
        for (regime, lang), pairs in figures.items():
            accuracy = sum(a for a, _ in pairs) / len(pairs)
            following = sum(f for _, f in pairs) / len(pairs)
            rows.append(Row(experiment.name, regime, lang, accuracy, following, len(pairs)))
    return [replace(row, on_frontier=not any(dominates(_point(o), _point(row)) for o in rows if o.lang == row.lang))
            for row in rows]  # fmt: skip


def _point(row: Row) -> Point:
    return Point(row.regime, row.accuracy, row.following)


def languages(rows: Sequence[Row], experiments: Sequence[Experiment]) -> list[str]:
    """The languages of the rows: in the order of the first experiment's `languages`, then others, English last."""
    declared = next((e.params["languages"] for e in experiments if isinstance(e.params.get("languages"), list)), [])
    found = {row.lang for row in rows}
    others = sorted(found - set(declared) - {"en"})
    return [lang for lang in declared if lang in found] + others + (["en"] if "en" in found else [])


def ordered(rows: Sequence[Row], experiments: Sequence[Experiment]) -> list[Row]:
    """By language, regime (the pipeline's order), then experiment (the baseline first)."""
    langs = languages(rows, experiments)
    order = {e.name: i for i, e in enumerate(experiments)}
    return sorted(rows, key=lambda r: (langs.index(r.lang), REGIMES.index(r.regime), order[r.experiment]))


# --- the outputs ---------------------------------------------------------------------------------------------------


def comparison_table(comparison: Comparison, rows: Sequence[Row], metric: str, figure: str = "compare.png") -> str:
    experiments = comparison.experiments
    keys = changed_params(experiments)
    by_name = {e.name: e for e in experiments}
    baseline = next((e for e in experiments if e.baseline), experiments[0])
    reference = {(r.regime, r.lang): r for r in rows if r.experiment == baseline.name}
    table = []
    for row in ordered(rows, experiments):
        base = reference.get((row.regime, row.lang))
        table.append(
            [
                f"**{row.experiment}**" if row.experiment == baseline.name else row.experiment,
                describe(by_name[row.experiment], baseline, keys),
                REGIME_LABELS[row.regime],
                row.lang,
                percent(row.accuracy),
                percent(row.following),
                signed(row.accuracy - base.accuracy) if base and row.experiment != baseline.name else "",
                signed(row.following - base.following) if base and row.experiment != baseline.name else "",
                "★" if row.on_frontier else "",
            ]
        )
    header = ["experiment", "changed params", "regime", "lang", metric, "following", f"Δ {metric}", "Δ following",
              "frontier"]  # fmt: skip
    lines = [
        "# Experiments compared",
        f"{len(experiments)} experiments of `dvc exp show --json` (baseline **{baseline.name}**, "
        f"{baseline.rev[:7]}). Per regime and language: {metric} and following (reasoning and answer both in the "
        "asked language), in percent, averaged over the evaluation sets; Δ against the baseline in points; ★: on the "
        "Pareto frontier of its language (no experiment and regime is at least as good on both and better on one).",
        f"Changed params: {', '.join(f'`{k}`' for k in keys) or 'none'}.",
        markdown_table(header, table),
        f"![accuracy against following]({figure})",
    ]
    if comparison.pending:
        lines.append("Not compared (no results yet): " + ", ".join(f"{n} ({s})" for n, s in comparison.pending) + ".")
    return "\n\n".join(lines) + "\n"


# One color per experiment (the baseline black), one marker per regime.
EXPERIMENT_COLORS = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#CC79A7", "#0072B2", "#F0E442"]
REGIME_MARKERS = {"base": "o", "sft": "s", "grpo_base": "v", "grpo_sft": "^", "merge": "D"}


def draw_comparison(rows: Sequence[Row], experiments: Sequence[Experiment], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = languages(rows, experiments)
    colors = {e.name: EXPERIMENT_COLORS[i % len(EXPERIMENT_COLORS)] for i, e in enumerate(experiments)}
    sizes = {e.name: max(20, 150 - 110 * i // max(1, len(experiments) - 1)) for i, e in enumerate(experiments)}
    fig, axes = plt.subplots(1, len(langs), figsize=(4.2 * len(langs), 4.4), squeeze=False)
    for ax, lang in zip(axes[0], langs, strict=True):
        points = [r for r in rows if r.lang == lang]
        for row in points:
            # Later experiments smaller, so that equal points show as rings rather than hide one another.
            ax.scatter(100 * row.accuracy, 100 * row.following, s=sizes[row.experiment],
                       marker=REGIME_MARKERS.get(row.regime, "o"), color=colors[row.experiment],
                       edgecolor="black" if row.on_frontier else "white", linewidth=0.8, zorder=3)  # fmt: skip
        front = sorted((r for r in points if r.on_frontier), key=lambda r: (r.accuracy, -r.following))
        ax.step([100 * r.accuracy for r in front], [100 * r.following for r in front], where="post", color="gray",
                linestyle="--", linewidth=1, zorder=2)  # fmt: skip
        top = max(100 * r.accuracy for r in points)
        ax.set(title=lang, xlabel=f"accuracy ({metric}, %)", ylabel="following (%)", ylim=(-5, 105),
               xlim=(-2, min(105, max(10, 1.25 * top + 2))))  # fmt: skip
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], linestyle="", marker="o", color=colors[e.name], label=e.name) for e in experiments]
    regimes = [r for r in REGIMES if any(row.regime == r for row in rows)]
    handles += [
        plt.Line2D([], [], linestyle="", marker=REGIME_MARKERS[r], color="gray", label=REGIME_LABELS[r])
        for r in regimes
    ]
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="Pareto frontier (outlined points)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    rows_of_legend = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * rows_of_legend, 1, 1))
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def compare_experiments(
    show: Sequence[Mapping[str, Any]], out: Path | None = None, metric: str | None = None
) -> tuple[Path, Path, list[Row]]:
    """Write the comparison table (`out`, default reports/compare.md) and its figure beside it (`.png`) of the
    experiments in `show` (`dvc exp show --json`)."""
    comparison = experiments_of(show)
    if not comparison.experiments:
        pending = ", ".join(n for n, _ in comparison.pending)
        raise CompareError(
            f"no experiment has {METRICS_FILE} yet"
            + (f" (waiting: {pending}; see `dvc queue status`)" if pending else "")
        )
    baseline = next((e for e in comparison.experiments if e.baseline), comparison.experiments[0])
    metric = metric or str(baseline.params.get("report.accuracy_metric", DEFAULT_METRIC))
    rows = result_rows(comparison.experiments, metric)
    if not rows:
        raise CompareError(f"{METRICS_FILE} holds no `{{regime}}.{{lang}}.{{dataset}}.{metric}` figures")
    out = out or paths.compare_report()
    figure = out.with_suffix(".png")
    with atomic_write(out) as handle:
        handle.write(comparison_table(comparison, rows, metric, figure.name))
    draw_comparison(rows, comparison.experiments, metric, figure)
    return out, figure, rows
