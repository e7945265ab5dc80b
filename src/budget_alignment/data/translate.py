"""Stage `translate@{dataset}-{lang}`: English records into one target language.

Per (dataset, language) params name either an existing human translation (a source, aligned to the English records
by id or by position; the gold answer comes from English) or machine translation with one of three backends: an
OpenAI-compatible chat endpoint (httpx), vLLM offline batches (GPU), or a local transformers chat model.

Machine translation never sees what must not change. `protect` replaces LaTeX math, `\\boxed{...}` and other LaTeX
commands, code, numbers and choice letters by markers `⟦0⟧, ⟦1⟧, ...`; a reply must hold each marker exactly once,
else it is rejected and asked again (then the stage fails naming the record). Long texts are cut at paragraph
boundaries into chunks of at most `max_chars_per_chunk`. Each chunk's translation is stored in a content-addressed
sqlite cache (sha256 of the chunk, backend, model, prompt version and language), committed one chunk at a time, so a
rerun, or a run resumed after a crash, asks only for what is not there yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from budget_alignment import loading, paths
from budget_alignment.fingerprints import tree_digest
from budget_alignment.languages import language_name
from budget_alignment.params import MachineTranslationParams, Params, TranslationParams
from budget_alignment.records import Problem, RecordError, read_records, write_records

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


class TranslationError(RuntimeError):
    """A translation that cannot be made: backend failure, or replies that keep breaking protected spans."""


# --- protection ----------------------------------------------------------------------------------------------------

MARKER = "⟦{}⟧"
MARKER_RE = re.compile(r"⟦(\d+)⟧")
_MARKER_BRACKETS = re.compile(r"[⟦⟧]")

# Tried in this order at every position; the first that matches is one protected span.
_SPAN_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("code block", re.compile(r"```.*?(?:```|\Z)", re.DOTALL)),
    ("inline code", re.compile(r"`[^`\n]+`")),
    ("asymptote figure", re.compile(r"\[asy\].*?(?:\[/asy\]|\Z)", re.DOTALL)),
    ("display math", re.compile(r"\$\$.+?\$\$", re.DOTALL)),
    ("display math", re.compile(r"\\\[.+?\\\]", re.DOTALL)),
    ("inline math", re.compile(r"\\\(.+?\\\)", re.DOTALL)),
    ("inline math", re.compile(r"(?<!\\)\$(?:[^$\\]|\\.)+?(?<!\\)\$", re.DOTALL)),
    ("escaped character", re.compile(r"\\[^A-Za-z\s]")),
    ("number", re.compile(r"\d+(?:[.,]\d+)*")),
    ("choice letter", re.compile(r"\([A-J]\)")),
    ("choice letter", re.compile(r"(?m)^[ \t]*[A-J][.)](?=\s)")),
]
_COMMAND = re.compile(r"\\[A-Za-z]+\*?")
_ENV_BEGIN = re.compile(r"\\begin\{([^{}]+)\}")


def _balanced_group_end(text: str, start: int, open_char: str = "{", close_char: str = "}") -> int | None:
    """Index after the group that opens at `start`, or None if it never closes."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == open_char:
            depth += 1
        elif char == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _latex_span_end(text: str, start: int) -> int | None:
    """End of a LaTeX environment or command (with its brace and bracket arguments) starting at `start`."""
    begin = _ENV_BEGIN.match(text, start)
    if begin:
        name = re.escape(begin.group(1))
        depth, position = 0, start
        for tag in re.finditer(rf"\\(begin|end)\{{{name}\}}", text[start:]):
            depth += 1 if tag.group(1) == "begin" else -1
            position = start + tag.end()
            if depth == 0:
                return position
        return None
    command = _COMMAND.match(text, start)
    if not command:
        return None
    end = command.end()
    while end < len(text) and text[end] in "{[":
        close = _balanced_group_end(text, end, text[end], "}" if text[end] == "{" else "]")
        if close is None:
            break
        end = close
    return end


