"""The `report` stage: every regime's scores in one flat metrics file, the RQ1-RQ3 deltas, the Pareto analysis,
and the figures. It reads the score files of the stages it lists and nothing else, so it is a pure function of
them (the run's cost is `budget.py`'s).

Metric keys are `{regime}.{lang}.{dataset}.{metric}` (`sft.ja.college_math.following`); the English reference is
`base.en.{dataset}.{metric}`. Every count in the report is computed from the scores, never typed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budget_alignment import paths
from budget_alignment.errors import StageError
from budget_alignment.io import atomic_write, write_json
from budget_alignment.params import Params
from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

REGIME_LABELS = {
    "base": "Base",
    "sft": "SFT",
    "grpo_base": "GRPO-from-Base",
    "grpo_sft": "GRPO-from-SFT",
    "merge": "Merge",
}
REGIME_COLORS = {
    "base": "#4C72B0",
    "sft": "#55A868",
    "grpo_base": "#C44E52",
    "grpo_sft": "#DDB000",
    "merge": "#8172B2",
}
LANG_MARKERS = {"ja": "^", "fr": "s", "es": "o"}
# (label, minuend, subtrahend): the blog's RQ1, RQ2 and RQ3 comparisons.
DELTAS = [
    ("SFT - Base", "sft", "base"),
    ("GRPO_SFT - SFT", "grpo_sft", "sft"),
    ("GRPO_SFT - GRPO_Base", "grpo_sft", "grpo_base"),
]


class ReportError(StageError, RuntimeError):
    """A score file the report needs is missing or unreadable."""


def load_scores(params: Params) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(regime, lang) -> dataset -> metric -> value, from reports/scores/*.json.

    Every pass@k of `evaluation.k` must be there: a score file whose samples were too few for one (`left_out`) is
    an error, not a missing bar.
    """
    scores = {}
    for regime, lang in params.evaluated_pairs():
        path = paths.score_metrics_file(regime, lang)
        try:
            scores[(regime, lang)] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(f"{path} is missing: run `budget-align score {regime} {lang}` first") from None
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}: not valid JSON ({error.msg})") from None
        for dataset, metrics in scores[(regime, lang)].items():
            missing = [f"pass@{k}" for k in params.evaluation.k if f"pass@{k}" not in metrics]
            if missing:
                raise ReportError(
                    f"{path}: {dataset} has no {', '.join(missing)} (too few samples per problem for evaluation.k)"
                )
    return scores


