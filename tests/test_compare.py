"""`budget-align compare`: experiment x regime x language from `dvc exp show --json`, as one table and one figure.

The unit tests read a captured `dvc exp show --json` (tests/fixtures/compare/dvc_exp_show.json: a baseline, two
finished experiments, one still queued and one failed, made by `make_fixture` below); the last test runs real
`dvc exp run --queue` experiments of a trivial pipeline whose report writes metrics named as reports/metrics.json's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from budget_alignment import compare
from budget_alignment.cli import app
from conftest import FIXTURES

SHOW = FIXTURES / "compare" / "dvc_exp_show.json"
BIN = Path(sys.executable).parent

# The trivial pipeline: one stage that writes reports/metrics.json as the report stage names its figures, from three
# knobs whose effect is known (clip_high moves GRPO's accuracy, the rule SFT's Japanese following, ties the merge's).
PARAMS = """\
languages: [ja, fr]
grpo:
  clip_high: 0.28
normalize:
  ja:
    compact_numeral_spacing: false
merge:
  method: linear
report:
  accuracy_metric: pass@1
"""
REPORT = """\
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
assert p["report"]["accuracy_metric"].startswith("pass@"), "unknown metric"
clip, rule = p["grpo"]["clip_high"], p["normalize"]["ja"]["compact_numeral_spacing"]
ties = p["merge"]["method"] == "ties"
metrics = {"pareto.pairs": 2}
regimes = [("base", 0.1, 0.2), ("sft", 0.2, 0.9), ("grpo_sft", 0.3, 0.9), ("merge", 0.15, 0.6)]
for regime, accuracy, following in regimes:
    for lang in ("ja", "fr"):
        for dataset, shift in (("college_math", 0.0), ("aime25", -0.1)):
            a = accuracy + shift + (2 * (clip - 0.28) if regime == "grpo_sft" else 0)
            a += 0.1 if ties and regime == "merge" else 0
            f = following + (0.05 if rule and regime == "sft" and lang == "ja" else 0)
            metrics[f"{regime}.{lang}.{dataset}.pass@1"] = round(a, 4)
            metrics[f"{regime}.{lang}.{dataset}.pass@2"] = round(a + 0.05, 4)
            metrics[f"{regime}.{lang}.{dataset}.following"] = round(f, 4)
for dataset in ("college_math", "aime25"):
    metrics[f"base.en.{dataset}.pass@1"], metrics[f"base.en.{dataset}.following"] = 0.5, 1.0
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
"""
DVC_YAML = """\
stages:
  report:
    cmd: python report.py
    deps: [report.py]
    params: [grpo.clip_high, normalize, merge.method, report.accuracy_metric]
    metrics:
      - reports/metrics.json:
          cache: false
"""


def run(root: Path, *command: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env |= {"PATH": f"{BIN}:{env['PATH']}", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def trivial_project(root: Path) -> Path:
    """A git + DVC repository whose one stage writes reports/metrics.json, run and committed (the baseline)."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(PARAMS)
    (root / "report.py").write_text(REPORT)
    (root / "dvc.yaml").write_text(DVC_YAML)
    run(root, "git", "init", "-q", "-b", "main")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "repro", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "baseline")
    return root


def queue(root: Path, name: str, *settings: str) -> None:
    run(root, str(BIN / "dvc"), "exp", "run", "--queue", "-n", name, *(a for s in settings for a in ("-S", s)))


def run_queue(root: Path, expected: int) -> str:
    run(root, str(BIN / "dvc"), "queue", "start", "--jobs", "1")
    deadline = time.monotonic() + 600
    while True:
        status = run(root, str(BIN / "dvc"), "queue", "status")
        if status.count("Success") + status.count("Failed") >= expected or time.monotonic() > deadline:
            return status
        time.sleep(2)


