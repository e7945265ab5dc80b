"""Stage `translate`: each dataset's English records into each of its target languages, one file per language.

Per (dataset, language) params name either an existing human translation (a source, aligned to the English records
by id or by position; the gold answer comes from English) or machine translation with a backend of
translation_backends.py. One process translates every language of every dataset, so a local translator loads once.
Messages and contract reports name a dataset's part of the stage `translate@{dataset}`.

Machine translation never sees what must not change: spans.py replaces math, numbers, code and choice letters by
markers, and long texts are cut at paragraph boundaries into chunks of at most `max_chars_per_chunk`. Each chunk's
reply goes to the translation cache as it comes (translation_cache.py), so a rerun, or a run resumed after a crash,
asks only for what is not there yet. A chunk whose reply broke its markers, and every chunk of a record that fails
a row check of the translate contract (spans restored, in the target language, length ratio), is asked again, up to
`validation_retries` times, at `retry_temperature` with a new seed per attempt; each attempt's reply is cached
under a key that names the attempt. What still fails is quarantined by the contract (contracts.py, quarantine.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from budget_alignment import loading, paths
from budget_alignment.data import contracts
from budget_alignment.data.expectations import translation_failures
from budget_alignment.data.quarantine import LanguageResult, deliver
from budget_alignment.data.sources import SourceError, check_unique_ids, load_source
from budget_alignment.data.spans import (
    MarkerError,
    Protected,
    check_markers,
    needs_translation,
    protect,
    renumber,
    restore,
    split_paragraphs,
)
from budget_alignment.data.translation_backends import (
    ChunkRequest,
    TranslationBackend,
    TranslationError,
    build_messages,
    check_api_keys,
    clean_reply,
    make_backend,
)
from budget_alignment.data.translation_cache import TranslationCache, cache_key
from budget_alignment.params import MachineTranslationParams, Params, TranslationParams
from budget_alignment.records import Problem, RecordError, read_records

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

# The check under which a record is quarantined when one of its chunks never came back with its markers.
SPANS_CHECK = "protected_spans_restored"


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
    cache_hits: int = 0  # replies of the first attempt found in the cache
    translated: int = 0  # replies asked of the backend, every attempt
    rejected_replies: int = 0  # replies that broke their markers or came back empty, every attempt
    # Chunks asked again (every retry attempt), and the records none of whose attempts restored every marker.
    retried_chunks: int = 0
    unassembled_records: int = 0

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = dict(vars(self))
        metrics["cache_hit_rate"] = self.cache_hits / self.unique_chunks if self.unique_chunks else 1.0
        return metrics


@dataclass
class MachineTranslation:
    records: list[Problem]
    # Records that could not be put together (id -> why): one of their chunks never kept its markers.
    unassembled: dict[str, str]
    stats: TranslationStats


def _fields_of(problem: Problem) -> list[tuple[str, str]]:
    fields = [("question", problem.question)]
    fields += [(f"choices.{letter}", text) for letter, text in (problem.choices or {}).items()]
    if problem.solution:
        fields.append(("solution", problem.solution))
    return fields


def _split_field(text: str, max_chars: int, keyer: Callable[[str], str]) -> list[_Piece]:
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


class _Translation:
    """The chunks of one language's records and the reply each one holds so far."""

    def __init__(
        self,
        english: Sequence[Problem],
        lang: str,
        settings: MachineTranslationParams,
        translator: TranslationBackend,
        cache: TranslationCache,
    ) -> None:
        self.english, self.lang, self.settings, self.translator, self.cache = (
            english,
            lang,
            settings,
            translator,
            cache,
        )
        self.stats = TranslationStats(records=len(english))
        self.fields: list[_Field] = []
        for index, problem in enumerate(english):
            for name, text in _fields_of(problem):
                self.fields.append(_Field(index, name, _split_field(text, settings.max_chars_per_chunk, self.key)))
        self.pieces: dict[str, _Piece] = {}
        self.users: dict[str, list[_Field]] = {}
        self.record_keys: dict[int, list[str]] = {}
        for item in self.fields:
            for piece in item.pieces:
                self.stats.chunks += 1
                if piece.key is None:
                    self.stats.unchanged_chunks += 1
                    continue
                self.pieces.setdefault(piece.key, piece)
                self.users.setdefault(piece.key, []).append(item)
                self.record_keys.setdefault(item.record, []).append(piece.key)
        self.stats.unique_chunks = len(self.pieces)
        # The reply each chunk holds (one that kept its markers), and why the last refused reply was refused.
        self.current: dict[str, str] = {}
        self.refused: dict[str, str] = {}

    def key(self, text: str, variant: str = "") -> str:
        return cache_key(
            text, self.translator.name, self.translator.model_id, self.settings.prompt_version, self.lang, variant
        )

    def attempt(self, number: int, keys: Sequence[str], bar) -> None:
        """Ask for `keys` (from the cache where it has them): attempt 0 as params say, retries sampled."""
        settings = self.settings
        if number == 0:
            variant, temperature, seed = "", settings.temperature, None
        else:
            temperature, seed = settings.retry_temperature, number
            variant = f"retry {number}: temperature {temperature:g}, seed {seed}"
        asked = {key: (self.key(self.pieces[key].protected.text, variant) if variant else key) for key in keys}
        replies = self.cache.get_many(list(asked.values()))
        if number == 0:
            self.stats.cache_hits = len(replies)
        else:
            self.stats.retried_chunks += len(keys)
        requests = [
            ChunkRequest(
                asked[key],
                self.pieces[key].protected.text,
                build_messages(self.pieces[key].protected.text, self.lang, settings.prompt_version),
                temperature,
                seed,
            )
            for key in keys
            if asked[key] not in replies
        ]
        bar.reset(total=len(requests))
        try:
            for request, reply in self.translator.translate(requests):
                reply = clean_reply(reply)
                # Every reply is kept, valid or not: a resumed run then decides exactly as this one.
                self.cache.put(
                    request.key,
                    reply,
                    source=request.text,
                    backend=self.translator.name,
                    model=self.translator.model_id,
                    prompt_version=settings.prompt_version,
                    lang=self.lang,
                )
                replies[request.key] = reply
                self.stats.translated += 1
                bar.update(1)
        except TranslationError as error:
            pending = [key for key in keys if asked[key] not in replies] or list(keys)
            first = self.users[pending[0]][0]
            raise TranslationError(
                f"translating to {self.lang} (first pending: record {self.english[first.record].id!r}, field "
                f"{first.name!r}): {error}"
            ) from None
        for key in keys:
            reply = replies[asked[key]]
            try:
                if not reply:
                    raise MarkerError("came back empty")
                check_markers(reply, len(self.pieces[key].protected.spans))
            except MarkerError as error:
                self.stats.rejected_replies += 1
                self.refused[key] = str(error)
                continue
            self.current[key] = reply

    def assemble(self) -> tuple[dict[int, Problem], dict[int, str]]:
        """The records whose every chunk holds a reply; for the others, why not."""
        texts: dict[tuple[int, str], str] = {}
        missing: dict[int, str] = {}
        for item in self.fields:
            if item.record in missing:
                continue
            parts = []
            for piece in item.pieces:
                if piece.key is None:
                    body = restore(piece.protected.text, piece.protected.spans)
                elif piece.key in self.current:
                    body = restore(self.current[piece.key], piece.protected.spans)
                else:
                    missing[item.record] = (
                        f"field {item.name!r}: the reply {self.refused.get(piece.key, 'is missing')}"
                    )
                    break
                parts.append(piece.lead + body + piece.trail + piece.separator)
            else:
                texts[(item.record, item.name)] = "".join(parts)
        provenance = {
            "method": "machine",
            "backend": self.translator.name,
            "model": self.translator.model_id,
            "prompt_version": self.settings.prompt_version,
        }
        records = {}
        for index, problem in enumerate(self.english):
            if index in missing:
                continue
            choices = None
            if problem.choices:
                choices = {letter: texts[(index, f"choices.{letter}")] for letter in problem.choices}
            records[index] = problem.model_copy(
                update={
                    "lang": self.lang,
                    "question": texts[(index, "question")],
                    "choices": choices,
                    "solution": texts.get((index, "solution"), problem.solution),
                    "provenance": {**problem.provenance, "translation": provenance},
                }
            )
        return records, missing