def protected_spans(text: str, *, merge: bool = True) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) of everything translation must leave alone; adjacent spans merged (one marker
    for `\\$` and the number after it) unless `merge` is False."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(text):
        end = None
        if text[i] == "\\":
            end = _latex_span_end(text, i)
        if end is None and text[i] in "`[$\\0123456789(ABCDEFGHIJ \t":
            for _, pattern in _SPAN_PATTERNS:
                match = pattern.match(text, i)
                if match and match.end() > i:
                    end = match.end()
                    break
        if end is None:
            i += 1
            continue
        # A line-start choice letter pattern may have matched leading blanks: keep them translatable text.
        start = i + len(text[i:end]) - len(text[i:end].lstrip(" \t"))
        if merge and spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
        i = end
    return spans


@dataclass(frozen=True)
class Protected:
    """Text with markers `⟦i⟧` in place of its protected spans (numbered in order of appearance)."""

    text: str
    spans: tuple[str, ...]


def protect(text: str) -> Protected:
    pieces, spans, last = [], [], 0
    for start, end in protected_spans(text):
        pieces.append(text[last:start])
        pieces.append(MARKER.format(len(spans)))
        spans.append(text[start:end])
        last = end
    pieces.append(text[last:])
    return Protected("".join(pieces), tuple(spans))


class MarkerError(ValueError):
    """A reply that lost, duplicated, invented or damaged a marker."""


def check_markers(reply: str, count: int) -> None:
    found = Counter(int(number) for number in MARKER_RE.findall(reply))
    problems = []
    missing = [i for i in range(count) if found[i] == 0]
    if missing:
        problems.append("lost " + ", ".join(MARKER.format(i) for i in missing))
    repeated = sorted(i for i, n in found.items() if n > 1 and i < count)
    if repeated:
        problems.append("repeated " + ", ".join(MARKER.format(i) for i in repeated))
    invented = sorted(i for i in found if i >= count)
    if invented:
        problems.append("invented " + ", ".join(MARKER.format(i) for i in invented))
    if _MARKER_BRACKETS.search(MARKER_RE.sub("", reply)):
        problems.append("damaged a marker (a stray ⟦ or ⟧)")
    if problems:
        raise MarkerError("; ".join(problems))


def restore(reply: str, spans: Sequence[str]) -> str:
    """Put the protected spans back; raises MarkerError if the reply did not keep every marker exactly once."""
    check_markers(reply, len(spans))
    return MARKER_RE.sub(lambda m: spans[int(m.group(1))], reply)


def renumber(text: str, spans: Sequence[str]) -> Protected:
    """A chunk of a protected text as a Protected of its own, its markers numbered from 0."""
    local: list[str] = []

    def replace(match: re.Match[str]) -> str:
        local.append(spans[int(match.group(1))])
        return MARKER.format(len(local) - 1)

    return Protected(MARKER_RE.sub(replace, text), tuple(local))


_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n\s*)")