def flat_metrics(scores: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """`{regime}.{lang}.{dataset}.{metric}` -> value, for the numbers only (a list such as `left_out` is no figure)."""
    flat = {}
    for (regime, lang), datasets in scores.items():
        for dataset, metrics in datasets.items():
            for metric, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    flat[f"{regime}.{lang}.{dataset}.{metric}"] = value
    return dict(sorted(flat.items()))


# --- Pareto ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    regime: str
    accuracy: float
    following: float


def dominates(a: Point, b: Point) -> bool:
    """Weak Pareto dominance: at least as good on both axes and better on one."""
    return (
        a.accuracy >= b.accuracy
        and a.following >= b.following
        and (a.accuracy, a.following) != (b.accuracy, b.following)
    )


def strictly_dominates(a: Point, b: Point) -> bool:
    """The blog's sense: higher on both accuracy and following."""
    return a.accuracy > b.accuracy and a.following > b.following


def frontier(points: Iterable[Point]) -> list[str]:
    points = list(points)
    return [p.regime for p in points if not any(dominates(q, p) for q in points if q is not p)]


def pareto_analysis(flat: Mapping[str, float], params: Params) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per (dataset, lang): each regime's point and the frontier; how often GRPO-from-SFT strictly dominates Base."""
    metric = params.report.accuracy_metric
    rows, dominated, pairs = [], 0, 0
    for dataset in params.evaluation.datasets:
        for lang in params.languages:
            points = [
                Point(r, flat[f"{r}.{lang}.{dataset}.{metric}"], flat[f"{r}.{lang}.{dataset}.following"])
                for r in params.evaluation.regimes
            ]
            by_regime = {p.regime: p for p in points}
            on_frontier = frontier(points)
            row = {"dataset": dataset, "lang": lang, "frontier": on_frontier, "points": by_regime}
            if "grpo_sft" in by_regime and "base" in by_regime:
                pairs += 1
                row["grpo_sft_dominates_base"] = strictly_dominates(by_regime["grpo_sft"], by_regime["base"])
                dominated += row["grpo_sft_dominates_base"]
            rows.append(row)
    return rows, {"grpo_sft_dominates_base": dominated, "pairs": pairs}


# --- tables ------------------------------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def signed(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_tables(flat: Mapping[str, float], params: Params) -> str:
    ks = [f"pass@{k}" for k in params.evaluation.k]
    sections = []
    for dataset in params.evaluation.datasets:
        rows = []
        for lang in params.languages:
            for regime in params.evaluation.regimes:
                key = f"{regime}.{lang}.{dataset}"
                rows.append(
                    [
                        lang,
                        REGIME_LABELS[regime],
                        *(percent(flat.get(f"{key}.{m}")) for m in ks),
                        percent(flat.get(f"{key}.following")),
                    ]
                )
        if params.evaluation.english_reference:
            key = f"base.en.{dataset}"
            rows.append(
                [
                    "en",
                    "Base (reasoning in English)",
                    *(percent(flat.get(f"{key}.{m}")) for m in ks),
                    percent(flat.get(f"{key}.following")),
                ]
            )
        sections.append(f"### {dataset}\n\n" + markdown_table(["lang", "regime", *ks, "following"], rows))
    return "\n\n".join(sections)


def deltas_table(flat: Mapping[str, float], params: Params) -> str:
    metrics = [f"pass@{k}" for k in params.evaluation.k] + ["following"]
    rows = []
    for label, left, right in DELTAS:
        if left not in params.evaluation.regimes or right not in params.evaluation.regimes:
            continue
        for dataset in params.evaluation.datasets:
            for lang in params.languages:
                values = [
                    flat[f"{left}.{lang}.{dataset}.{m}"] - flat[f"{right}.{lang}.{dataset}.{m}"] for m in metrics
                ]
                rows.append([label, dataset, lang, *(signed(v) for v in values)])
    return markdown_table(["delta", "dataset", "lang", *metrics], rows)


def pareto_section(rows: list[dict[str, Any]], counts: Mapping[str, int], params: Params) -> str:
    metric = params.report.accuracy_metric
    table = []
    for row in rows:
        points = ", ".join(
            f"{REGIME_LABELS[r]} ({percent(p.accuracy)}, {percent(p.following)})" for r, p in row["points"].items()
        )
        table.append([row["dataset"], row["lang"], ", ".join(REGIME_LABELS[r] for r in row["frontier"]), points])
    summary = (
        f"**GRPO-from-SFT strictly dominates Base in {counts['grpo_sft_dominates_base']} of {counts['pairs']} "
        f"(dataset, language) pairs** (higher {metric} and higher following)."
    )
    return summary + "\n\n" + markdown_table(["dataset", "lang", "on the frontier", f"({metric}, following) %"], table)


# --- figures -----------------------------------------------------------------------------------------------------


def plot_data(flat: Mapping[str, float], params: Params) -> dict[str, list[dict[str, Any]]]:
    """The data behind every figure, also declared as `dvc plots`."""
    metric = params.report.accuracy_metric
    pareto, passk = [], []
    for dataset in params.evaluation.datasets:
        for lang in params.languages:
            for regime in params.evaluation.regimes:
                key = f"{regime}.{lang}.{dataset}"
                pareto.append(
                    {
                        "dataset": dataset,
                        "lang": lang,
                        "regime": regime,
                        "accuracy": flat[f"{key}.{metric}"],
                        "following": flat[f"{key}.following"],
                    }
                )
                for k in params.evaluation.k:
                    passk.append(
                        {"dataset": dataset, "lang": lang, "regime": regime, "k": k, "pass": flat[f"{key}.pass@{k}"]}
                    )
    following = [
        {
            "lang": lang,
            "regime": regime,
            "following": sum(flat[f"{regime}.{lang}.{d}.following"] for d in params.evaluation.datasets)
            / len(params.evaluation.datasets),
        }
        for lang in params.languages
        for regime in params.evaluation.regimes
    ]
    return {"pareto": pareto, "following": following, "passk": passk}


def draw_figures(flat: Mapping[str, float], params: Params, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    metric = params.report.accuracy_metric
    datasets, langs, regimes = params.evaluation.datasets, params.languages, params.evaluation.regimes
    written = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for lang in langs:
            for regime in regimes:
                key = f"{regime}.{lang}.{dataset}"
                ax.scatter(
                    100 * flat[f"{key}.{metric}"],
                    100 * flat[f"{key}.following"],
                    s=60,
                    marker=LANG_MARKERS.get(lang, "D"),
                    color=REGIME_COLORS[regime],
                    edgecolor="black",
                )
        english = flat.get(f"base.en.{dataset}.{metric}")
        if english is not None:
            ax.axvline(100 * english, color="gray", linestyle="--", linewidth=1)
        ax.set(title=dataset, xlabel=f"accuracy ({metric}, %)", ylabel="following (%)", xlim=(-5, 105), ylim=(-5, 105))
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], linestyle="", marker="o", color=REGIME_COLORS[r], label=REGIME_LABELS[r]) for r in regimes
    ]
    handles += [
        plt.Line2D([], [], linestyle="", marker=LANG_MARKERS.get(g, "D"), color="black", label=g) for g in langs
    ]
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="Base, reasoning in English"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    written.append(_save(fig, folder / "pareto.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(regimes)
    for i, regime in enumerate(regimes):
        values = [100 * sum(flat[f"{regime}.{g}.{d}.following"] for d in datasets) / len(datasets) for g in langs]
        ax.bar(
            [j + i * width for j in range(len(langs))],
            values,
            width,
            label=REGIME_LABELS[regime],
            color=REGIME_COLORS[regime],
        )
    ax.set_xticks([j + width * (len(regimes) - 1) / 2 for j in range(len(langs))], langs)
    ax.set(ylabel="following (%), mean over datasets", ylim=(0, 105), title="Language consistency by regime")
    ax.legend(fontsize=8)
    written.append(_save(fig, folder / "following.png"))

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 4), squeeze=False)
    top_k = f"pass@{max(params.evaluation.k)}"
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, regime in enumerate(regimes):
            values = [100 * flat[f"{regime}.{g}.{dataset}.{top_k}"] for g in langs]
            ax.bar(
                [j + i * width for j in range(len(langs))],
                values,
                width,
                color=REGIME_COLORS[regime],
                label=REGIME_LABELS[regime],
            )
        english = flat.get(f"base.en.{dataset}.{top_k}")
        if english is not None:
            ax.axhline(100 * english, color="gray", linestyle="--", linewidth=1, label="Base, reasoning in English")
        ax.set_xticks([j + width * (len(regimes) - 1) / 2 for j in range(len(langs))], langs)
        ax.set(title=dataset, ylabel=f"{top_k} (%)", ylim=(0, 105))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, folder / "passk.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


