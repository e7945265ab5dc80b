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
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from budget_alignment.data.sources import load_source
from budget_alignment.data.translate import (
    MARKER_RE,
    MarkerError,
    OpenAIBackend,
    TransformersBackend,
    TranslationCache,
    TranslationError,
    cache_key,
    machine_translate,
    protect,
    restore,
    split_paragraphs,
    translate_dataset,
)
from budget_alignment.params import BundledSource, MachineTranslationParams, Params, load_params
from budget_alignment.records import Problem, read_records, write_records

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

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


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_protection_round_trips_every_math500_problem_and_solution():
    rows = [json.loads(line) for line in (SHARED_DATA / "math500" / "test.jsonl").open(encoding="utf-8")]
    assert len(rows) == 500
    for row in rows:
        for field in ("problem", "solution"):
            protected = protect(row[field])
            assert restore(protected.text, protected.spans) == row[field], row["unique_id"]
            # Nothing protected leaks a marker-like text, and the chunks of the protected text rejoin exactly.
            assert len(MARKER_RE.findall(protected.text)) == len(protected.spans)
            chunks = split_paragraphs(protected.text, 300)
            assert "".join(c + s for c, s in chunks) == protected.text


# --- an OpenAI-compatible server on 127.0.0.1 ----------------------------------------------------------------------

# fmt: off
FRENCH = [
    "le", "la", "les", "un", "une", "de", "du", "et", "est", "dans", "avec", "pour", "sur", "pomme", "chat", "maison",
    "nous", "avons", "trouvé", "très", "bien", "alors", "donc",
]
# fmt: on


def pseudo_french(text: str) -> str:
    """A deterministic stand-in for a translator: every English word becomes a French word, markers stay."""
    return re.sub(r"[A-Za-z]+", lambda m: FRENCH[sum(map(ord, m.group())) % len(FRENCH)], text)