def split_paragraphs(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(chunk, separator after it) pairs, cut only at blank lines, each chunk at most `max_chars` if possible.

    A single paragraph longer than `max_chars` stays whole: cutting inside it would cut a sentence.
    """
    parts = _PARAGRAPH_BREAK.split(text)
    paragraphs, separators = parts[0::2], [*parts[1::2], ""]
    chunks: list[tuple[str, str]] = []
    current: tuple[str, str] | None = None
    for paragraph, separator in zip(paragraphs, separators, strict=True):
        if (
            current is not None
            and current[0].strip()
            and len(current[0]) + len(current[1]) + len(paragraph) > max_chars
        ):
            chunks.append(current)
            current = None
        current = (paragraph, separator) if current is None else (current[0] + current[1] + paragraph, separator)
    assert current is not None
    chunks.append(current)
    return chunks


_LETTER = re.compile(r"[^\W\d_]")


def needs_translation(protected_text: str) -> bool:
    """False for a chunk that is only markers, digits, punctuation and blanks: it reads the same in any language."""
    return bool(_LETTER.search(MARKER_RE.sub("", protected_text)))


# --- prompts -------------------------------------------------------------------------------------------------------

PROMPTS = {
    "v1": (
        "You are a professional translator of mathematics and science texts. Translate the user's text from English "
        "into {language}. The text contains markers such as ⟦0⟧ and ⟦1⟧ that stand for formulas, numbers and code: "
        "keep every marker exactly as written, each exactly once, placed where {language} grammar puts it; never "
        "translate, add, remove or renumber a marker. Keep the paragraphs and line breaks. Write natural, careful "
        "{language}. Reply with the translation only, without notes, quotes or explanations."
    ),
}


def build_messages(
    text: str, lang: str, prompt_version: str, rejected: tuple[str, str] | None = None
) -> list[dict[str, str]]:
    """The chat for one chunk; after a rejected reply, that reply and the reason follow, asking again."""
    try:
        system = PROMPTS[prompt_version].format(language=language_name(lang))
    except KeyError:
        raise TranslationError(f"prompt_version {prompt_version!r} is unknown (known: {', '.join(PROMPTS)})") from None
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    if rejected is not None:
        reply, reason = rejected
        markers = ", ".join(MARKER.format(i) for i in range(len(MARKER_RE.findall(text))))
        messages += [
            {"role": "assistant", "content": reply},
            {
                "role": "user",
                "content": f"That translation {reason}. Translate the text again; it must contain each of these "
                f"markers exactly once: {markers}.",
            },
        ]
    return messages


_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def clean_reply(reply: str) -> str:
    """Drop a reasoning model's <think> block; the translation is what follows."""
    return _THINK.sub("", reply).strip()


# --- cache ---------------------------------------------------------------------------------------------------------


def cache_key(text: str, backend: str, model: str, prompt_version: str, lang: str) -> str:
    payload = json.dumps([text, backend, model, prompt_version, lang], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class TranslationCache:
    """Content-addressed translations of protected chunks in sqlite; every insert is committed (crash-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Several DVC stages (or `dvc exp run --queue` workers) may share the cache: wait for their writes.
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, translation TEXT NOT NULL, "
            "source TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL, "
            "lang TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._db.commit()
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> TranslationCache:
        return cls(paths.cache_dir() / "translations" / "cache.sqlite")

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                batch = unique[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = self._db.execute(f"SELECT key, translation FROM translations WHERE key IN ({marks})", batch)
                found.update(rows.fetchall())
        return found

    def put(
        self, key: str, translation: str, *, source: str, backend: str, model: str, prompt_version: str, lang: str
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, translation, source, backend, model, prompt_version, lang, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()


# --- backends ------------------------------------------------------------------------------------------------------


@dataclass
class ChunkRequest:
    key: str
    text: str
    messages: list[dict[str, str]]


class TranslationBackend(Protocol):
    name: str
    model_id: str

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        """Replies as they come (not necessarily in order), so each can be cached at once."""
        ...

    def close(self) -> None: ...


BACKENDS: dict[str, type] = {}


def backend(name: str):
    def register(cls: type) -> type:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return register


def make_backend(settings: MachineTranslationParams, trust_remote_code: bool = False) -> TranslationBackend:
    try:
        cls = BACKENDS[settings.backend]
    except KeyError:
        raise TranslationError(
            f"translate.backend {settings.backend!r} is unknown (known: {', '.join(BACKENDS)})"
        ) from None
    return cls(settings, trust_remote_code=trust_remote_code)


@backend("openai")
class OpenAIBackend:
    """An OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM's server, llama.cpp, ...)."""

    name: ClassVar[str]
    RETRY_STATUS = frozenset({408, 409, 425, 429})
    MAX_WAIT_S = 60.0

    def __init__(self, settings: MachineTranslationParams, trust_remote_code: bool = False) -> None:
        del trust_remote_code  # a remote service runs no model code here
        import httpx

        if not settings.base_url:
            raise TranslationError("translate.base_url is required by the openai backend")
        if not settings.model:
            raise TranslationError("translate.model is required by the openai backend")
        self.settings = settings
        self.model_id = settings.model
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        else:
            log.info("$%s is not set: requests go without an Authorization header", settings.api_key_env)
        # httpx logs every request at INFO; the URL is harmless but thousands of lines are not.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._client = httpx.Client(
            base_url=settings.base_url.rstrip("/") + "/", headers=headers, timeout=settings.timeout_s
        )
        self._httpx = httpx

    def _complete(self, messages: list[dict[str, str]]) -> str:
        payload = {"model": self.settings.model, "messages": messages, "temperature": self.settings.temperature}
        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            wait_s = min(self.MAX_WAIT_S, self.settings.backoff_s * 2**attempt)
            try:
                response = self._client.post("chat/completions", json=payload)
            except self._httpx.TimeoutException:
                reason = f"no reply within {self.settings.timeout_s:g} s"
            except self._httpx.TransportError as error:
                reason = f"connection failed ({type(error).__name__})"
            else:
                if response.status_code == 200:
                    return self._content(response)
                reason = f"HTTP {response.status_code}"
                if response.status_code not in self.RETRY_STATUS and response.status_code < 500:
                    raise TranslationError(
                        f"{self.settings.base_url} answered {reason}: {response.text[:300]}"
                    ) from None
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait_s = min(self.MAX_WAIT_S, float(retry_after))
            if attempt + 1 < attempts:
                log.warning(
                    "%s: %s; retrying in %.1f s (%d/%d)",
                    self.settings.base_url,
                    reason,
                    wait_s,
                    attempt + 1,
                    attempts - 1,
                )
                time.sleep(wait_s)
        raise TranslationError(f"{self.settings.base_url}: {reason} after {attempts} attempts")

    def _content(self, response: Any) -> str:
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise TranslationError(f"{self.settings.base_url}: not a chat completion: {response.text[:300]}") from None

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        executor = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="translate")
        waiting = iter(requests)
        running: dict[Future[str], ChunkRequest] = {}
        try:
            # Keep at most `concurrency` requests in flight, so a crash loses at most that many replies.
            for request in waiting:
                running[executor.submit(self._complete, request.messages)] = request
                if len(running) >= self.settings.concurrency:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    request = running.pop(future)
                    yield request, future.result()
                    following = next(waiting, None)
                    if following is not None:
                        running[executor.submit(self._complete, following.messages)] = following
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._client.close()