# --- the stage ---------------------------------------------------------------------------------------------------


def build_report(params: Params, run: StageRun | None = None) -> dict[str, float]:
    """Write reports/metrics.json, reports/report.md, the figures and the plot data; returns the flat metrics."""
    scores = load_scores(params)
    flat = flat_metrics(scores)
    rows, counts = pareto_analysis(flat, params)
    flat["pareto.grpo_sft_dominates_base"] = counts["grpo_sft_dominates_base"]
    flat["pareto.pairs"] = counts["pairs"]
    figures = draw_figures(flat, params, paths.figures_dir())
    for name, records in plot_data(flat, params).items():
        write_json(paths.plots_dir() / f"{name}.json", records)

    english = (
        "with the Base model asked in English as the reference line" if params.evaluation.english_reference else ""
    )
    markdown = "\n\n".join(
        [
            f"# Budget alignment: {params.profile} profile",
            f"Regimes {', '.join(REGIME_LABELS[r] for r in params.evaluation.regimes)} in "
            f"{', '.join(params.languages)}, {english}; n = {params.evaluation.n} samples per problem, "
            f"k in {params.evaluation.k}. Percentages; following = reasoning and answer both in the requested "
            "language.",
            "## Accuracy and language consistency",
            results_tables(flat, params),
            "## Deltas (RQ1-RQ3, percentage points)",
            deltas_table(flat, params),
            "## Pareto analysis (RQ4)",
            pareto_section(rows, counts, params),
            "![Pareto](figures/pareto.png)\n\n![Following](figures/following.png)\n\n![pass@k](figures/passk.png)",
            "The run's cost (time, memory, tokens) is not part of this report, which depends on the scores only: "
            "`budget-align budget` writes it to reports/budget.md, measured beside planned.",
        ]
    )
    with atomic_write(paths.report_file()) as handle:
        handle.write(markdown + "\n")
    write_json(paths.report_metrics_file(), flat)
    if run is not None:
        run.log_metrics(flat)
        for figure in figures:
            run.log_artifact(figure, "figures")
        run.log_artifact(paths.report_file())
        run.add_output(paths.reports_dir())
    log.info(
        "report: GRPO-from-SFT strictly dominates Base in %d of %d pairs",
        counts["grpo_sft_dominates_base"],
        counts["pairs"],
    )
    return flat