class ChatServer:
    """`/v1/chat/completions` on an ephemeral port; `script` answers the next requests, then `reply` translates."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.script: list[Callable[[dict], tuple[int, object]]] = []
        self.reply: Callable[[str], str] = pseudo_french
        self.block_at: int | None = None  # hang on this request number (1-based), for the crash test
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    number = len(server.requests)
                    action = server.script.pop(0) if server.script else None
                if server.block_at == number:
                    server.blocked.set()
                    server.release.wait(30)
                    return
                status, payload = action(body) if action else (200, None)
                if payload is None:
                    text = server.reply(body["messages"][1]["content"])
                    payload = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def texts(self) -> list[str]:
        return [request["messages"][1]["content"] for request in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


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
        api_key_env="BUDGET_ALIGNMENT_TEST_KEY",
        max_retries=3,
        backoff_s=0.01,
        timeout_s=5.0,
        concurrency=2,
        max_chars_per_chunk=200,
        validation_retries=1,
    )
    return MachineTranslationParams(**{**values, **overrides})


def status(code: int, payload: object = None) -> Callable[[dict], tuple[int, object]]:
    return lambda body: (code, payload if payload is not None else {"error": f"status {code}"})


def sleepy(seconds: float) -> Callable[[dict], tuple[int, object]]:
    def act(body: dict) -> tuple[int, object]:
        time.sleep(seconds)
        return 200, None

    return act


MESSAGES = [{"role": "system", "content": "translate"}, {"role": "user", "content": "Hello ⟦0⟧"}]


def test_retries_on_429_and_5xx(server):
    server.script = [status(429), status(503), status(500)]
    backend = OpenAIBackend(settings_for(server))
    assert backend._complete(MESSAGES) == pseudo_french("Hello ⟦0⟧")
    assert len(server.requests) == 4


def test_gives_up_after_max_retries(server):
    server.script = [status(502)] * 10
    backend = OpenAIBackend(settings_for(server, max_retries=2))
    with pytest.raises(TranslationError, match="HTTP 502 after 3 attempts"):
        backend._complete(MESSAGES)
    assert len(server.requests) == 3


def test_timeouts_are_retried_then_reported(server):
    server.script = [sleepy(1.5)]
    backend = OpenAIBackend(settings_for(server, timeout_s=0.3))
    assert backend._complete(MESSAGES)  # the second attempt answers at once
    server.script = [sleepy(1.5)] * 3
    with pytest.raises(TranslationError, match=r"no reply within 0.3 s after 2 attempts"):
        OpenAIBackend(settings_for(server, timeout_s=0.3, max_retries=1))._complete(MESSAGES)


def test_the_key_comes_from_the_environment_and_is_never_logged_or_stored(server, monkeypatch, tmp_path, caplog):
    secret = "sk-test-0123456789-secret"
    monkeypatch.setenv("BUDGET_ALIGNMENT_TEST_KEY", secret)
    server.script = [status(401, {"error": "bad key"})]
    backend = OpenAIBackend(settings_for(server))
    with caplog.at_level("DEBUG"), pytest.raises(TranslationError, match="HTTP 401") as failure:
        backend._complete(MESSAGES)
    assert len(server.requests) == 1  # a 401 is not retried
    assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    cache = TranslationCache(tmp_path / "cache.sqlite")
    english = [
        Problem(id="q1", dataset="toy", lang="en", question="Hello there, my friend.", answer="1", answer_type="math")
    ]
    machine_translate(english, "fr", settings_for(server), backend, cache, progress=False)
    cache.close()
    assert secret not in str(failure.value) and secret not in caplog.text
    assert secret.encode() not in (tmp_path / "cache.sqlite").read_bytes()
    assert all(secret.encode() not in path.read_bytes() for path in tmp_path.glob("cache.sqlite*"))


def test_a_reply_that_breaks_a_protected_span_is_rejected_and_asked_again(server, tmp_path):
    server.script = [
        lambda body: (200, {"choices": [{"message": {"content": "Le nombre est ⟦0⟧ mais pas ⟦1⟧ ⟦7⟧."}}]})
    ]
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
    settings = settings_for(server, concurrency=1)
    records, stats = machine_translate(
        english, "fr", settings, OpenAIBackend(settings), TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    assert stats.rejected_replies == 1 and stats.translated == 1
    assert len(server.requests) == 2
    retry = server.requests[1]["messages"]
    assert retry[2]["role"] == "assistant" and "invented ⟦7⟧" in retry[3]["content"]
    assert "12" in records[0].question and "3" in records[0].question and "⟦" not in records[0].question


def test_replies_that_keep_breaking_spans_fail_naming_the_record(server, tmp_path):
    server.reply = lambda text: "Je ne sais pas."
    english = [
        Problem(
            id="ok-1", dataset="toy", lang="en", question="Say hello to everyone here.", answer="1", answer_type="math"
        ),
        Problem(id="bad-2", dataset="toy", lang="en", question="Add 2 and 3 now.", answer="5", answer_type="math"),
    ]
    settings = settings_for(server, validation_retries=2)
    with pytest.raises(TranslationError, match=r"record 'bad-2' field 'question': the reply lost ⟦0⟧, ⟦1⟧"):
        machine_translate(english, "fr", settings, OpenAIBackend(settings), TranslationCache(tmp_path / "c.sqlite"))
    assert len(server.requests) == 4  # the good chunk once, the bad one three times


def test_long_chains_are_split_at_paragraphs_and_identical_chunks_asked_once(server, tmp_path):
    english = load_source(BundledSource(name="chains"), "chains", "en")
    settings = settings_for(server, max_chars_per_chunk=120)
    records, stats = machine_translate(
        english, "fr", settings, OpenAIBackend(settings), TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
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


def test_the_cache_key_covers_text_backend_model_prompt_version_and_language():
    base = cache_key("t", "openai", "m", "v1", "fr")
    assert (
        len(
            {
                base,
                *(
                    cache_key(*args)
                    for args in [
                        ("u", "openai", "m", "v1", "fr"),
                        ("t", "vllm", "m", "v1", "fr"),
                        ("t", "openai", "n", "v1", "fr"),
                        ("t", "openai", "m", "v2", "fr"),
                        ("t", "openai", "m", "v1", "es"),
                    ]
                ),
            }
        )
        == 6
    )


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
    from budget_alignment.data.sources import ingest_dataset

    return ingest_dataset(params, dataset)


def test_stage_with_a_human_translation(workdir):
    params = make_params()
    english = ingest(params, "college_math")
    records = translate_dataset(params, "college_math", "ja")
    assert [r.id for r in records] == [e.id for e in english]
    assert [r.answer for r in records] == [e.answer for e in english]
    assert records[0].provenance["translation"]["method"] == "human"
    assert records[0].provenance["translation"]["source"]["set"] == "college_math"
    assert read_records(workdir / "data/translated/college_math/ja.jsonl", Problem) == records
    assert (workdir / "reports/data_quality/translate/college_math-ja.json").is_file()


@pytest.mark.slow
def test_stage_rerun_is_all_cache_hits(workdir, server):
    translate = settings_for(server).model_dump(mode="json")
    params = make_params({"chains": ["fr"]}, translate)
    ingest(params, "chains")
    first = translate_dataset(params, "chains", "fr")
    asked = len(server.requests)
    assert asked > 30
    output = workdir / "data/translated/chains/fr.jsonl"
    before = output.read_bytes()
    again = translate_dataset(params, "chains", "fr")
    assert len(server.requests) == asked  # nothing asked again
    assert again == first and output.read_bytes() == before
    report = json.loads((workdir / "reports/data_quality/translate/chains-fr.json").read_text())
    assert report["success"] and report["checks"]["protected_spans_restored"]["success"]


def test_a_translation_that_merges_protected_numbers_fails_the_contract(workdir, server):
    from budget_alignment.data.contracts import ContractViolation

    # Every marker kept once, but two numbers written side by side read as one: "12" and "5" become "125".
    def merge_markers(text: str) -> str:
        markers = MARKER_RE.findall(text)
        return pseudo_french(MARKER_RE.sub("", text)) + " " + "".join(f"⟦{m}⟧" for m in markers)

    server.reply = merge_markers
    translate = settings_for(server).model_dump(mode="json")
    params = make_params({"chains": ["es"]}, translate)
    ingest(params, "chains")
    with pytest.raises(ContractViolation) as caught:
        translate_dataset(params, "chains", "es")
    assert "protected_spans_restored" in caught.value.failed_checks
    assert not (workdir / "data/translated/chains/es.jsonl").exists()


CHILD = """
import sys
from budget_alignment.data.translate import OpenAIBackend, TranslationCache, machine_translate
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
    records, stats = machine_translate(english, "fr", settings, OpenAIBackend(settings), cache, progress=False)
    assert stats.cache_hits == 24 and stats.translated == stats.unique_chunks - 24
    assert len(server.requests) == stats.unique_chunks - 24
    assert not set(server.texts()) & set(finished)
    assert len(records) == len(english)


