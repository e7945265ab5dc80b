"""Machine translation backends: who turns one protected chunk into its translation.

Three backends, found by name in `BACKENDS` (`translate.backend`):

- `openai`: any OpenAI-compatible `/chat/completions` endpoint (a hosted API, or a local `vllm serve`), through the
  OpenAI SDK with its own retries (429, 5xx, timeouts, lost connections) and timeout. The key is read from the
  environment variable `translate.api_key_env` names (null: a server without a key); it never enters params, logs,
  caches or outputs, and every error that leaves this module is one line naming the endpoint and the cause.
- `vllm`: offline batches on the GPU, a hub id at a pinned `revision` or a local folder.
- `transformers`: a local chat model (or a hub id at a pinned `revision`) on the CPU or a GPU.

Every backend takes `ChunkRequest`s (the chat messages, a temperature and a seed) and yields replies as they come,
so that each can be cached at once.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, ClassVar, Protocol

from budget_alignment import loading
from budget_alignment.errors import StageError
from budget_alignment.fingerprints import tree_digest
from budget_alignment.hub import warn_if_unpinned
from budget_alignment.languages import language_name
from budget_alignment.params import MachineTranslationParams, Params

log = logging.getLogger(__name__)


class TranslationError(StageError, RuntimeError):
    """A translation that cannot be made: a misconfigured or failing backend. The message is one line."""


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


def build_messages(text: str, lang: str, prompt_version: str) -> list[dict[str, str]]:
    """The chat that asks for one chunk's translation."""
    try:
        system = PROMPTS[prompt_version].format(language=language_name(lang))
    except KeyError:
        raise TranslationError(f"prompt_version {prompt_version!r} is unknown (known: {', '.join(PROMPTS)})") from None
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def clean_reply(reply: str) -> str:
    """Drop a reasoning model's <think> block; the translation is what follows."""
    return _THINK.sub("", reply).strip()


# --- the protocol and the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRequest:
    key: str
    text: str
    messages: list[dict[str, str]]
    temperature: float
    # None: the backend's default; retries ask with a new seed each.
    seed: int | None = None


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


def require_api_key(settings: MachineTranslationParams) -> str | None:
    """The API key of the openai backend, from the variable `api_key_env` names; None where no key is used.

    Called before any work (reading data, loading a model), so a missing key costs nothing.
    """
    if settings.backend != "openai" or settings.api_key_env is None:
        return None
    key = os.environ.get(settings.api_key_env, "")
    if not key.strip():
        raise TranslationError(
            f"${settings.api_key_env} is not set: the openai backend needs the API key of {settings.base_url} "
            "in it (translate.api_key_env; null for a server that takes no key)"
        )
    return key.strip()


def check_api_keys(params: Params, dataset: str, langs: Sequence[str] | None = None) -> None:
    """Every key the machine translations of `dataset` (or of its `langs`) need is in the environment."""
    entries = params.datasets[dataset].translation
    for lang in langs or list(entries):
        machine = entries[lang].machine
        if machine is not None:
            require_api_key(machine)


# --- an OpenAI-compatible endpoint ---------------------------------------------------------------------------------


@backend("openai")
class OpenAIBackend:
    """An OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM's server, llama.cpp, ...)."""

    name: ClassVar[str]

    def __init__(self, settings: MachineTranslationParams, trust_remote_code: bool = False) -> None:
        del trust_remote_code  # a remote service runs no model code here
        import openai

        if not settings.base_url:
            raise TranslationError("translate.base_url is required by the openai backend")
        if not settings.model:
            raise TranslationError("translate.model is required by the openai backend")
        self.settings = settings
        self.model_id = settings.model
        self._key = require_api_key(settings)
        # The SDK insists on a key; without one it gets a placeholder and each request omits the header.
        self._headers = None if self._key else {"Authorization": openai.omit}
        self._client = openai.OpenAI(
            base_url=settings.base_url,
            api_key=self._key or "no-key",
            max_retries=settings.max_retries,
            timeout=settings.timeout_s,
        )
        self._openai = openai
        # httpx logs every request at INFO: harmless, but thousands of lines are not.
        for name in ("httpx", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def _complete(self, request: ChunkRequest) -> str:
        openai = self._openai
        try:
            response = self._client.chat.completions.create(
                model=self.settings.model,
                messages=request.messages,  # type: ignore[arg-type]
                temperature=request.temperature,
                seed=openai.omit if request.seed is None else request.seed,
                extra_headers=self._headers,
            )
        except openai.APIError as error:
            raise TranslationError(self._describe(error)) from None
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError):
            content = None
        if not isinstance(content, str):
            raise TranslationError(
                f"{self.settings.base_url}: the reply is not a chat completion (no message content)"
            )
        return content

    def _describe(self, error: Exception) -> str:
        """One line: the endpoint and the cause, never the key."""
        openai = self._openai
        url = self.settings.base_url
        attempts = f"after {self.settings.max_retries + 1} attempt(s)"
        if isinstance(error, openai.APITimeoutError):
            message = f"{url}: no reply within {self.settings.timeout_s:g} s {attempts}"
        elif isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error.__context__
            reason = str(cause) if cause is not None and str(cause) else "the connection failed"
            message = f"{url}: cannot connect ({reason}) {attempts}"
        elif isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            given = (
                f"the key in ${self.settings.api_key_env}" if self._key else "no key (translate.api_key_env is null)"
            )
            message = f"{url} refused {given}: HTTP {error.status_code}"
        elif isinstance(error, openai.RateLimitError):
            message = f"{url}: HTTP 429 (rate limited) {attempts}"
        elif isinstance(error, openai.InternalServerError):
            message = f"{url}: HTTP {error.status_code} (server error) {attempts}"
        elif isinstance(error, openai.APIStatusError):
            message = f"{url}: HTTP {error.status_code}: {error.message}"
        elif isinstance(error, openai.APIResponseValidationError):
            message = f"{url}: the reply is not a chat completion"
        else:
            message = f"{url}: {type(error).__name__}: {error}"
        return self._scrub(message)

    def _scrub(self, message: str) -> str:
        if self._key:
            message = message.replace(self._key, "***")
        message = " ".join(message.split())
        return message if len(message) <= 400 else message[:397] + "..."

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        executor = ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="translate")
        waiting = iter(requests)
        running: dict[Future[str], ChunkRequest] = {}
        try:
            # Keep at most `concurrency` requests in flight, so a crash loses at most that many replies.
            for request in waiting:
                running[executor.submit(self._complete, request)] = request
                if len(running) >= self.settings.concurrency:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    request = running.pop(future)
                    yield request, future.result()
                    following = next(waiting, None)
                    if following is not None:
                        running[executor.submit(self._complete, following)] = following
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self._client.close()


