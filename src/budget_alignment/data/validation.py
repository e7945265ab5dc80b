"""Running a data contract: a great-expectations suite on a stage's records, the quarantine it decides, its report.

A failed row-level check (one that names its records) rejects those records; a table-level check (one that cannot
name records) fails the stage. `ContractOutcome` says which records are rejected and whether the stage may go on:
not when a table-level check failed, nor when more than `max_rejected_fraction` of the records are rejected. The
full outcome of every expectation goes to `reports/data_quality/{stage}/{lang}.json` (a DVC metrics file: its
`rejected` count is the quarantine metric), to the Data Docs site under `reports/data_quality/docs/` (a view, not a
pipeline output) and to the stage's MLflow run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import great_expectations as gx
import pandas as pd

from budget_alignment import paths
from budget_alignment.data.expectations import CHECKS
from budget_alignment.errors import StageError
from budget_alignment.io import OutputError, write_json
from budget_alignment.records import Problem

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)

# How many failing rows a report lists per check.
EXAMPLES = 20
# The check under which a record missing from its stage's output (or extra in it) is rejected.
ALIGNMENT_CHECK = "ids_aligned"


# --- outcomes ------------------------------------------------------------------------------------------------------


@dataclass
class CheckOutcome:
    check: str
    success: bool
    evaluated: int
    unexpected: int
    expectations: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    # Whether every failing expectation named its records (so they can be quarantined).
    row_level: bool = True


@dataclass
class ContractOutcome:
    """One stage instance's contract on one language: the checks, what they reject, and whether the stage may go on."""

    stage: str
    lang: str
    checks: list[CheckOutcome]
    # id -> the checks the record failed, in check order; missing records (no row to show) included.
    rejected: dict[str, list[str]]
    # How many records the stage was to deliver: the fraction's denominator.
    total: int
    max_rejected_fraction: float
    report: Path

    @property
    def table_failures(self) -> list[CheckOutcome]:
        return [outcome for outcome in self.checks if not outcome.success and not outcome.row_level]

    @property
    def rejected_fraction(self) -> float:
        return len(self.rejected) / self.total if self.total else 0.0

    @property
    def too_many_rejected(self) -> bool:
        # A rounding margin, so that 1 of 50 is within 0.02.
        return self.rejected_fraction > self.max_rejected_fraction + 1e-12

    @property
    def passed(self) -> bool:
        return not self.table_failures and not self.too_many_rejected

    def accepted(self, records: Sequence[Problem]) -> list[Problem]:
        return [record for record in records if record.id not in self.rejected]

    def rejections(self, records: Sequence[Problem], details: Mapping[str, str] | None = None) -> list[dict]:
        """The rejected-records file's lines: each record (null where it is missing) and the checks it failed."""
        by_id = {record.id: record for record in records}
        lines = []
        for ident, checks in self.rejected.items():
            record = by_id.get(ident)
            line: dict[str, Any] = {
                "id": ident,
                "checks": checks,
                "record": record.model_dump(mode="json") if record else None,
            }
            if details and ident in details:
                line["detail"] = details[ident]
            lines.append(line)
        return lines

    def metrics(self) -> dict[str, float]:
        return {
            "records": self.total,
            "accepted": self.total - len(self.rejected),
            "rejected": len(self.rejected),
            "rejected_fraction": round(self.rejected_fraction, 6),
        }


