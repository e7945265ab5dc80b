"""The report on fixed synthetic scores: frontier and dominance equal hand-computed values; figures are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budget_alignment import budget, paths, report
from budget_alignment.io import write_json
from budget_alignment.params import load_params
from budget_alignment.plan import make_plan

REPO = Path(__file__).resolve().parents[1]
REGIMES = ["base", "sft", "grpo_base", "grpo_sft", "merge"]

# (dataset, lang) -> regime -> (pass@1, following). Hand-computed expectations below.
POINTS = {
    ("college_math", "ja"): {
        "base": (0.2, 0.1),
        "sft": (0.3, 0.9),
        "grpo_base": (0.5, 0.2),
        "grpo_sft": (0.4, 0.95),
        "merge": (0.3, 0.5),
    },
    ("college_math", "fr"): {
        "base": (0.6, 0.3),
        "sft": (0.5, 0.9),
        "grpo_base": (0.6, 0.3),
        "grpo_sft": (0.6, 1.0),
        "merge": (0.7, 0.2),
    },
    ("college_math", "es"): {
        "base": (0.1, 0.2),
        "sft": (0.2, 0.8),
        "grpo_base": (0.3, 0.3),
        "grpo_sft": (0.25, 0.85),
        "merge": (0.2, 0.8),
    },
    ("aime25", "ja"): {
        "base": (0.5, 0.5),
        "sft": (0.4, 0.4),
        "grpo_base": (0.3, 0.3),
        "grpo_sft": (0.2, 0.2),
        "merge": (0.1, 0.1),
    },
    ("aime25", "fr"): {
        "base": (0.0, 0.0),
        "sft": (0.0, 1.0),
        "grpo_base": (0.1, 0.0),
        "grpo_sft": (0.1, 1.0),
        "merge": (0.0, 0.5),
    },
    ("aime25", "es"): {
        "base": (0.3, 0.3),
        "sft": (0.3, 0.3),
        "grpo_base": (0.3, 0.3),
        "grpo_sft": (0.31, 0.31),
        "merge": (0.3, 0.3),
    },
}
FRONTIERS = {
    ("college_math", "ja"): ["grpo_base", "grpo_sft"],
    ("college_math", "fr"): ["grpo_sft", "merge"],  # base and grpo_base tie and are dominated by grpo_sft
    ("college_math", "es"): ["grpo_base", "grpo_sft"],
    ("aime25", "ja"): ["base"],
    ("aime25", "fr"): ["grpo_sft"],
    ("aime25", "es"): ["grpo_sft"],
}
# grpo_sft strictly above base on both axes: college_math ja, es; aime25 fr is 0.1 > 0.0 and 1.0 > 0.0; aime25 es.
# college_math fr ties on accuracy (not strict); aime25 ja is below.
DOMINATES = 4


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    evaluation = params.evaluation.model_copy(update={"datasets": ["college_math", "aime25"], "regimes": REGIMES})
    params = params.model_copy(update={"evaluation": evaluation})
    for regime in REGIMES:
        for lang in params.languages:
            scores = {}
            for dataset in evaluation.datasets:
                accuracy, following = POINTS[(dataset, lang)][regime]
                scores[dataset] = {f"pass@{k}": min(1.0, accuracy * k) for k in evaluation.k} | {
                    "following": following,
                    "format": 0.5,
                    "problems": 8,
                    "samples": 32,
                }
            write_json(paths.score_metrics_file(regime, lang), scores)
    write_json(
        paths.score_metrics_file("base", "en"),
        {d: {f"pass@{k}": 0.9 for k in evaluation.k} | {"following": 1.0} for d in evaluation.datasets},
    )
    write_json(
        Path("reports/budget/sft@ja.json"),
        {"stage": "sft@ja", "wall_seconds": 10.0, "peak_rss_bytes": 2**31, "tokens_trained": 1000},
    )
    write_json(
        Path("reports/budget/grpo@sft-ja.json"),
        {"stage": "grpo@sft-ja", "wall_seconds": 5.0, "peak_rss_bytes": 2**30, "tokens_generated": 300},
    )
    return params


def test_frontier_and_dominance_equal_hand_computed_values(project):
    flat = report.flat_metrics(report.load_scores(project))
    rows, counts = report.pareto_analysis(flat, project)
    assert {(r["dataset"], r["lang"]): sorted(r["frontier"]) for r in rows} == {
        k: sorted(v) for k, v in FRONTIERS.items()
    }
    assert counts == {"grpo_sft_dominates_base": DOMINATES, "pairs": 6}


def test_build_report_writes_metrics_markdown_figures_and_plot_data(project):
    flat = report.build_report(project)
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics == flat
    assert metrics["sft.ja.college_math.following"] == 0.9
    assert metrics["grpo_sft.fr.aime25.pass@1"] == 0.1
    assert metrics["base.en.aime25.pass@4"] == 0.9
    assert metrics["pareto.grpo_sft_dominates_base"] == DOMINATES
    text = Path("reports/report.md").read_text()
    assert "GRPO-from-SFT strictly dominates Base in 4 of 6 (dataset, language) pairs" in text
    assert "| SFT - Base | college_math | ja |" in text
    assert "Base (reasoning in English)" in text
    # The report is a function of the scores: the run's cost (budget files on disk) stays out of it.
    assert "wall s" not in text and "sft@ja" not in text
    for name in ("pareto", "following", "passk"):
        png = Path(f"reports/figures/{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    pareto = json.loads(Path("reports/plots/pareto.json").read_text())
    assert {"dataset": "college_math", "lang": "ja", "regime": "sft", "accuracy": 0.3, "following": 0.9} in pareto


def test_budget_is_summed_per_regime():
    budgets = {
        "sft@ja": {"wall_seconds": 10.0, "peak_rss_bytes": 2, "tokens_trained": 100},
        "sft@fr": {"wall_seconds": 5.0, "peak_rss_bytes": 3, "tokens_trained": 50},
        "generate@grpo_sft": {"wall_seconds": 1.0, "peak_rss_bytes": 1, "tokens_generated": 7},
        "grpo@sft-ja": {"wall_seconds": 2.0, "peak_rss_bytes": 9, "tokens_generated": 3},
        "ingest": {"wall_seconds": 99.0},
    }
    totals = budget.budget_by_regime(budgets)
    assert totals["sft"] == {"wall_seconds": 15.0, "peak_rss_bytes": 3, "tokens_trained": 150, "tokens_generated": 0}
    assert totals["grpo_sft"]["wall_seconds"] == 3.0 and totals["grpo_sft"]["tokens_generated"] == 10
    assert set(totals) == {"sft", "grpo_sft"}


def test_the_budget_tool_writes_the_measured_cost_per_stage_and_regime(project):
    written = budget.write_budget_report()
    text = written.read_text()
    assert written == Path("reports/budget.md")
    assert "| sft@ja | 10.0 | 2.00 | 1,000 | 0 | – |" in text and "| SFT | 10.0 |" in text


def test_a_missing_score_file_names_the_stage(project):
    paths.score_metrics_file("merge", "es").unlink()
    with pytest.raises(report.ReportError, match=r"run `budget-align score merge es` first"):
        report.build_report(project)


def test_a_list_in_a_score_file_is_no_figure(project):
    # `budget-align score` lists the pass@k it left out; the report flattens numbers only.
    path = paths.score_metrics_file("sft", "ja")
    scores = json.loads(path.read_text())
    scores["aime25"]["left_out"] = []
    write_json(path, scores)
    flat = report.flat_metrics(report.load_scores(project))
    assert "sft.ja.aime25.left_out" not in flat
    assert flat["sft.ja.aime25.following"] == 0.4


def test_a_score_file_without_a_pass_at_k_of_the_params_is_a_clear_error(project):
    path = paths.score_metrics_file("sft", "fr")
    scores = json.loads(path.read_text())
    k = max(project.evaluation.k)
    del scores["aime25"][f"pass@{k}"]
    scores["aime25"]["left_out"] = [f"pass@{k}"]
    write_json(path, scores)
    with pytest.raises(report.ReportError, match=rf"sft-fr.json: aime25 has no pass@{k} \(too few samples"):
        report.load_scores(project)


def test_the_budget_tool_puts_the_plan_beside_what_was_measured(project):
    params = load_params(REPO / "params.yaml")
    planned = {cost.stage: cost for cost in make_plan(params, Path.cwd()).stages}
    written = budget.write_budget_report(params).read_text()
    sft = planned["sft@ja"]
    # reports/budget/sft@ja.json of the fixture: 10 s, 1,000 tokens trained.
    assert f"| sft@ja | {sft.seconds:.0f} | 10 | {sft.train_tokens:,} | 1,000 | 0 | 0 |" in written
    assert "## Planned against measured" in written and "of the plan)" in written
    assert "merge |" not in written.split("## Planned against measured")[1]  # no budget file: it did not run