def local_model_id(model: str) -> str:
    """A local folder's identity for the cache: its path and a fingerprint of its files (not just the name)."""
    if not Path(model).is_dir():
        return model
    return f"{model}@{tree_digest(model, contents=True)[:16]}"


@backend("vllm")
class VllmBackend:
    """vLLM offline batches on the GPU (`pip install -e '.[vllm]'`)."""

    name: ClassVar[str]

    def __init__(self, settings: MachineTranslationParams, trust_remote_code: bool = False) -> None:
        if not settings.model:
            raise TranslationError("translate.model is required by the vllm backend")
        self.settings = settings
        self.model_id = local_model_id(settings.model)
        self.trust_remote_code = trust_remote_code
        self._llm: Any = None

    def _engine(self) -> Any:
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise TranslationError("the vllm backend needs vllm: pip install -e '.[vllm]'") from None
            loading.require_safetensors(self.settings.model)
            self._llm = LLM(
                model=self.settings.model, dtype=self.settings.dtype, seed=0, trust_remote_code=self.trust_remote_code
            )
        return self._llm

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        from vllm import SamplingParams

        engine = self._engine()
        sampling = SamplingParams(
            temperature=self.settings.temperature, max_tokens=self.settings.max_new_tokens, seed=0
        )
        for start in range(0, len(requests), self.settings.batch_size):
            batch = requests[start : start + self.settings.batch_size]
            outputs = engine.chat([request.messages for request in batch], sampling, use_tqdm=False)
            for request, output in zip(batch, outputs, strict=True):
                yield request, output.outputs[0].text

    def close(self) -> None:
        self._llm = None


