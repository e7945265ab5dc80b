"""Delivering a data stage's records once its contracts are judged: the accepted ones to the stage's outputs, the
rejected ones to the quarantine files, the counts to the stage's metrics.

A data stage runs over every dataset and its languages; `deliver` takes one dataset's part (`translate@chains`). It
judges every language first; if one fails its contract (a table-level check, or more rejected records than
`contracts.max_rejected_fraction` allows) the part writes nothing and fails with every failed language's compact
report. Else each language's accepted records go to their output and its rejected ones to
`reports/data_quality/rejected/{stage}/{dataset}/{lang}.jsonl` (always written, empty when none, so the file is a DVC
output like any other). Writes are atomic; a write that fails names the path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budget_alignment import paths
from budget_alignment.data.validation import ContractOutcome, ContractViolation
from budget_alignment.io import OutputError, atomic_write
from budget_alignment.records import Problem, write_records

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


@dataclass
class LanguageResult:
    """What a data stage made for one language, before quarantine."""

    lang: str
    records: list[Problem]
    contract: ContractOutcome
    # Where the accepted records go (one file, or the same records to several).
    outputs: list[Path]
    # Why a record the stage could not make is missing (id -> one line), for the rejected file.
    details: Mapping[str, str] = field(default_factory=dict)
    # The stage's own figures for this language (cache hits, rules applied, ...).
    metrics: Mapping[str, float] = field(default_factory=dict)


def writing(path: Path, write: Callable[[], Any]) -> Any:
    """Run a write of `path`; any OS-level failure (a full disk, a file too large, a read-only folder) becomes an
    OutputError that names the path, which the CLI reports in one line."""
    try:
        return write()
    except OutputError:
        raise
    except OSError as error:
        raise OutputError(error.errno, f"cannot write {path}: {error.strerror or error}") from error


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> None:
    def write() -> None:
        with atomic_write(path) as handle:
            for line in lines:
                handle.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")

    writing(path, write)


def deliver(stage: str, results: Sequence[LanguageResult], run: StageRun | None = None) -> dict[str, list[Problem]]:
    """Write every language's accepted and rejected records, or nothing if one language failed its contract.
    `stage`: a dataset's part of the stage (`translate@chains`); its MLflow metrics are named `chains.ja.<metric>`."""
    dataset = stage.partition("@")[2]
    failed = [result.contract for result in results if not result.contract.passed]
    if failed:
        raise ContractViolation(failed)
    delivered = {}
    for result in results:
        accepted = result.contract.accepted(result.records)
        for output in result.outputs:
            writing(output, lambda output=output, accepted=accepted: write_records(output, accepted))
        rejected = paths.rejected_records(stage, result.lang)
        write_jsonl(rejected, result.contract.rejections(result.records, result.details))
        if result.contract.rejected:
            log.warning(
                "%s-%s: %d of %d records quarantined in %s",
                stage,
                result.lang,
                len(result.contract.rejected),
                result.contract.total,
                rejected,
            )
        if run is not None:
            for output in result.outputs:
                run.add_output(output)
            run.add_output(rejected)
            metrics = {**result.metrics, **result.contract.metrics()}
            run.log_metrics({f"{dataset}.{result.lang}.{name}": value for name, value in metrics.items()})
            if run.active:
                run.log_artifact(rejected, f"data_quality/{dataset}/{result.lang}")
        delivered[result.lang] = accepted
    return delivered
