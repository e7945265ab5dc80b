"""`budget-align budget`: what the run cost, per stage and per regime, from the stages' budget files.

Each stage writes its run facts (wall and CPU seconds, peak memory, bytes written, tokens trained and generated) to
`reports/budget/<stage>.json` and MLflow. They are facts of one run, not functions of the stage's inputs, so no stage
depends on them and they are not DVC outputs: this tool reads whatever the last runs left and writes
`reports/budget.md` (git-ignored). With a `plan` section in the params, the figures `budget-align plan` predicted for
each stage stand next to the measured ones, so the plan's throughput can be checked against this machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from budget_alignment import paths
from budget_alignment.io import atomic_write
from budget_alignment.params import Params
from budget_alignment.plan import StageCost, make_plan
from budget_alignment.report import REGIME_LABELS, markdown_table


def load_budgets(folder: Path | None = None) -> dict[str, dict[str, float]]:
    """Every stage's budget file that the runs so far have left, by stage."""
    folder = folder or paths.budget_file("x").parent
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def regime_of_stage(stage: str) -> str | None:
    """Which regime a stage's cost belongs to: `sft@ja` -> sft, `generate@grpo_sft` -> grpo_sft, ..."""
    name, _, instance = stage.partition("@")
    if name == "base_model":
        return "base"
    if name in ("merge", "merge_members"):
        return "merge"
    if name == "sft":
        return "sft"
    if name == "grpo":
        return f"grpo_{instance.split('-')[0]}"
    if name == "generate":
        return instance
    return None


def budget_by_regime(budgets: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for stage, figures in budgets.items():
        regime = regime_of_stage(stage)
        if regime is None:
            continue
        total = totals.setdefault(
            regime, {"wall_seconds": 0.0, "peak_rss_bytes": 0, "tokens_trained": 0, "tokens_generated": 0}
        )
        total["wall_seconds"] += figures.get("wall_seconds", 0.0)
        total["peak_rss_bytes"] = max(total["peak_rss_bytes"], figures.get("peak_rss_bytes", 0))
        total["tokens_trained"] += figures.get("tokens_trained", 0)
        total["tokens_generated"] += figures.get("tokens_generated", 0)
        if "gpu_seconds" in figures:
            total["gpu_seconds"] = total.get("gpu_seconds", 0.0) + figures["gpu_seconds"]
    return totals


def budget_section(budgets: Mapping[str, Mapping[str, float]]) -> str:
    def row(name: str, figures: Mapping[str, float]) -> list[str]:
        gpu = figures.get("gpu_seconds")
        return [
            name,
            f"{figures.get('wall_seconds', 0):.1f}",
            f"{figures.get('peak_rss_bytes', 0) / 2**30:.2f}",
            f"{int(figures.get('tokens_trained', 0)):,}",
            f"{int(figures.get('tokens_generated', 0)):,}",
            "–" if gpu is None else f"{gpu:.1f}",
        ]

    header = ["", "wall s", "peak GiB", "tokens trained", "tokens generated", "GPU s"]
    per_stage = markdown_table(["stage", *header[1:]], [row(s, f) for s, f in budgets.items()])
    per_regime = markdown_table(
        ["regime", *header[1:]], [row(REGIME_LABELS[r], f) for r, f in budget_by_regime(budgets).items()]
    )
    return f"Per regime (its training, generation and scoring stages):\n\n{per_regime}\n\nPer stage:\n\n{per_stage}"


def plan_section(budgets: Mapping[str, Mapping[str, float]], planned: list[StageCost]) -> str:
    """Planned against measured, for the stages that ran: wall seconds and tokens (generated: the plan's ceiling)."""
    rows, planned_s, measured_s = [], 0.0, 0.0
    for cost in planned:
        figures = budgets.get(cost.stage)
        if figures is None:
            continue
        wall = figures.get("wall_seconds", 0.0)
        planned_s, measured_s = planned_s + cost.seconds, measured_s + wall
        rows.append([
            cost.stage, f"{cost.seconds:.0f}", f"{wall:.0f}",
            f"{cost.train_tokens:,}", f"{int(figures.get('tokens_trained', 0)):,}",
            f"{cost.generated_tokens:,}", f"{int(figures.get('tokens_generated', 0)):,}",
        ])  # fmt: skip
    if not rows:
        return "No stage of the plan has run yet."
    header = ["stage", "planned s", "measured s", "planned tokens trained", "trained", "planned generated (at most)",
              "generated"]  # fmt: skip
    total = f"Planned {planned_s:.0f} s for these stages, measured {measured_s:.0f} s"
    ratio = f" ({measured_s / planned_s:.0%} of the plan)." if planned_s else "."
    return f"{total}{ratio}\n\n{markdown_table(header, rows)}"


def budget_file() -> Path:
    return paths.reports_dir() / "budget.md"


def write_budget_report(params: Params | None = None) -> Path:
    """reports/budget.md from the budget files on disk, and the plan of `params` beside them when it has one."""
    budgets = load_budgets()
    text = "# What the run cost\n\n" + budget_section(budgets) + "\n"
    if params is not None and params.plan is not None:
        text += "\n## Planned against measured\n\n" + plan_section(budgets, make_plan(params).stages) + "\n"
    with atomic_write(budget_file()) as handle:
        handle.write(text)
    return budget_file()