def machine_translate(
    english: Sequence[Problem],
    lang: str,
    settings: MachineTranslationParams,
    translator: TranslationBackend,
    cache: TranslationCache,
    *,
    length_ratio: tuple[float, float] = (
        TranslationParams.model_fields["min_length_ratio"].default,
        TranslationParams.model_fields["max_length_ratio"].default,
    ),
    progress: bool | None = None,
) -> MachineTranslation:
    """Translate every record's question, choice texts and solution (the answer stays the English one), asking again
    for what fails; records that never come back whole are listed in `unassembled`."""
    from tqdm.auto import tqdm

    work = _Translation(english, lang, settings, translator, cache)
    stats = work.stats
    log.info(
        "translate to %s: %d records, %d chunks (%d unique)", lang, len(english), stats.chunks, stats.unique_chunks
    )
    order = {key: position for position, key in enumerate(work.pieces)}
    with tqdm(desc=f"translate {lang}", unit="chunk", disable=None if progress is None else not progress) as bar:
        work.attempt(0, list(work.pieces), bar)
        for number in range(1, settings.validation_retries + 1):
            retry = {key for key in work.pieces if key not in work.current}
            records, _ = work.assemble()
            minimum, maximum = length_ratio
            for index, record in records.items():
                if translation_failures(record, english[index], min_length_ratio=minimum, max_length_ratio=maximum):
                    retry.update(work.record_keys.get(index, []))
            if not retry:
                break
            log.info("translate to %s: attempt %d asks again for %d chunk(s)", lang, number + 1, len(retry))
            work.attempt(number, sorted(retry, key=order.__getitem__), bar)
    records, missing = work.assemble()
    stats.unassembled_records = len(missing)
    unassembled = {english[index].id: why for index, why in sorted(missing.items())}
    return MachineTranslation([records[index] for index in sorted(records)], unassembled, stats)


