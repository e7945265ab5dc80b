"""Machine translation: protection of what must not change, chunking, the cache, and the backends for real
(an OpenAI-compatible server on 127.0.0.1, a tiny transformers chat model, vLLM where a GPU and vllm exist)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from budget_alignment.data.sources import load_source
from budget_alignment.data.spans import MARKER_RE, MarkerError, protect, restore, split_paragraphs
from budget_alignment.data.translate import machine_translate, translate_dataset
from budget_alignment.data.translation_backends import (
    ChunkRequest,
    OpenAIBackend,
    TransformersBackend,
    TranslationError,
    build_messages,
)
from budget_alignment.data.translation_cache import TranslationCache, cache_key
from budget_alignment.params import BundledSource, MachineTranslationParams, Params, load_params
from budget_alignment.records import Problem, read_records, write_records
from chat_server import ChatServer, completion, pseudo_french, sleepy, status
from conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]

# --- protection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spans"),
    [
        ("Mia has 12 apples and buys 8.", ["12", "8"]),
        ("So $12 - 5 = 7$ apples.", ["$12 - 5 = 7$"]),
        ("The answer is \\boxed{15}.", ["\\boxed{15}"]),
        ("Costs \\$18.90 today", ["\\$18.90"]),
        ("Use `x = 2` and\n```\ny = 3\n```", ["`x = 2`", "```\ny = 3\n```"]),
        ("Display $$\\frac{1}{2}$$ and \\[x^2\\] and \\(y\\)", ["$$\\frac{1}{2}$$", "\\[x^2\\]", "\\(y\\)"]),
        ("\\begin{align} a &= 1 \\end{align} then", ["\\begin{align} a &= 1 \\end{align}"]),
        ("Which is right? (A) red (B) blue", ["(A)", "(B)"]),
        ("A) red\nB) blue", ["A)", "B)"]),
        ("A cat, a dog. I think so.", []),
    ],
)
def test_protected_spans(text, spans):
    protected = protect(text)
    assert list(protected.spans) == spans
    assert restore(protected.text, protected.spans) == text


def test_restore_rejects_lost_repeated_invented_and_damaged_markers():
    spans = ("$x$", "12")
    assert restore("⟦1⟧ puis ⟦0⟧", spans) == "12 puis $x$"  # order may change with the grammar
    for reply, reason in [
        ("⟦0⟧ seulement", "lost ⟦1⟧"),
        ("⟦0⟧ ⟦0⟧ ⟦1⟧", "repeated ⟦0⟧"),
        ("⟦0⟧ ⟦1⟧ ⟦2⟧", "invented ⟦2⟧"),
        ("⟦0⟧ ⟦1 et", "lost ⟦1⟧; damaged"),
    ]:
        with pytest.raises(MarkerError, match=re.escape(reason)):
            restore(reply, spans)


def test_paragraph_chunks_rejoin_exactly():
    text = "\n\nFirst paragraph.\n\nSecond one, a bit longer.\n \n\nThird.\n"
    for max_chars in (1, 20, 40, 10_000):
        chunks = split_paragraphs(text, max_chars)
        assert "".join(chunk + separator for chunk, separator in chunks) == text
    assert len(split_paragraphs(text, 30)) == 3
    assert len(split_paragraphs(text, 10_000)) == 1


def test_protection_round_trips_math500_problems_and_solutions():
    # 24 MATH-500 problems chosen for their Asymptote figures, display math, environments, code and dollars.
    rows = [json.loads(line) for line in (FIXTURES / "math500" / "test.jsonl").open(encoding="utf-8")]
    assert len(rows) == 24
    for row in rows:
        for field in ("problem", "solution"):
            protected = protect(row[field])
            assert restore(protected.text, protected.spans) == row[field], row["unique_id"]
            # Nothing protected leaks a marker-like text, and the chunks of the protected text rejoin exactly.
            assert len(MARKER_RE.findall(protected.text)) == len(protected.spans)
            chunks = split_paragraphs(protected.text, 300)
            assert "".join(c + s for c, s in chunks) == protected.text


# --- an OpenAI-compatible server on 127.0.0.1 (tests/chat_server.py) ----------------------------------------------


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


def settings_for(server: ChatServer, **overrides) -> MachineTranslationParams:
    values = dict(
        backend="openai",
        model="fake-translator",
        base_url=server.url,
        api_key_env=None,
        max_retries=3,
        timeout_s=5.0,
        concurrency=2,
        max_chars_per_chunk=200,
        validation_retries=1,
    )
    return MachineTranslationParams(**{**values, **overrides})


REQUEST = ChunkRequest("k", "Hello ⟦0⟧", build_messages("Hello ⟦0⟧", "fr", "v1"), temperature=0.0)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("BUDGET_ALIGNMENT_TEST_KEY", raising=False)


def test_retries_on_429_and_5xx(server, no_key):
    server.script = [status(429), status(503), status(500)]
    backend = OpenAIBackend(settings_for(server))
    assert backend._complete(REQUEST) == pseudo_french("Hello ⟦0⟧")
    assert len(server.requests) == 4
    assert "authorization" not in server.headers[0]  # api_key_env null: no key is sent


def test_gives_up_after_max_retries_in_one_line_naming_the_endpoint(server):
    server.script = [status(502)] * 10
    backend = OpenAIBackend(settings_for(server, max_retries=2))
    with pytest.raises(TranslationError) as failure:
        backend._complete(REQUEST)
    assert str(failure.value) == f"{server.url}: HTTP 502 (server error) after 3 attempt(s)"
    assert len(server.requests) == 3
    server.script = [status(429)] * 10
    with pytest.raises(TranslationError, match=r"HTTP 429 \(rate limited\) after 3 attempt\(s\)$"):
        backend._complete(REQUEST)


def test_timeouts_are_retried_then_reported(server):
    server.script = [sleepy(1.5)]
    backend = OpenAIBackend(settings_for(server, timeout_s=0.3))
    assert backend._complete(REQUEST)  # the second attempt answers at once
    server.script = [sleepy(1.5)] * 3
    with pytest.raises(TranslationError, match=r"no reply within 0.3 s after 2 attempt\(s\)$"):
        OpenAIBackend(settings_for(server, timeout_s=0.3, max_retries=1))._complete(REQUEST)


@pytest.mark.parametrize(
    ("payload", "code"),
    [({"choices": []}, 200), ({"object": "nothing"}, 200), ({"choices": [{"message": {"content": None}}]}, 200)],
)
def test_a_malformed_reply_is_one_line(server, payload, code):
    server.script = [status(code, payload)]
    with pytest.raises(TranslationError) as failure:
        OpenAIBackend(settings_for(server))._complete(REQUEST)
    assert str(failure.value) == f"{server.url}: the reply is not a chat completion (no message content)"


def test_connection_refused_is_one_line(no_key):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    settings = MachineTranslationParams(backend="openai", model="m", base_url=url, api_key_env=None, max_retries=1)
    with pytest.raises(TranslationError) as failure:
        OpenAIBackend(settings)._complete(REQUEST)
    message = str(failure.value)
    assert message.startswith(f"{url}: cannot connect (") and message.endswith("after 2 attempt(s)")
    assert "\n" not in message and "refused" in message.lower()


KEYED = {"api_key_env": "BUDGET_ALIGNMENT_TEST_KEY"}


def test_a_missing_key_is_an_error_naming_the_variable(server, no_key):
    with pytest.raises(TranslationError, match=r"^\$BUDGET_ALIGNMENT_TEST_KEY is not set"):
        OpenAIBackend(settings_for(server, **KEYED))
    assert not server.requests


def test_the_key_comes_from_the_environment_and_is_never_logged_or_stored(server, monkeypatch, tmp_path, caplog):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("BUDGET_ALIGNMENT_TEST_KEY", secret)
    # A server that echoes part of the key in its error, as some do.
    server.script = [status(401, {"error": {"message": f"Incorrect API key provided: {secret}"}})]
    backend = OpenAIBackend(settings_for(server, **KEYED))
    with caplog.at_level("DEBUG"), pytest.raises(TranslationError) as failure:
        backend._complete(REQUEST)
    assert str(failure.value) == f"{server.url} refused the key in $BUDGET_ALIGNMENT_TEST_KEY: HTTP 401"
    assert len(server.requests) == 1  # a 401 is not retried
    assert server.headers[0]["authorization"] == f"Bearer {secret}"
    cache = TranslationCache(tmp_path / "cache.sqlite")
    english = [
        Problem(id="q1", dataset="toy", lang="en", question="Hello there, my friend.", answer="1", answer_type="math")
    ]
    machine_translate(english, "fr", settings_for(server), backend, cache, progress=False)
    cache.close()
    assert secret not in str(failure.value) and secret not in caplog.text
    assert secret.encode() not in (tmp_path / "cache.sqlite").read_bytes()
    assert all(secret.encode() not in path.read_bytes() for path in tmp_path.glob("cache.sqlite*"))


def test_a_reply_that_breaks_a_protected_span_is_asked_again_sampled_with_a_new_seed(server, tmp_path):
    server.script = [lambda body: (200, completion("Le nombre est ⟦0⟧ mais pas ⟦1⟧ ⟦7⟧."))]
    english = [
        Problem(
            id="p1",
            dataset="toy",
            lang="en",
            question="Mia has 12 apples and 3 pears.",
            answer="15",
            answer_type="math",
        )
    ]
    settings = settings_for(server, concurrency=1, retry_temperature=0.9)
    cache = TranslationCache(tmp_path / "c.sqlite")
    result = machine_translate(english, "fr", settings, OpenAIBackend(settings), cache, progress=False)
    stats = result.stats
    assert stats.rejected_replies == 1 and stats.translated == 2 and stats.retried_chunks == 1
    first, again = server.requests
    assert first["messages"] == again["messages"]
    assert first["temperature"] == 0.0 and "seed" not in first
    assert again["temperature"] == 0.9 and again["seed"] == 1
    (record,) = result.records
    assert "12" in record.question and "3" in record.question and "⟦" not in record.question
    # Both replies are cached (the refused one too), each under its attempt's key: a rerun asks nothing.
    assert len(cache) == 2
    server.requests.clear()
    rerun = machine_translate(english, "fr", settings, OpenAIBackend(settings), cache, progress=False)
    assert not server.requests and rerun.records == result.records


def test_replies_that_keep_breaking_spans_leave_the_record_out_naming_why(server, tmp_path):
    server.reply = lambda text: "Je ne sais pas." if "⟦" in text else pseudo_french(text)
    english = [
        Problem(
            id="ok-1", dataset="toy", lang="en", question="Say hello to everyone here.", answer="1", answer_type="math"
        ),
        Problem(id="bad-2", dataset="toy", lang="en", question="Add 2 and 3 now.", answer="5", answer_type="math"),
    ]
    settings = settings_for(server, validation_retries=2)
    result = machine_translate(
        english, "fr", settings, OpenAIBackend(settings), TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    assert [record.id for record in result.records] == ["ok-1"]
    assert result.unassembled == {"bad-2": "field 'question': the reply lost ⟦0⟧, ⟦1⟧"}
    assert len(server.requests) == 4  # the good chunk once, the bad one three times
    assert [request.get("seed") for request in server.requests[1:]] == [None, 1, 2]


def test_long_chains_are_split_at_paragraphs_and_identical_chunks_asked_once(server, tmp_path):
    english = load_source(BundledSource(name="chains"), "chains", "en")
    settings = settings_for(server, max_chars_per_chunk=120)
    result = machine_translate(
        english, "fr", settings, OpenAIBackend(settings), TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    records, stats = result.records, result.stats
    assert stats.chunks > 2 * len(english)  # solutions went in several chunks
    assert stats.unique_chunks < stats.chunks - stats.unchanged_chunks  # "So the answer is ⟦0⟧." is asked once
    assert len(server.requests) == stats.unique_chunks == stats.translated
    # At most 120 characters, unless a single paragraph is longer (it is never cut inside).
    assert all(len(text) <= 120 or "\n\n" not in text for text in server.texts())
    assert any("\n\n" in text for text in server.texts())
    for original, translated in zip(english, records, strict=True):
        assert translated.id == original.id and translated.answer == original.answer and translated.lang == "fr"
        assert translated.solution.count("\n\n") == original.solution.count("\n\n")
        assert protect(original.solution).spans == protect(translated.solution).spans
        assert translated.provenance["translation"] == {
            "method": "machine",
            "backend": "openai",
            "model": "fake-translator",
            "prompt_version": "v1",
        }


def test_the_cache_key_covers_text_backend_model_prompt_version_language_and_attempt():
    variants = [
        ("t", "openai", "m", "v1", "fr"),
        ("u", "openai", "m", "v1", "fr"),
        ("t", "vllm", "m", "v1", "fr"),
        ("t", "openai", "n", "v1", "fr"),
        ("t", "openai", "m", "v2", "fr"),
        ("t", "openai", "m", "v1", "es"),
        ("t", "openai", "m", "v1", "fr", "retry 1: temperature 0.7, seed 1"),
        ("t", "openai", "m", "v1", "fr", "retry 2: temperature 0.7, seed 2"),
    ]
    assert len({cache_key(*args) for args in variants}) == len(variants)
    # First attempts keep the keys caches were written with before retries had keys of their own.
    assert cache_key("t", "openai", "m", "v1", "fr") == cache_key("t", "openai", "m", "v1", "fr", "")


# --- the stage: human translations, reruns from the cache, crash and resume ----------------------------------------


def make_params(machine: dict[str, list[str]] | None = None, translate: dict | None = None) -> Params:
    """The committed tiny params, tracking off, with machine translation for some (dataset, language) pairs."""
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["tracking"]["enabled"] = False
    if translate:
        raw["translate"] = {**raw["translate"], **translate}
    for dataset, langs in (machine or {}).items():
        for lang in langs:
            raw["datasets"][dataset]["translation"][lang] = {"machine": raw["translate"]}
    return Params.model_validate(raw)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def ingest(params: Params, dataset: str) -> list[Problem]:
    from budget_alignment.data.ingest import ingest_dataset

    return ingest_dataset(params, dataset)


def test_stage_with_a_human_translation(workdir):
    params = make_params()
    english = ingest(params, "college_math")
    records = translate_dataset(params, "college_math", langs=["ja"])["ja"]
    assert [r.id for r in records] == [e.id for e in english]
    assert [r.answer for r in records] == [e.answer for e in english]
    assert records[0].provenance["translation"]["method"] == "human"
    assert records[0].provenance["translation"]["source"]["set"] == "college_math"
    assert read_records(workdir / "data/translated/college_math/ja.jsonl", Problem) == records
    assert json.loads((workdir / "reports/data_quality/translate/college_math/ja.json").read_text())["rejected"] == 0
    assert (workdir / "reports/data_quality/rejected/translate/college_math/ja.jsonl").read_text() == ""


@pytest.mark.slow
def test_one_process_translates_every_language_and_a_rerun_is_all_cache_hits(workdir, server):
    translate = settings_for(server).model_dump(mode="json")
    params = make_params({"chains": ["fr"]}, translate)  # ja and es: the bundled human translations
    ingest(params, "chains")
    first = translate_dataset(params, "chains")
    assert set(first) == {"ja", "fr", "es"}
    asked = len(server.requests)
    assert asked > 30
    outputs = {lang: workdir / f"data/translated/chains/{lang}.jsonl" for lang in first}
    before = {lang: path.read_bytes() for lang, path in outputs.items()}
    again = translate_dataset(params, "chains")
    assert len(server.requests) == asked  # nothing asked again
    assert again == first and {lang: path.read_bytes() for lang, path in outputs.items()} == before
    report = json.loads((workdir / "reports/data_quality/translate/chains/fr.json").read_text())
    assert report["success"] and report["checks"]["protected_spans_restored"]["success"]
    assert report["rejected"] == 0 and report["records"] == len(first["fr"])


def test_a_translation_that_merges_protected_numbers_fails_the_contract(workdir, server):
    from budget_alignment.data.validation import ContractViolation

    # Every marker kept once, but two numbers written side by side read as one: "12" and "5" become "125".
    def merge_markers(text: str) -> str:
        markers = MARKER_RE.findall(text)
        return pseudo_french(MARKER_RE.sub("", text)) + " " + "".join(f"⟦{m}⟧" for m in markers)

    server.reply = merge_markers
    translate = settings_for(server).model_dump(mode="json")
    params = make_params({"chains": ["es"]}, translate)
    ingest(params, "chains")
    with pytest.raises(ContractViolation) as caught:
        translate_dataset(params, "chains", langs=["es"])
    assert "protected_spans_restored" in caught.value.failed_checks
    assert "above contracts.max_rejected_fraction.translate = 0" in str(caught.value)
    assert not (workdir / "data/translated/chains/es.jsonl").exists()
    assert not (workdir / "reports/data_quality/rejected/translate/chains/es.jsonl").exists()


def english_in_one_record(record_id: str):
    """A translator that leaves the chunks of one record in English on the first attempt, then translates them."""
    english = {
        chunk
        for field in ("question", "solution")
        for chunk, _ in split_paragraphs(
            protect(getattr(next(p for p in CHAINS if p.id == record_id), field)).text, 10_000
        )
    }

    def act(body: dict) -> tuple[int, object]:
        text = body["messages"][-1]["content"]
        if body.get("seed") is None and text in english:
            return 200, completion(text)  # "translated" into English
        return 200, None

    return act


CHAINS = load_source(BundledSource(name="chains"), "chains", "en")


def test_a_record_failing_the_row_checks_is_retried_and_then_accepted(workdir, server):
    server.script = [english_in_one_record("chains-004")] * 1000
    params = make_params({"chains": ["fr"]}, settings_for(server, max_chars_per_chunk=10_000).model_dump(mode="json"))
    ingest(params, "chains")
    records = translate_dataset(params, "chains", langs=["fr"])["fr"]
    assert len(records) == len(CHAINS)
    retried = [request for request in server.requests if request.get("seed") == 1]
    assert retried and all(request["temperature"] == 0.7 for request in retried)
    assert len(retried) == 2  # the question and the solution of chains-004, nothing else
    assert (workdir / "reports/data_quality/rejected/translate/chains/fr.jsonl").read_text() == ""


def test_what_still_fails_is_quarantined_within_the_maximum(workdir, server):
    # chains-004 stays in English whatever the attempt: the language check rejects it after the retries.
    stubborn = {protect(CHAINS[3].question).text}

    def reply(text: str) -> str:
        return text if text in stubborn else pseudo_french(text)

    server.reply = reply
    translate = settings_for(server, max_chars_per_chunk=10_000).model_dump(mode="json")
    raw = make_params({"chains": ["fr"]}, translate).model_dump(mode="json")
    raw["contracts"]["max_rejected_fraction"]["translate"] = 0.05  # 1 of 30 is within
    params = Params.model_validate(raw)
    ingest(params, "chains")
    records = translate_dataset(params, "chains", langs=["fr"])["fr"]
    assert [record.id for record in records] == [p.id for p in CHAINS if p.id != "chains-004"]
    lines = [json.loads(line) for line in (workdir / "reports/data_quality/rejected/translate/chains/fr.jsonl").open()]
    assert [(line["id"], line["checks"]) for line in lines] == [("chains-004", ["in_target_language"])]
    assert lines[0]["record"]["question"] == CHAINS[3].question
    assert read_records(workdir / "data/translated/chains/fr.jsonl", Problem) == records
    report = json.loads((workdir / "reports/data_quality/translate/chains/fr.json").read_text())
    assert report["success"] and report["rejected"] == 1 and report["checks"]["in_target_language"]["rejected"] == 1
    # Downstream never sees it: normalize takes what translate accepted, and checks against that.
    from budget_alignment.data.normalize import normalize_dataset

    normalized = normalize_dataset(params, "chains", langs=["fr"])["fr"]
    assert [record.id for record in normalized] == [record.id for record in records]


def test_a_record_missing_from_a_human_translation_is_rejected_as_ids_aligned(workdir, tmp_path):
    rows = [json.loads(line) for line in (REPO / "src/budget_alignment/data/bundled/math/ja.jsonl").open()]
    path = tmp_path / "ja.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[1:]), encoding="utf-8")
    raw = make_params().model_dump(mode="json")
    raw["datasets"]["math"]["translation"]["ja"] = {
        "human": {
            "kind": "local",
            "path": str(path),
            "fields": {"id": "id", "question": "question", "answer": "answer"},
        }
    }
    raw["contracts"]["max_rejected_fraction"]["translate"] = 0.1
    params = Params.model_validate(raw)
    ingest(params, "math")
    records = translate_dataset(params, "math", langs=["ja"])["ja"]
    assert len(records) == len(rows) - 1
    (line,) = [json.loads(line) for line in (workdir / "reports/data_quality/rejected/translate/math/ja.jsonl").open()]
    assert line == {"id": rows[0]["id"], "checks": ["ids_aligned"], "record": None}


CHILD = """
import sys
from budget_alignment.data.translate import machine_translate
from budget_alignment.data.translation_backends import OpenAIBackend
from budget_alignment.data.translation_cache import TranslationCache
from budget_alignment.params import MachineTranslationParams
from budget_alignment.records import Problem, read_records
settings = MachineTranslationParams.model_validate_json(sys.argv[1])
english = read_records(sys.argv[2], Problem)
machine_translate(english, "fr", settings, OpenAIBackend(settings), TranslationCache(sys.argv[3]), progress=False)
"""


def test_a_killed_run_resumes_without_asking_again_for_finished_chunks(server, tmp_path):
    english = load_source(BundledSource(name="chains"), "chains", "en")
    write_records(tmp_path / "en.jsonl", english)
    settings = settings_for(server, concurrency=1, max_chars_per_chunk=120)
    cache_path = tmp_path / "cache.sqlite"
    server.block_at = 25
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, settings.model_dump_json(), str(tmp_path / "en.jsonl"), str(cache_path)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert server.blocked.wait(60), "the child never reached the blocking request"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    finished = server.texts()[:24]
    cache = TranslationCache(cache_path)
    assert len(cache) == 24  # every reply before the crash was committed
    server.block_at = None
    server.requests.clear()
    result = machine_translate(english, "fr", settings, OpenAIBackend(settings), cache, progress=False)
    records, stats = result.records, result.stats
    assert stats.cache_hits == 24 and stats.translated == stats.unique_chunks - 24
    assert len(server.requests) == stats.unique_chunks - 24
    assert not set(server.texts()) & set(finished)
    assert len(records) == len(english)


# --- local backends ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_backend_generates_and_its_replies_are_checked(tiny_model_dir, tmp_path):
    settings = MachineTranslationParams(
        backend="transformers", model=str(tiny_model_dir), max_new_tokens=12, batch_size=2, validation_retries=1
    )
    backend = TransformersBackend(settings)
    assert backend.model_id.startswith(f"{tiny_model_dir}@")
    english = [
        Problem(
            id="plain",
            dataset="toy",
            lang="en",
            question="Hello there, my good friend.",
            answer="1",
            answer_type="math",
        ),
        Problem(id="math", dataset="toy", lang="en", question="What is $2+3$ plus 4?", answer="9", answer_type="math"),
    ]
    first = machine_translate(
        english, "fr", settings, backend, TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    # A random model loses the markers: the record is left out, naming why, after a sampled retry.
    assert first.unassembled["math"].startswith("field 'question': the reply lost ⟦0⟧")
    assert first.stats.retried_chunks >= 1
    # Every attempt's reply is in the cache: a second run asks the model for nothing and chooses alike.
    again = machine_translate(
        english, "fr", settings, backend, TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    assert again.stats.translated == 0
    assert again.records == first.records and again.unassembled == first.unassembled


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_translates_offline(tiny_model_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA GPU")
    from budget_alignment.data.translation_backends import VllmBackend

    settings = MachineTranslationParams(backend="vllm", model=str(tiny_model_dir), max_new_tokens=8, dtype="float32")
    backend = VllmBackend(settings)
    english = [
        Problem(id="plain", dataset="toy", lang="en", question="Hello there, friend.", answer="1", answer_type="math")
    ]
    result = machine_translate(
        english, "fr", settings, backend, TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    assert result.stats.translated >= 1 and len(result.records) + len(result.unassembled) == 1
