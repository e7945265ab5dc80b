"""Faults of the data stages, through real `budget-align` processes: a full disk under the translation cache or an
output, a translation API that refuses, fails or answers nonsense, a missing key, and a planted key that must never
reach anything the pipeline writes. File systems fill up without `mount`: the child process gets a file size limit
(RLIMIT_FSIZE), so its writes fail with EFBIG, as they fail with ENOSPC on a full disk."""

from __future__ import annotations

import re
import secrets
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml

from budget_alignment.data.sources import load_source
from budget_alignment.params import BundledSource
from budget_alignment.records import Problem, read_records, write_records
from chat_server import ChatServer, status
from stage_process import budget_align, one_error_line

REPO = Path(__file__).resolve().parents[1]
CHAINS = load_source(BundledSource(name="chains"), "chains", "en")


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


def make_project(root: Path, base_url: str, *, api_key_env: str | None = None, tracking: bool = False) -> Path:
    """The committed tiny params with `chains` machine-translated into French by an OpenAI-compatible endpoint."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["tracking"]["enabled"] = tracking
    raw["translate"].update(
        backend="openai",
        model="fake-translator",
        base_url=base_url,
        api_key_env=api_key_env,
        max_retries=0,
        timeout_s=10.0,
        concurrency=1,
        max_chars_per_chunk=200,
        validation_retries=0,
    )
    raw["datasets"]["chains"]["translation"]["fr"] = {"machine": raw["translate"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return root


def ingested(root: Path) -> None:
    write_records(root / "data/ingested/chains.jsonl", CHAINS)


# --- a full disk ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_under_the_translation_cache_is_one_line_and_the_cached_work_is_kept(tmp_path, server):
    root = make_project(tmp_path / "project", server.url)
    ingested(root)
    cache = root / ".cache/translations/cache.sqlite"
    # Enough for the database and the first replies' pages in its write-ahead log, not for all of them.
    result = budget_align(root, "translate", "chains", "-l", "fr", file_size_limit=96 * 1024)
    line = one_error_line(result)
    assert re.match(rf"error: cannot write the translation cache {re.escape(str(cache))}: \S", line), line
    assert "then rerun" in line
    kept = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM translations").fetchone()[0]
    asked = len(server.requests)
    assert 0 < kept < asked <= kept + 1  # every reply before the failing write was committed
    assert not (root / "data/translated/chains/fr.jsonl").exists()
    # With room again, the rerun asks only for what is not in the cache.
    server.requests.clear()
    rerun = budget_align(root, "translate", "chains", "-l", "fr")
    assert rerun.returncode == 0, rerun.stderr
    texts = set(server.texts())
    assert len(server.requests) == len(texts) and len(read_records(root / "data/translated/chains/fr.jsonl", Problem))
    unique = kept + len(server.requests)
    assert sqlite3.connect(cache).execute("SELECT COUNT(*) FROM translations").fetchone()[0] == unique


def test_a_data_output_that_does_not_fit_is_one_line_naming_it(tmp_path):
    root = make_project(tmp_path / "project", "http://127.0.0.1:9/v1")
    old = root / "data/ingested/chains.jsonl"
    old.parent.mkdir(parents=True)
    old.write_text("old\n", encoding="utf-8")
    result = budget_align(root, "ingest", "chains", file_size_limit=8 * 1024)
    line = one_error_line(result)
    assert re.match(r"error: cannot write (data|reports)/\S+: File too large\. Free space", line), line
    assert old.read_text(encoding="utf-8") == "old\n"  # the previous output is as it was
    assert not [path for path in root.rglob("*.tmp")]


# --- the translation API -------------------------------------------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["connection refused", "malformed reply", "401"])
def test_a_failing_translation_api_ends_the_stage_with_one_line_naming_the_endpoint(tmp_path, server, fault):
    url = closed_port_url() if fault == "connection refused" else server.url
    if fault == "malformed reply":
        server.script = [status(200, {"id": "x", "object": "chat.completion"})]
    if fault == "401":
        server.script = [status(401, {"error": {"message": "Incorrect API key provided"}})]
    key = "sk-" + secrets.token_hex(16)
    root = make_project(tmp_path / "project", url, api_key_env="BUDGET_ALIGNMENT_TEST_KEY")
    ingested(root)
    line = one_error_line(budget_align(root, "translate", "chains", "-l", "fr", BUDGET_ALIGNMENT_TEST_KEY=key))
    prefix = f"error: translating to fr (first pending: record 'chains-001', field 'question'): {url}"
    assert line.startswith(prefix), line
    expected = {
        "connection refused": r": cannot connect \(.*\) after 1 attempt\(s\)$",
        "malformed reply": r": the reply is not a chat completion \(no message content\)$",
        "401": r" refused the key in \$BUDGET_ALIGNMENT_TEST_KEY: HTTP 401$",
    }[fault]
    assert re.search(expected, line), line
    assert key not in line
    assert not (root / "data/translated").exists()


def test_a_missing_key_is_one_line_naming_the_variable_before_any_work(tmp_path, server):
    root = make_project(tmp_path / "project", server.url, api_key_env="OPENAI_API_KEY", tracking=True)
    # No ingested data either: the key is checked before anything is read or loaded.
    line = one_error_line(budget_align(root, "translate", "chains"))
    assert line.startswith("error: $OPENAI_API_KEY is not set: the openai backend needs the API key of ")
    assert not server.requests
    assert not (root / "data").exists() and not (root / "mlflow.db").exists() and not (root / "reports").exists()


# --- a planted key -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_planted_key_reaches_the_server_and_nothing_the_pipeline_writes(tmp_path, server):
    key = "sk-planted-" + secrets.token_urlsafe(24)
    root = make_project(tmp_path / "project", server.url, api_key_env="OPENAI_API_KEY", tracking=True)
    logs = []
    for command in (["ingest", "chains"], ["translate", "chains", "-l", "fr"], ["normalize", "chains", "-l", "fr"]):
        result = budget_align(root, "--verbose", *command, OPENAI_API_KEY=key, OPENAI_LOG="debug")
        assert result.returncode == 0, result.stderr
        logs += [result.stdout, result.stderr]
    assert server.requests and all(h["authorization"] == f"Bearer {key}" for h in server.headers)
    assert len(read_records(root / "data/normalized/chains/fr.jsonl", Problem)) == len(CHAINS)
    with sqlite3.connect(root / "mlflow.db") as db:
        runs = [row[0] for row in db.execute("SELECT name FROM runs WHERE status = 'FINISHED'")]
        artifact_roots = [Path(row[0].removeprefix("file://")) for row in db.execute("SELECT artifact_uri FROM runs")]
    assert sorted(runs) == ["ingest", "normalize", "translate"]
    written = [path for path in root.rglob("*") if path.is_file()]
    written += [path for folder in artifact_roots if folder.is_dir() for path in folder.rglob("*") if path.is_file()]
    names = {str(path.relative_to(root)) for path in written if path.is_relative_to(root)}
    assert {"mlflow.db", ".cache/translations/cache.sqlite", "data/translated/chains/fr.jsonl"} <= names
    assert any("data_quality" in str(path) for path in written if not path.is_relative_to(root / "reports"))
    for path in written:
        assert key.encode() not in path.read_bytes(), path
    assert all(key not in text for text in logs)