# --- human translations --------------------------------------------------------------------------------------------


def human_translation(
    english: Sequence[Problem], entry: TranslationParams, dataset: str, lang: str, *, hub_mirror: str | None = None
) -> list[Problem]:
    """An existing translation aligned to the English records; the gold answer and its type come from English.

    The translation's own answer is kept in the provenance (`source_answer`): the contract checks it matches.
    Records the translation lacks are left out (the contract rejects them under `ids_aligned`).
    """
    assert entry.human is not None
    translated = load_source(entry.human, dataset, lang, hub_mirror=hub_mirror)
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
                        "source": {k: v for k, v in version.provenance.items() if k != "row"},
                        "source_id": version.id,
                        "source_answer": version.answer,
                    },
                },
            )
        )
    return records


# --- the stage -----------------------------------------------------------------------------------------------------


def stage_languages(params: Params, dataset: str, langs: Sequence[str] | None = None) -> list[str]:
    """The languages `translate` makes of `dataset`: each entry of `datasets.{dataset}.translation`, or those asked."""
    if dataset not in params.datasets:
        raise TranslationError(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    entries = params.datasets[dataset].translation
    unknown = [lang for lang in langs or [] if lang not in entries]
    if unknown:
        raise TranslationError(f"datasets.{dataset}.translation has no entry for {unknown[0]!r}")
    return list(langs or entries)


class Translators:
    """A stage's machine translation backends, one per distinct settings (the languages and datasets of a stage share
    one): a local model loads once for the stage, and every backend closes with it."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self._backends: dict[MachineTranslationParams, TranslationBackend] = {}

    def get(self, settings: MachineTranslationParams) -> TranslationBackend:
        if settings not in self._backends:
            self._backends[settings] = make_backend(settings, loading.trusts_remote_code(self.params, settings.model))
        return self._backends[settings]

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def __enter__(self) -> Translators:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def translate_dataset(
    params: Params,
    dataset: str,
    run: StageRun | None = None,
    *,
    langs: Sequence[str] | None = None,
    translator: TranslationBackend | None = None,
    cache: TranslationCache | None = None,
    backends: Translators | None = None,
) -> dict[str, list[Problem]]:
    """Dataset `dataset` of stage `translate`: each language's accepted records to `paths.translated(dataset, lang)`.

    `translator` replaces every machine backend; `backends`: the stage's backends, kept open for its other datasets."""
    stage = f"translate@{dataset}"
    langs = stage_languages(params, dataset, langs)
    check_api_keys(params, dataset, langs)  # before any work: a missing key costs nothing
    source = paths.ingested(dataset)
    try:
        english = read_records(source, Problem)
    except FileNotFoundError:
        raise TranslationError(f"{source} does not exist: run `budget-align ingest {dataset}` first") from None
    except RecordError as error:
        raise TranslationError(str(error)) from None
    entries = params.datasets[dataset].translation
    max_fraction = params.contracts.max_rejected_fraction.translate
    own_backends = backends is None
    backends = backends or Translators(params)
    own_cache = cache is None
    results = []
    try:
        for lang in langs:
            entry = entries[lang]
            prior: dict[str, list[str]] = {}
            details: dict[str, str] = {}
            if entry.human is not None:
                records = human_translation(english, entry, dataset, lang, hub_mirror=params.hub_mirror)
                log.info("%s-%s: %d records from the human translation", stage, lang, len(records))
                metrics: dict[str, float] = {"human": 1}
            else:
                settings = entry.machine
                assert settings is not None
                backend = translator or backends.get(settings)
                cache = cache or TranslationCache.default()
                bounds = (entry.min_length_ratio, entry.max_length_ratio)
                result = machine_translate(english, lang, settings, backend, cache, length_ratio=bounds)
                records, details = result.records, result.unassembled
                prior = {ident: [SPANS_CHECK] for ident in details}
                metrics = {**result.stats.metrics(), "human": 0}
                log.info("%s-%s: %s", stage, lang, ", ".join(f"{k} {v:g}" for k, v in metrics.items()))
            contract = contracts.check_translated(
                records,
                english,
                lang=lang,
                entry=entry,
                stage=stage,
                max_rejected_fraction=max_fraction,
                prior=prior,
                run=run,
            )
            output = paths.translated(dataset, lang)
            results.append(LanguageResult(lang, records, contract, [output], details, metrics))
    finally:
        if own_backends:
            backends.close()
        if own_cache and cache is not None:
            cache.close()
    return deliver(stage, results, run)