@backend("transformers")
class TransformersBackend:
    """A local chat model folder (e.g. data/models/base) with transformers, greedy unless temperature > 0."""

    name: ClassVar[str]

    def __init__(self, settings: MachineTranslationParams, trust_remote_code: bool = False) -> None:
        if not settings.model:
            raise TranslationError("translate.model is required by the transformers backend")
        self.settings = settings
        self.model_id = local_model_id(settings.model)
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        import torch

        tokenizer = loading.load_tokenizer(self.settings.model, trust_remote_code=self.trust_remote_code)
        tokenizer.padding_side = "left"  # decoder-only batches grow to the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = "auto" if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        model = loading.load_causal_lm(self.settings.model, dtype, trust_remote_code=self.trust_remote_code)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self._model, self._tokenizer = model, tokenizer

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        import torch

        if self._model is None:
            self._load()
        tokenizer, model = self._tokenizer, self._model
        sampling = self.settings.temperature > 0
        for start in range(0, len(requests), self.settings.batch_size):
            batch = requests[start : start + self.settings.batch_size]
            prompts = [
                tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
                for request in batch
            ]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=self.settings.max_new_tokens,
                    do_sample=sampling,
                    temperature=self.settings.temperature if sampling else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for request, tokens in zip(batch, new_tokens, strict=True):
                yield request, tokenizer.decode(tokens, skip_special_tokens=True)

    def close(self) -> None:
        self._model = self._tokenizer = None


# --- machine translation of records --------------------------------------------------------------------------------


@dataclass
class _Piece:
    """One chunk of one field: translated through the cache (`key`) or kept as it is (`key` None)."""

    protected: Protected
    lead: str
    trail: str
    separator: str
    key: str | None


@dataclass
class _Field:
    record: int
    name: str  # question, solution, choices.A, ...
    pieces: list[_Piece] = field(default_factory=list)


@dataclass
class TranslationStats:
    records: int = 0
    chunks: int = 0
    unchanged_chunks: int = 0
    unique_chunks: int = 0
    cache_hits: int = 0
    translated: int = 0
    rejected_replies: int = 0

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = dict(vars(self))
        metrics["cache_hit_rate"] = self.cache_hits / self.unique_chunks if self.unique_chunks else 1.0
        return metrics


def _fields_of(problem: Problem) -> list[tuple[str, str]]:
    fields = [("question", problem.question)]
    fields += [(f"choices.{letter}", text) for letter, text in (problem.choices or {}).items()]
    if problem.solution:
        fields.append(("solution", problem.solution))
    return fields


def _split_field(text: str, max_chars: int, keyer) -> list[_Piece]:
    protected = protect(text)
    pieces = []
    for chunk, separator in split_paragraphs(protected.text, max_chars):
        body = chunk.strip()
        lead = chunk[: len(chunk) - len(chunk.lstrip())]
        trail = chunk[len(lead) + len(body) :]
        local = renumber(body, protected.spans)
        key = keyer(local.text) if needs_translation(local.text) else None
        pieces.append(_Piece(local, lead, trail, separator, key))
    return pieces