def make_fixture(root: Path) -> list:
    """The captured `dvc exp show --json` of tests/fixtures/compare/ (`python tests/test_compare.py DIR` rewrites it):
    clip-0.24 and spacing finished, broken failed, waiting still queued."""
    trivial_project(root)
    queue(root, "clip-0.24", "grpo.clip_high=0.24")
    queue(root, "spacing", "normalize.ja.compact_numeral_spacing=true")
    queue(root, "broken", "report.accuracy_metric=nope")
    run_queue(root, 3)
    queue(root, "waiting", "merge.method=ties")
    show = json.loads(run(root, str(BIN / "dvc"), "exp", "show", "--json"))
    return json.loads(json.dumps(show).replace(str(root), "/repo"))


# --- reading dvc exp show --json ----------------------------------------------------------------------------------


def test_experiments_come_from_dvc_exp_show_each_with_its_params_and_results():
    comparison = compare.experiments_of(json.loads(SHOW.read_text()))
    names = [e.name for e in comparison.experiments]
    assert names == ["main", "clip-0.24", "spacing"]  # the baseline first; the workspace equals it, so it is left out
    assert comparison.experiments[0].baseline and not comparison.experiments[1].baseline
    assert comparison.experiments[1].params["grpo.clip_high"] == 0.24
    assert comparison.experiments[1].metrics["grpo_sft.ja.college_math.pass@1"] == pytest.approx(0.22)
    assert dict(comparison.pending) == {"broken": "failed", "waiting": "queued"}
    assert compare.changed_params(comparison.experiments) == ["grpo.clip_high", "normalize.ja.compact_numeral_spacing"]


def test_the_derived_stage_instances_are_no_changed_param():
    """params.yaml's stage_instances follow other keys (Hydra derives them): never an experiment's own change."""
    show = json.loads(SHOW.read_text())

    def with_instances(node: Any, depth: int = 0) -> None:
        if isinstance(node, dict):
            data = (node.get("params") or {}).get("params.yaml", {}).get("data")
            if isinstance(data, dict):
                data["stage_instances"] = {"grpo": {f"base-ja{depth}": {"models": [f"data/models/{depth}"]}}}
            for value in node.values():
                with_instances(value, depth + 1)
        elif isinstance(node, list):
            for value in node:
                with_instances(value, depth + 1)

    with_instances(show)
    comparison = compare.experiments_of(show)
    assert compare.changed_params(comparison.experiments) == ["grpo.clip_high", "normalize.ja.compact_numeral_spacing"]


def test_a_running_experiment_is_named_not_compared_its_figures_are_its_baseline_s():
    show = json.loads(SHOW.read_text())
    (spacing,) = [e for entry in show for e in entry.get("experiments") or [] if e.get("name") == "spacing"]
    assert compare._data(spacing["revs"][0])  # dvc exp show gives figures...
    spacing["executor"]["state"] = "running"  # ...which, while it runs, are the baseline's
    comparison = compare.experiments_of(show)
    assert [e.name for e in comparison.experiments] == ["main", "clip-0.24"]
    assert dict(comparison.pending)["spacing"] == "running"


def test_rows_average_the_evaluation_sets_per_experiment_regime_and_language():
    comparison = compare.experiments_of(json.loads(SHOW.read_text()))
    rows = {(r.experiment, r.regime, r.lang): r for r in compare.result_rows(comparison.experiments, "pass@1")}
    assert len(rows) == 3 * (4 * 2 + 1)  # experiments x (regimes x languages + the English reference)
    base = rows[("main", "grpo_sft", "ja")]
    assert (base.accuracy, base.following, base.datasets) == (pytest.approx(0.25), pytest.approx(0.9), 2)
    assert rows[("clip-0.24", "grpo_sft", "ja")].accuracy == pytest.approx(0.25 - 0.08)
    assert rows[("spacing", "sft", "ja")].following == pytest.approx(0.95)
    assert rows[("spacing", "sft", "fr")].following == pytest.approx(0.9)
    # Japanese frontier: GRPO-from-SFT of main and spacing (most accurate), SFT of spacing (follows most).
    frontier = {key for key, row in rows.items() if row.on_frontier and key[2] == "ja"}
    assert frontier == {("main", "grpo_sft", "ja"), ("spacing", "grpo_sft", "ja"), ("spacing", "sft", "ja")}
    pass2 = compare.result_rows(comparison.experiments, "pass@2")
    assert next(r for r in pass2 if r.experiment == "main" and r.regime == "sft" and r.lang == "fr").accuracy == 0.2
    assert not any(r.lang == "en" for r in pass2)  # the reference has no pass@2