# --- local models --------------------------------------------------------------------------------------------------


def is_local_model(settings: MachineTranslationParams) -> bool:
    return Path(settings.model).is_dir()


def local_model_id(settings: MachineTranslationParams) -> str:
    """The model's identity for the cache: a folder by its path and its files, a hub id by its revision."""
    if is_local_model(settings):
        return f"{settings.model}@{tree_digest(settings.model, contents=True)[:16]}"
    return f"{settings.model}@{settings.revision}" if settings.revision else settings.model


def _batches(requests: Sequence[ChunkRequest], size: int) -> Iterator[list[ChunkRequest]]:
    """Batches of requests that share a temperature and a seed (a retry asks all its chunks alike)."""
    for _, group in groupby(requests, key=lambda request: (request.temperature, request.seed)):
        members = list(group)
        for start in range(0, len(members), size):
            yield members[start : start + size]


class _LocalBackend:
    """What the backends that run the model in this process share: the model named, pinned and identified."""

    name: ClassVar[str]

    def __init__(self, settings: MachineTranslationParams, trust_remote_code: bool = False) -> None:
        if not settings.model:
            raise TranslationError(f"translate.model is required by the {settings.backend} backend")
        if not is_local_model(settings):
            warn_if_unpinned(f"translation model {settings.model}", settings.revision or "main")
        self.settings = settings
        self.model_id = local_model_id(settings)
        self.trust_remote_code = trust_remote_code


@backend("vllm")
class VllmBackend(_LocalBackend):
    """vLLM offline batches on the GPU (`pip install -e '.[vllm]'`), safetensors weights only."""

    _llm: Any = None

    def _engine(self) -> Any:
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise TranslationError("the vllm backend needs vllm: pip install -e '.[vllm]'") from None
            loading.require_safetensors(self.settings.model)
            self._llm = LLM(
                model=self.settings.model,
                revision=self.settings.revision,
                tokenizer_revision=self.settings.revision,
                load_format="safetensors",
                dtype=self.settings.dtype,
                seed=0,
                trust_remote_code=self.trust_remote_code,
            )
        return self._llm

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        from vllm import SamplingParams

        engine = self._engine()
        for batch in _batches(requests, self.settings.batch_size):
            sampling = [
                SamplingParams(
                    temperature=request.temperature,
                    max_tokens=self.settings.max_new_tokens,
                    seed=request.seed if request.seed is not None else 0,
                )
                for request in batch
            ]
            outputs = engine.chat([request.messages for request in batch], sampling, use_tqdm=False)
            for request, output in zip(batch, outputs, strict=True):
                yield request, output.outputs[0].text

    def close(self) -> None:
        self._llm = None


# The files a transformers chat model needs (never pickle weights).
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@backend("transformers")
class TransformersBackend(_LocalBackend):
    """A chat model with transformers (a local folder such as data/models/base, or a hub id at a pinned revision);
    greedy at temperature 0, sampled with the request's seed above it."""

    _model: Any = None
    _tokenizer: Any = None

    def _folder(self) -> Path:
        if is_local_model(self.settings):
            return Path(self.settings.model)
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(self.settings.model, revision=self.settings.revision, allow_patterns=_SNAPSHOT_FILES)
            )
        except Exception as error:  # offline, gated, unknown revision: the message says which
            raise TranslationError(
                f"cannot fetch {self.settings.model}@{self.settings.revision or 'main'}: {type(error).__name__}: "
                + " ".join(str(error).split())[:300]
            ) from None

    def _load(self) -> None:
        import torch

        folder = self._folder()
        tokenizer = loading.load_tokenizer(folder, trust_remote_code=self.trust_remote_code)
        tokenizer.padding_side = "left"  # decoder-only batches grow to the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = "auto" if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        on_gpu = torch.cuda.is_available()
        model = loading.load_causal_lm(folder, dtype, trust_remote_code=self.trust_remote_code, on_cpu=not on_gpu)
        model.to("cuda" if on_gpu else "cpu").eval()
        self._model, self._tokenizer = model, tokenizer

    def translate(self, requests: Sequence[ChunkRequest]) -> Iterator[tuple[ChunkRequest, str]]:
        import torch

        if self._model is None:
            self._load()
        tokenizer, model = self._tokenizer, self._model
        for batch in _batches(requests, self.settings.batch_size):
            temperature, seed = batch[0].temperature, batch[0].seed
            prompts = [
                tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
                for request in batch
            ]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            if temperature > 0:
                torch.manual_seed(seed or 0)
            with torch.inference_mode():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=self.settings.max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for request, tokens in zip(batch, new_tokens, strict=True):
                yield request, tokenizer.decode(tokens, skip_special_tokens=True)

    def close(self) -> None:
        self._model = self._tokenizer = None