def machine_translate(
    english: Sequence[Problem],
    lang: str,
    settings: MachineTranslationParams,
    translator: TranslationBackend,
    cache: TranslationCache,
    *,
    progress: bool | None = None,
) -> tuple[list[Problem], TranslationStats]:
    """Translate every record's question, choice texts and solution; the answer stays the English one."""
    from tqdm.auto import tqdm

    stats = TranslationStats(records=len(english))

    def keyer(text: str) -> str:
        return cache_key(text, translator.name, translator.model_id, settings.prompt_version, lang)

    fields = []
    for index, problem in enumerate(english):
        for name, text in _fields_of(problem):
            fields.append(_Field(index, name, _split_field(text, settings.max_chars_per_chunk, keyer)))
    pieces_by_key: dict[str, _Piece] = {}
    users: dict[str, list[_Field]] = {}
    for item in fields:
        for piece in item.pieces:
            stats.chunks += 1
            if piece.key is None:
                stats.unchanged_chunks += 1
                continue
            pieces_by_key.setdefault(piece.key, piece)
            users.setdefault(piece.key, []).append(item)
    stats.unique_chunks = len(pieces_by_key)
    done = cache.get_many(list(pieces_by_key))
    stats.cache_hits = len(done)
    pending = [key for key in pieces_by_key if key not in done]
    log.info(
        "translate to %s: %d records, %d chunks (%d unique), %d from the cache, %d to translate with %s %s",
        lang,
        len(english),
        stats.chunks,
        stats.unique_chunks,
        stats.cache_hits,
        len(pending),
        translator.name,
        translator.model_id,
    )
    rejected: dict[str, tuple[str, str]] = {}
    with tqdm(
        total=len(pending), desc=f"translate {lang}", unit="chunk", disable=None if progress is None else not progress
    ) as bar:
        for _ in range(settings.validation_retries + 1):
            if not pending:
                break
            requests = [
                ChunkRequest(
                    key,
                    pieces_by_key[key].protected.text,
                    build_messages(
                        pieces_by_key[key].protected.text, lang, settings.prompt_version, rejected.get(key)
                    ),
                )
                for key in pending
            ]
            failed = []
            try:
                for request, reply in translator.translate(requests):
                    reply = clean_reply(reply)
                    piece = pieces_by_key[request.key]
                    try:
                        if not reply:
                            raise MarkerError("came back empty")
                        check_markers(reply, len(piece.protected.spans))
                    except MarkerError as error:
                        stats.rejected_replies += 1
                        rejected[request.key] = (reply, str(error))
                        failed.append(request.key)
                        continue
                    cache.put(
                        request.key,
                        reply,
                        source=piece.protected.text,
                        backend=translator.name,
                        model=translator.model_id,
                        prompt_version=settings.prompt_version,
                        lang=lang,
                    )
                    done[request.key] = reply
                    stats.translated += 1
                    bar.update(1)
            except TranslationError as error:
                first = users[requests[0].key][0]
                raise TranslationError(
                    f"translating to {lang} (first pending: record {english[first.record].id!r}, field "
                    f"{first.name!r}): {error}"
                ) from None
            pending = failed
    if pending:
        lines = []
        for key in pending[:5]:
            item = users[key][0]
            lines.append(f"record {english[item.record].id!r} field {item.name!r}: the reply {rejected[key][1]}")
        raise TranslationError(
            f"{len(pending)} chunk(s) kept breaking protected spans after {settings.validation_retries + 1} "
            "attempts:\n  " + "\n  ".join(lines)
        )
    translated_fields: dict[tuple[int, str], str] = {}
    for item in fields:
        parts = []
        for piece in item.pieces:
            try:
                body = restore(done[piece.key] if piece.key else piece.protected.text, piece.protected.spans)
            except MarkerError as error:  # only a damaged cache entry can get here: its replies were checked
                raise TranslationError(
                    f"record {english[item.record].id!r} field {item.name!r}: cached translation {error}; "
                    f"delete {cache.path} to translate again"
                ) from None
            parts.append(piece.lead + body + piece.trail + piece.separator)
        translated_fields[(item.record, item.name)] = "".join(parts)
    provenance = {
        "method": "machine",
        "backend": translator.name,
        "model": translator.model_id,
        "prompt_version": settings.prompt_version,
    }
    records = []
    for index, problem in enumerate(english):
        choices = None
        if problem.choices:
            choices = {letter: translated_fields[(index, f"choices.{letter}")] for letter in problem.choices}
        records.append(
            problem.model_copy(
                update={
                    "lang": lang,
                    "question": translated_fields[(index, "question")],
                    "choices": choices,
                    "solution": translated_fields.get((index, "solution"), problem.solution),
                    "provenance": {**problem.provenance, "translation": provenance},
                }
            )
        )
    return records, stats