class ContractViolation(StageError, RuntimeError):
    """A stage's output broke its data contract; nothing was written. The message is the compact report."""

    def __init__(self, outcomes: Sequence[ContractOutcome]) -> None:
        self.outcomes = list(outcomes)
        self.failed = [check for outcome in self.outcomes for check in outcome.checks if not check.success]
        self.report = self.outcomes[0].report if self.outcomes else None
        super().__init__(self._message())

    @property
    def failed_checks(self) -> set[str]:
        return {outcome.check for outcome in self.failed}

    def _message(self) -> str:
        lines = []
        for outcome in self.outcomes:
            failed = [check for check in outcome.checks if not check.success]
            lines.append(
                f"{outcome.stage}-{outcome.lang}: {len(failed)} data contract check(s) failed, nothing written "
                f"(report: {outcome.report})"
            )
            kind = outcome.stage.partition("@")[0]
            if outcome.too_many_rejected:
                lines.append(
                    f"  {len(outcome.rejected)} of {outcome.total} records rejected "
                    f"({100 * outcome.rejected_fraction:.1f}%), above contracts.max_rejected_fraction.{kind} = "
                    f"{outcome.max_rejected_fraction:g}"
                )
            for check in failed:
                kinds = ", ".join(sorted({e["expectation"] for e in check.expectations if not e["success"]}))
                shown = "; ".join(_example_text(example) for example in check.examples[:3])
                scope = "" if check.row_level else " (table-level: cannot quarantine)"
                lines.append(
                    f"  {check.check} [{kinds}]: {check.unexpected} of {check.evaluated} failing{scope}"
                    + (f"; first: {shown}" if shown else "")
                )
        return "\n".join(lines)


def _example_text(example: Mapping[str, Any]) -> str:
    ident = example.get("id")
    values = ", ".join(f"{k}={_short(v)}" for k, v in example.items() if k != "id")
    if ident is None:
        return values
    return f"{ident}: {values}" if values else str(ident)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _failing_ids(result) -> list[str] | None:
    """Every record a failed expectation names, or None where it names none (a table-level check)."""
    details = result.result or {}
    if result.success:
        return []
    index_list = details.get("unexpected_index_list")
    count = details.get("unexpected_count")
    if not index_list or count is None:
        return None
    ids = [item.get("id") for item in index_list if isinstance(item, Mapping)]
    if len(ids) < count or any(ident is None for ident in ids):
        return None
    return [str(ident) for ident in ids]


def _outcome_of(result) -> dict[str, Any]:
    config = result.expectation_config
    details = result.result or {}
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format", "value_set")}
    if "value_set" in config.kwargs:
        kwargs["value_set_size"] = len(config.kwargs["value_set"])
    examples = []
    unexpected = details.get("unexpected_count")
    if "partial_missing_list" in details:  # a set expectation: which values are missing, which are extra
        unexpected = (details.get("missing_count") or 0) + (unexpected or 0)
        if unexpected:
            examples.append(
                {
                    "missing": list(details.get("partial_missing_list") or [])[:EXAMPLES],
                    "extra": list(details.get("partial_unexpected_list") or [])[:EXAMPLES],
                }
            )
    elif details.get("unexpected_index_list"):
        for item in details["unexpected_index_list"][:EXAMPLES]:
            examples.append(dict(item) if isinstance(item, Mapping) else {"value": item})
    elif not result.success:
        exception = (result.exception_info or {}).get("exception_message")
        examples.append({"exception": exception} if exception else {"observed": details.get("observed_value")})
    if unexpected is None and not result.success:
        unexpected = 1
    return {
        "expectation": config.type,
        "kwargs": _jsonable(kwargs),
        "success": bool(result.success),
        "evaluated": int(details.get("element_count") or 0),
        "unexpected": int(unexpected or 0),
        "examples": _jsonable(examples),
        "exception": (result.exception_info or {}).get("exception_message") if not result.success else None,
    }


# --- running a suite -----------------------------------------------------------------------------------------------