# --- local backends ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with a byte-level BPE tokenizer and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["Translate the text into French. Keep every marker ⟦0⟧ ⟦1⟧."] * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_transformers_backend_generates_and_its_replies_are_checked(tiny_chat_model, tmp_path):
    settings = MachineTranslationParams(
        backend="transformers", model=str(tiny_chat_model), max_new_tokens=12, batch_size=2, validation_retries=1
    )
    backend = TransformersBackend(settings)
    assert backend.model_id.startswith(f"{tiny_chat_model}@")
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
    with pytest.raises(TranslationError, match=r"record 'math' field 'question': the reply lost ⟦0⟧"):
        machine_translate(english, "fr", settings, backend, TranslationCache(tmp_path / "c.sqlite"), progress=False)
    # Greedy decoding: the same prompt gives the same reply, which the cache kept for the plain record.
    cache = TranslationCache(tmp_path / "c.sqlite")
    key = cache_key("Hello there, my good friend.", "transformers", backend.model_id, "v1", "fr")
    cached = cache.get_many([key])[key]
    records, stats = machine_translate(english[:1], "fr", settings, backend, cache, progress=False)
    assert stats.cache_hits == 1 and records[0].question == cached


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_translates_offline(tiny_chat_model, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA GPU")
    from budget_alignment.data.translate import VllmBackend

    settings = MachineTranslationParams(backend="vllm", model=str(tiny_chat_model), max_new_tokens=8, dtype="float32")
    backend = VllmBackend(settings)
    english = [
        Problem(id="plain", dataset="toy", lang="en", question="Hello there, friend.", answer="1", answer_type="math")
    ]
    records, stats = machine_translate(
        english, "fr", settings, backend, TranslationCache(tmp_path / "c.sqlite"), progress=False
    )
    assert stats.translated == 1 and isinstance(records[0].question, str)