# --- human translations --------------------------------------------------------------------------------------------


def human_translation(english: Sequence[Problem], entry: TranslationParams, dataset: str, lang: str) -> list[Problem]:
    """An existing translation aligned to the English records; the gold answer and its type come from English.

    The translation's own answer is kept in the provenance (`source_answer`): the contract checks it matches.
    Records the translation lacks are left out (the contract then reports the misalignment).
    """
    from budget_alignment.data.sources import SourceError, check_unique_ids, load_source

    assert entry.human is not None
    translated = load_source(entry.human, dataset, lang)
    if entry.align_by == "position":
        pairs = list(zip(english, translated, strict=False))
    else:
        check_unique_ids(translated, f"the {lang} translation of {dataset}")
        by_id = {problem.id: problem for problem in translated}
        pairs = [(original, by_id[original.id]) for original in english if original.id in by_id]
    records = []
    for original, version in pairs:
        if original.answer_type == "choice" and not version.choices:
            raise SourceError(f"{lang} translation of {dataset}: record {original.id!r}, field 'choices': missing")
        source_provenance = {k: v for k, v in version.provenance.items() if k != "row"}
        records.append(
            Problem(
                id=original.id,
                dataset=dataset,
                lang=lang,
                question=version.question,
                answer=original.answer,
                answer_type=original.answer_type,
                choices=version.choices if original.answer_type == "choice" else None,
                solution=version.solution,
                provenance={
                    **original.provenance,
                    "translation": {
                        "method": "human",
                        "source": source_provenance,
                        "source_id": version.id,
                        "source_answer": version.answer,
                    },
                },
            )
        )
    return records


# --- the stage -----------------------------------------------------------------------------------------------------


def translate_dataset(
    params: Params,
    dataset: str,
    lang: str,
    run: StageRun | None = None,
    *,
    translator: TranslationBackend | None = None,
    cache: TranslationCache | None = None,
) -> list[Problem]:
    """Stage `translate@{dataset}-{lang}`: validated translated records to `paths.translated(dataset, lang)`."""
    from budget_alignment.data import contracts

    if dataset not in params.datasets:
        raise TranslationError(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    entry = params.datasets[dataset].translation.get(lang)
    if entry is None:
        raise TranslationError(f"datasets.{dataset}.translation has no entry for {lang!r}")
    source = paths.ingested(dataset)
    try:
        english = read_records(source, Problem)
    except FileNotFoundError:
        raise TranslationError(f"{source} does not exist: run `budget-align ingest {dataset}` first") from None
    except RecordError as error:
        raise TranslationError(str(error)) from None
    stage = f"translate@{dataset}-{lang}"
    if entry.human is not None:
        records = human_translation(english, entry, dataset, lang)
        log.info("%s: %d records from the human translation", stage, len(records))
        metrics: dict[str, float] = {"records": len(records), "human": 1}
    else:
        own_translator = translator is None
        translator = translator or make_backend(
            params.translate, loading.trusts_remote_code(params, params.translate.model)
        )
        own_cache = cache is None
        cache = cache or TranslationCache.default()
        try:
            records, stats = machine_translate(english, lang, params.translate, translator, cache)
        finally:
            if own_translator:
                translator.close()
            if own_cache:
                cache.close()
        metrics = {**stats.metrics(), "human": 0}
        log.info(
            "%s: %d chunks, %d cache hits (%.0f%%), %d translated, %d replies rejected",
            stage,
            stats.unique_chunks,
            stats.cache_hits,
            100 * metrics["cache_hit_rate"],
            stats.translated,
            stats.rejected_replies,
        )
    contracts.check_translated(records, english, lang=lang, entry=entry, stage=stage, run=run)
    output = paths.translated(dataset, lang)
    write_records(output, records)
    if run is not None:
        run.add_output(output)
        run.log_metrics(metrics)
    return records