def test_the_table_shows_what_each_experiment_changed_and_moved_and_the_figure_is_drawn(tmp_path):
    out, figure, _ = compare.compare_experiments(json.loads(SHOW.read_text()), tmp_path / "compare.md")
    text = out.read_text()
    lines = text.splitlines()
    assert (
        "| experiment | changed params | regime | lang | pass@1 | following | Δ pass@1 | Δ following | frontier |"
        in lines
    )
    assert "| **main** | (baseline) | GRPO-from-SFT | ja | 25.0 | 90.0 |  |  | ★ |" in lines
    assert "| clip-0.24 | grpo.clip_high=0.24 | GRPO-from-SFT | ja | 17.0 | 90.0 | -8.0 | +0.0 |  |" in lines
    assert (
        "| spacing | normalize.ja.compact_numeral_spacing=True | SFT | ja | 15.0 | 95.0 | +0.0 | +5.0 | ★ |" in lines
    )
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[3] for line in table] == ["ja"] * 12 + ["fr"] * 12 + ["en"] * 3  # languages in order
    assert "Not compared (no results yet): broken (failed), waiting (queued)." in text
    assert "![accuracy against following](compare.png)" in text
    assert figure == tmp_path / "compare.png" and figure.stat().st_size > 20_000


def test_nothing_to_compare_is_one_clear_error(tmp_path):
    show = json.loads(SHOW.read_text())
    for entry in show:
        for experiment in entry.get("experiments") or []:
            experiment["revs"][0]["data"] = {}
        if entry.get("data"):
            entry["data"]["metrics"] = {}
    with pytest.raises(compare.CompareError, match=r"no experiment has reports/metrics\.json yet \(waiting: "):
        compare.compare_experiments(show, tmp_path / "compare.md")


# --- dvc exp show --only-changed ------------------------------------------------------------------------------------


def test_dvc_exp_show_leads_with_the_results_of_the_report():
    """`dvc exp show` orders its metric columns as DVC's index lists the metric outputs (stage order of dvc.yaml;
    checked by hand on a two-stage repository with the stages swapped); the report's reports/metrics.json is first."""
    from dvc.repo import Repo

    repo = Repo(str(Path(__file__).resolve().parents[1]))
    metrics = [str(out) for stage in repo.index.stages for out in stage.outs if out.metric]
    assert metrics[0] == "reports/metrics.json"
    assert all(m.startswith(("reports/data_quality/", "reports/train/")) for m in metrics[1:])  # no budget columns


# --- for real: dvc exp run --queue, dvc queue start, budget-align compare -------------------------------------------


@pytest.mark.slow
def test_a_queued_sweep_ends_in_the_comparison(tmp_path, monkeypatch):
    root = trivial_project(tmp_path / "repo")
    queue(root, "clip-0.3", "grpo.clip_high=0.3")
    queue(root, "ties", "merge.method=ties")
    status = run_queue(root, 2)
    assert status.count("Success") == 2, status
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    result = CliRunner().invoke(app, ["compare"])
    assert result.exit_code == 0, result.output
    assert "3 experiments" in result.output
    text = (root / "reports/compare.md").read_text()
    assert "| clip-0.3 | grpo.clip_high=0.3 | GRPO-from-SFT | ja | 29.0 | 90.0 | +4.0 | +0.0 | ★ |" in text
    assert "| ties | merge.method=ties | Merge | fr | 20.0 | 60.0 | +10.0 | +0.0 |  |" in text
    assert (root / "reports/compare.png").stat().st_size > 20_000


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        captured = make_fixture(Path(folder) / "repo")
    SHOW.parent.mkdir(parents=True, exist_ok=True)
    SHOW.write_text(json.dumps(captured, indent=1) + "\n")
    print(f"wrote {SHOW}")