def _gx_context(docs: Path):
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    # Results persist beside the site, so its index lists every stage instance, not only the last one.
    config.stores[config.validation_results_store_name] = {
        "class_name": "ValidationResultsStore",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs / ".results")},
    }
    config.data_docs_sites = {
        "data_quality": {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    return gx.get_context(mode="ephemeral", project_config=config)


def suite_name(stage: str, lang: str) -> str:
    """`translate@chains`, `ja` -> `translate__chains-ja` (the Data Docs page of that language)."""
    return f"{stage.replace('@', '__')}-{lang}"


def validate(
    frame: pd.DataFrame,
    expectations: Sequence,
    stage: str,
    lang: str,
    *,
    max_rejected_fraction: float = 0.0,
    expected_ids: Sequence[str] | None = None,
    prior: Mapping[str, Sequence[str]] | None = None,
    run: StageRun | None = None,
) -> ContractOutcome:
    """Run the expectations on the frame, quarantine the records that fail row-level checks, write the report and the
    Data Docs. `expected_ids`: the records the stage was to deliver (missing ones are rejected under `ids_aligned`);
    `prior`: records the stage already rejected before it had a row for them (id -> checks)."""
    # The site is built in place (GX needs an absolute folder), but nothing of it reaches a report.
    docs = paths.data_docs_dir().resolve()
    suite = suite_name(stage, lang)
    # A rerun replaces the stage's previous results and pages.
    shutil.rmtree(docs / ".results" / suite, ignore_errors=True)
    shutil.rmtree(docs / "validations" / suite, ignore_errors=True)
    context = _gx_context(docs)
    batch = (
        context.data_sources.add_pandas("records")
        .add_dataframe_asset(suite)
        .add_batch_definition_whole_dataframe("all records")
    )
    # Given whole: adding expectations one by one re-serializes the suite each time.
    gx_suite = context.suites.add(gx.ExpectationSuite(name=suite, expectations=list(expectations)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite, data=batch, suite=gx_suite))
    try:  # the result goes to the Data Docs results store on disk as it is made
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
        )
    except OSError as error:
        raise OutputError(error.errno, f"cannot write {paths.data_docs_dir()}: {error.strerror or error}") from error
    present = [str(ident) for ident in frame["id"]] if "id" in frame and len(frame) else []
    rejected: dict[str, list[str]] = {}

    def reject(ident: str, check: str) -> None:
        checks = rejected.setdefault(ident, [])
        if check not in checks:
            checks.append(check)

    for ident, checks in (prior or {}).items():
        for check in checks:
            reject(ident, check)
    if expected_ids is not None:
        expected = set(expected_ids)
        for ident in present:
            if ident not in expected:
                reject(ident, ALIGNMENT_CHECK)
        here = set(present)
        for ident in expected_ids:
            if ident not in here and ident not in rejected:
                reject(ident, ALIGNMENT_CHECK)
    outcomes: dict[str, CheckOutcome] = {}
    for item in result.results:
        check = (item.expectation_config.meta or {}).get("check", item.expectation_config.type)
        details = _outcome_of(item)
        outcome = outcomes.setdefault(check, CheckOutcome(check, True, 0, 0))
        outcome.success = outcome.success and details["success"]
        # Table-level expectations (the id set) report no element count: they judge every record.
        outcome.evaluated = max(outcome.evaluated, details["evaluated"] or len(frame))
        outcome.unexpected += details["unexpected"]
        outcome.expectations.append(details)
        outcome.examples.extend(details["examples"][: EXAMPLES - len(outcome.examples)])
        if check == ALIGNMENT_CHECK:  # judged above by id, row by row
            continue
        failing = _failing_ids(item)
        if failing is None:
            outcome.row_level = False
        for ident in failing or []:
            reject(ident, check)
    total = len(expected_ids) if expected_ids is not None else len(frame)
    contract = ContractOutcome(
        stage,
        lang,
        list(outcomes.values()),
        rejected,
        total,
        max_rejected_fraction,
        paths.data_quality_report(stage, lang),
    )
    _write_report(contract)
    _publish(context, docs, suite, contract, run)
    if contract.passed:
        log.info(
            "%s-%s: %d data contract checks on %d records, %d rejected",
            stage,
            lang,
            len(outcomes),
            total,
            len(rejected),
        )
    return contract


def _write_report(contract: ContractOutcome) -> None:
    rejected_by_check: dict[str, int] = {}
    for checks in contract.rejected.values():
        for check in checks:
            rejected_by_check[check] = rejected_by_check.get(check, 0) + 1
    report = {
        "stage": contract.stage,
        "lang": contract.lang,
        "success": contract.passed,
        "records": contract.total,
        "accepted": contract.total - len(contract.rejected),
        "rejected": len(contract.rejected),
        "rejected_fraction": round(contract.rejected_fraction, 6),
        "max_rejected_fraction": contract.max_rejected_fraction,
        "failed_checks": sum(not o.success for o in contract.checks),
        "checks": {
            o.check: {
                "success": o.success,
                "description": CHECKS.get(o.check, ""),
                "unexpected": o.unexpected,
                "evaluated": o.evaluated,
                "rejected": rejected_by_check.get(o.check, 0),
                "row_level": o.row_level,
                "expectations": o.expectations,
                "examples": o.examples,
            }
            for o in contract.checks
        },
    }
    try:
        write_json(contract.report, report)
    except OutputError:
        raise
    except OSError as error:  # a file too large, ...: one line naming the report
        raise OutputError(error.errno, f"cannot write {contract.report}: {error.strerror or error}") from error


def _publish(context, docs: Path, suite: str, contract: ContractOutcome, run: StageRun | None) -> None:
    """Data Docs and MLflow artifacts, now or (inside `one_docs_build`) when the stage's validations are done."""
    deferred = _DEFERRED.get()
    if deferred is not None:
        deferred.append(contract)
        return
    _build_docs(context, docs, [suite])
    _log_artifacts(docs, suite, contract, run)


# The contracts validated inside `one_docs_build`, whose Data Docs wait for it to close.
_DEFERRED: ContextVar[list[ContractOutcome] | None] = ContextVar("deferred_data_docs", default=None)


@contextmanager
def one_docs_build(run: StageRun | None) -> Iterator[None]:
    """Within it, validations leave the Data Docs site to one build when it closes (a failed stage's too): a build
    re-reads every validation result on disk for the site's index, so one build per validation costs a data stage the
    square of its datasets and languages."""
    token = _DEFERRED.set([])
    try:
        yield
    finally:
        contracts = _DEFERRED.get() or []
        _DEFERRED.reset(token)
        if contracts:
            docs = paths.data_docs_dir().resolve()
            suites = [suite_name(contract.stage, contract.lang) for contract in contracts]
            _build_docs(None, docs, suites)
            for suite, contract in zip(suites, contracts, strict=True):
                _log_artifacts(docs, suite, contract, run)


def _build_docs(context, docs: Path, suites: Sequence[str]) -> None:
    """Render the suites' pages and the index (with the validation's GX context, or a new one over the same stores);
    best effort, since the JSON reports already hold the outcomes."""
    try:
        context = context or _gx_context(docs)
        docs.mkdir(parents=True, exist_ok=True)
        # The site is rebuilt from results on disk; it is a view, not a pipeline output, and stays out of git.
        (docs / ".gitignore").write_text("*\n", encoding="utf-8")
        # Render these suites' pages only (and the index); the other stages' pages are already on disk.
        wanted = set(suites)
        keys = [
            key
            for key in context.validation_results_store.list_keys()
            if key.expectation_suite_identifier.name in wanted
        ]
        context.build_data_docs(site_names=["data_quality"], resource_identifiers=keys)
    except Exception as error:  # rendering must never fail a stage
        log.warning("could not build the Data Docs site at %s: %s", docs, error)


def _log_artifacts(docs: Path, suite: str, contract: ContractOutcome, run: StageRun | None) -> None:
    if run is None or not run.active:
        return
    folder = f"data_quality/{contract.stage.partition('@')[2]}/{contract.lang}"
    run.log_artifact(contract.report, folder)
    # The full validation result (as the results store keeps it) and its rendered page.
    for path in [*(docs / ".results" / suite).rglob("*.json"), *(docs / "validations" / suite).rglob("*.html")]:
        run.log_artifact(path, folder)
