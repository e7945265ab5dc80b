"""Stage `ingest`: each dataset's English records from its source, checked by the ingest contract (`ingest@{dataset}`
names a dataset's part of the stage in messages and reports).

Records that fail a row check are quarantined (up to `contracts.max_rejected_fraction.ingest`); the accepted ones go
to `paths.ingested(dataset)`, which every other data stage of the dataset reads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from budget_alignment import paths
from budget_alignment.data import contracts
from budget_alignment.data.quarantine import LanguageResult, deliver
from budget_alignment.data.sources import SourceError, load_source
from budget_alignment.params import Params
from budget_alignment.records import Problem

if TYPE_CHECKING:
    from budget_alignment.tracking import StageRun

log = logging.getLogger(__name__)


def ingest_dataset(params: Params, dataset: str, run: StageRun | None = None) -> list[Problem]:
    """Dataset `dataset` of stage `ingest`: the English records, validated, to `paths.ingested(dataset)`."""
    if dataset not in params.datasets:
        raise SourceError(f"dataset {dataset!r} is not in params (datasets: {', '.join(params.datasets)})")
    stage = f"ingest@{dataset}"
    spec = params.datasets[dataset]
    problems = load_source(spec.source, dataset, "en", hub_mirror=params.hub_mirror)
    if spec.limit is not None:
        problems = problems[: spec.limit]
    log.info("%s: %d English records", stage, len(problems))
    contract = contracts.check_ingested(
        problems,
        dataset=dataset,
        stage=stage,
        max_rejected_fraction=params.contracts.max_rejected_fraction.ingest,
        run=run,
    )
    return deliver(stage, [LanguageResult("en", problems, contract, [paths.ingested(dataset)])], run)["en"]
