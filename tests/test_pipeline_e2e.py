"""The whole pipeline end to end, as a user runs it, on a micro variant of the tiny profile.

One copy of the project runs `dvc repro` once (module fixture); the tests then check the report, a no-op rerun,
sharing the cache through a local-directory remote and an S3 remote (moto's server on 127.0.0.1), and that
`dvc exp run -S grpo.clip_high=...` reruns only the GRPO stages and what depends on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# micro, narrowed to one language and one evaluation set (Hydra deletes what the tiny profile adds).
LANG_OVERRIDES = [
    f"~datasets.{dataset}.translation.{lang}"
    for dataset in ("chains", "math", "college_math")
    for lang in ("fr", "es")
]
OVERRIDES = [
    "profile=micro",
    "languages=[ja]",
    "merge.members=[base,sft-ja]",
    "evaluation.datasets=[college_math]",
    "~datasets.aime25",
    "~datasets.gpqa",
    "~datasets.medicine",
    "~normalize.fr",
    "~normalize.es",
    *LANG_OVERRIDES,
]
REGIMES = ["base", "sft", "grpo_base", "grpo_sft", "merge"]


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def project_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "PATH": f"{BIN}:{env['PATH']}",
        "PYTHONPATH": str(root / "src"),
        # The model wheel is a download, not pipeline work: share the checkout's copy.
        "BUDGET_ALIGNMENT_CACHE": str(REPO / ".cache"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    return env


def copy_project(destination: Path) -> None:
    """The project as a fresh clone would have it: tracked files and new files git does not ignore."""
    listing = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listing):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def stages_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("e2e") / "repo"
    root.mkdir()
    copy_project(root)
    env = project_env(root)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run([str(BIN / "budget-align"), "compose-params", *OVERRIDES], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "micro project"], root, env)
    started = time.perf_counter()
    result = run([str(BIN / "dvc"), "repro"], root, env)
    print(f"micro dvc repro: {time.perf_counter() - started:.0f} s, {len(stages_ran(result.stdout))} stages")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "pipeline run"], root, env)
    return root, env


def test_the_pipeline_ends_with_the_report_its_figures_and_metrics(project):
    root, _ = project
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for regime in REGIMES:
        for metric in ("pass@1", "pass@2", "following", "format"):
            assert 0.0 <= metrics[f"{regime}.ja.college_math.{metric}"] <= 1.0
    assert "base.en.college_math.pass@1" in metrics
    assert metrics["pareto.pairs"] == 1
    text = (root / "reports/report.md").read_text()
    assert "strictly dominates Base in" in text and "| SFT - Base | college_math | ja |" in text
    for figure in ("pareto", "following", "passk"):
        assert (root / f"reports/figures/{figure}.png").stat().st_size > 5_000
    for model in ("base", "merge", "sft/ja", "grpo_base/ja", "grpo_sft/ja"):
        assert (root / "data/models" / model).is_dir()
    budget = json.loads((root / "reports/budget/sft@ja.json").read_text())
    assert budget["wall_seconds"] > 0 and budget["peak_rss_bytes"] > 0


def test_every_stage_has_its_mlflow_run_in_the_repository_database(project):
    root, _ = project
    with sqlite3.connect(root / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from runs where status = 'FINISHED'")}
    expected = {
        "base_model",
        "ingest@chains",
        "normalize@college_math-ja",
        "sft@ja",
        "grpo@sft-ja",
        "merge",
        "generate@grpo_sft-ja",
        "generate_en",
        "score@merge-ja",
        "report",
    }
    assert expected <= names


def test_a_second_repro_is_a_no_op(project):
    root, env = project
    result = run([str(BIN / "dvc"), "repro"], root, env)
    assert stages_ran(result.stdout) == set()
    assert "up to date" in (result.stdout + result.stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PULLED = [
    "data/models/base/model.safetensors",
    "data/normalized/college_math/ja.jsonl",
    "reports/report.md",
    "data/generations/sft-ja/college_math.jsonl",
]


def round_trip(root: Path, env: dict, clone: Path, add_remote) -> None:
    """push, a fresh git clone, pull: then `dvc repro` has nothing to do and every file is identical.

    `add_remote(repo, env)` configures the remote in a repository's git-ignored local config, as a teammate
    does with credentials of their own, so it is added to the clone too.
    """
    add_remote(root, env)
    run([str(BIN / "dvc"), "push"], root, env)
    run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    clone_env = env | {"PYTHONPATH": str(clone / "src")}
    add_remote(clone, clone_env)
    run([str(BIN / "dvc"), "pull"], clone, clone_env)
    status = run([str(BIN / "dvc"), "status"], clone, clone_env)
    assert "up to date" in status.stdout, status.stdout
    result = run([str(BIN / "dvc"), "repro"], clone, clone_env)
    assert stages_ran(result.stdout) == set()
    for name in PULLED:
        assert sha256(clone / name) == sha256(root / name), name


def test_a_local_directory_remote_shares_every_output(project, tmp_path):
    root, env = project
    remote = tmp_path / "remote"

    def add_remote(repo: Path, repo_env: dict) -> None:
        run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "team", str(remote)], repo, repo_env)

    try:
        round_trip(root, env | {"DVC_SITE_CACHE_DIR": str(tmp_path / "site")}, tmp_path / "clone", add_remote)
    finally:
        run([str(BIN / "dvc"), "remote", "remove", "--local", "team"], root, env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_remote(tmp_path):
    """moto's S3 server on 127.0.0.1 with one bucket; fake credentials only in the environment."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        import boto3

        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{k.lower(): v for k, v in credentials.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        ).create_bucket(Bucket="team-cache")
        yield endpoint, credentials
    finally:
        server.terminate()
        server.wait(timeout=10)


def add_s3_remote(root: Path, env: dict, endpoint: str) -> None:
    run([str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "s3team", "s3://team-cache/cache"], root, env)
    run([str(BIN / "dvc"), "remote", "modify", "--local", "s3team", "endpointurl", endpoint], root, env)


def test_an_s3_remote_shares_every_output(project, s3_remote, tmp_path):
    root, env = project
    endpoint, credentials = s3_remote
    env = env | credentials | {"DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    try:
        round_trip(root, env, tmp_path / "clone", lambda repo, repo_env: add_s3_remote(repo, repo_env, endpoint))
    finally:
        run([str(BIN / "dvc"), "remote", "remove", "--local", "s3team"], root, env)


def test_exp_run_of_one_grpo_knob_reruns_only_grpo_and_below(project):
    root, env = project
    overrides = [arg for override in [*OVERRIDES, "grpo.clip_high=0.3"] for arg in ("-S", override)]
    result = run([str(BIN / "dvc"), "exp", "run", "-n", "clip-0.3", *overrides], root, env)
    ran = stages_ran(result.stdout)
    # The GRPO models change, so their generations are redone; scores and the report rerun only where the
    # generations' content changed (DVC compares hashes), so they may be skipped.
    assert {"grpo@base-ja", "grpo@sft-ja", "generate@grpo_base-ja", "generate@grpo_sft-ja"} <= ran
    assert ran <= {
        "grpo@base-ja",
        "grpo@sft-ja",
        "generate@grpo_base-ja",
        "generate@grpo_sft-ja",
        "score@grpo_base-ja",
        "score@grpo_sft-ja",
        "report",
    }
    assert "clip_high: 0.3" in (root / "params.yaml").read_text()
    shown = json.loads(run([str(BIN / "dvc"), "exp", "show", "--json"], root, env).stdout)
    assert "clip-0.3" in json.dumps(shown)
