"""Reading data sources: the hub at a pinned revision (or a local mirror of it), a local file, or the bundled sets.

A source yields raw rows (dicts) and their provenance; `filters` keep some of them; a loader of loaders.py maps each
remaining row to the fields of a `Problem`. Errors name the source (file or repository), the row and the field.

The hub is reached in one place, `fetch_hub_dataset`. With `hub_mirror` set, hub sources are read instead from a
folder of dataset snapshots (`read_hub_mirror`) with the real `datasets.load_dataset`, without the network.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from budget_alignment import paths
from budget_alignment.data.loaders import LoadContext, RawRows, SourceError, map_rows
from budget_alignment.fingerprints import sha256_file, tree_digest
from budget_alignment.hub import is_commit_hash, warn_if_unpinned
from budget_alignment.params import BundledSource, DataSource, HubDatasetSource, LocalSource
from budget_alignment.records import Problem

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


# --- raw rows ------------------------------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; set `format` "
            f"({', '.join([*SUFFIX_FORMATS.values(), 'hf_disk'])})"
        )
    return fmt


def _read_jsonl(path: Path) -> list[dict[Any, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[Any, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise SourceError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    # A list of objects, or an object wrapping exactly one such list ({"data": [...]}, {"test": [...]}).
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise SourceError(f"{path}: expected a list of objects, or an object holding exactly one such list")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise SourceError(f"{path}: expected a list of objects")
    return data


def _read_delimited(path: Path, delimiter: str, header: bool) -> list[dict[Any, Any]]:
    # utf-8-sig drops a byte-order mark (JMMLU's files start with one), else it would stick to the first column.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if header:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = []
            for row in reader:
                if None in row:
                    raise SourceError(f"{path}:{reader.line_num}: more cells than header columns")
                rows.append(dict(row))
            return rows
        # Headerless: columns are addressed by index, as `fields: {question: 0, ...}` does.
        return [dict(enumerate(cells)) for cells in csv.reader(handle, delimiter=delimiter) if cells]


def _read_parquet(path: Path) -> list[dict[Any, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise SourceError(f"{path}: not a readable parquet file: {error}") from None


def _read_hf_disk(path: Path, split: str | None) -> list[dict[Any, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise SourceError(f"{path}: not a `save_to_disk` dataset folder: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise SourceError(f"{path}: a DatasetDict; set `split` to one of {list(loaded)}")
        if split not in loaded:
            raise SourceError(f"{path}: no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    return loaded.to_list()


def read_local(source: LocalSource) -> RawRows:
    path = Path(source.path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    fmt = detect_format(path) if source.format == "auto" else source.format
    if fmt == "jsonl":
        rows = _read_jsonl(path)
    elif fmt == "json":
        rows = _read_json(path)
    elif fmt in ("csv", "tsv"):
        rows = _read_delimited(path, "," if fmt == "csv" else "\t", source.header)
    elif fmt == "parquet":
        rows = _read_parquet(path)
    else:
        rows = _read_hf_disk(path, source.split)
    digest = tree_digest(path, contents=True) if path.is_dir() else sha256_file(path)
    return RawRows(rows, str(path), {"source": "local", "path": portable_path(path), "format": fmt, "sha256": digest})


def portable_path(path: str | Path) -> str:
    """A path as records may keep it: relative to the project where it lies inside, else its last part only.

    Outputs are pure functions of their inputs: the same data read from another folder (a clone, a temporary
    workspace) must give the same bytes; the content digest beside the path says which data it was.
    """
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(paths.repo_root().resolve()).as_posix()
    except ValueError:
        return path.name


def resolve_hub_commit(repo_id: str, revision: str) -> str | None:
    """The commit a revision points to, or None where the hub cannot be asked (offline)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as error:  # offline, gated, rate-limited: the data may still load from the local cache
        log.warning(
            "could not resolve %s@%s to a commit (%s); provenance keeps the revision only", repo_id, revision, error
        )
        return None


def fetch_hub_dataset(source: HubDatasetSource) -> tuple[Any, str | None]:
    """The one call to the hub: (the split as a `datasets.Dataset`, the resolved commit or None)."""
    import datasets

    commit = resolve_hub_commit(source.repo_id, source.revision)
    # Load at the resolved commit, so the rows are exactly the ones the provenance names.
    dataset = datasets.load_dataset(
        source.repo_id, source.config, split=source.split, revision=commit or source.revision
    )
    return dataset, commit


def hub_provenance(source: HubDatasetSource, commit: str | None, **extra: Any) -> dict[str, Any]:
    """What records keep of a hub source: the repository, the revision asked for, the commit it resolved to."""
    return {
        "source": "hub",
        "repo_id": source.repo_id,
        "revision": source.revision,
        "resolved_commit": commit,
        "config": source.config,
        "split": source.split,
        **extra,
    }


def mirror_configs(folder: Path) -> dict[str, list[str] | None] | None:
    """The configs of a hub dataset snapshot and their splits, from the `configs:` of its README.md card; None where
    the card declares none (the `datasets` library then infers the layout from the files)."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    try:
        header = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as error:
        raise SourceError(f"{card}: the card's YAML header is not valid: {error}") from None
    configs = header.get("configs") if isinstance(header, dict) else None
    if not isinstance(configs, list):
        return None
    found: dict[str, list[str] | None] = {}
    for config in configs:
        files = config.get("data_files")
        splits = [item.get("split", "train") for item in files] if isinstance(files, list) else None
        found[str(config.get("config_name", "default"))] = splits
    return found


def _mirror_commit(folder: Path) -> str | None:
    """The commit `huggingface-cli download --local-dir` recorded beside the files, if it did."""
    for metadata in sorted((folder / ".cache" / "huggingface" / "download").rglob("*.metadata")):
        first = metadata.read_text(encoding="utf-8").splitlines()[:1]
        if first and re.fullmatch(r"[0-9a-f]{40}", first[0].strip()):
            return first[0].strip()
    return None


def read_hub_mirror(source: HubDatasetSource, mirror: str) -> RawRows:
    """A hub source from a local snapshot `{mirror}/{repo_id}`, read with `datasets.load_dataset` as the hub would be.

    Provenance keeps the revision params ask for, the commit the snapshot records (if any) and a digest of the
    snapshot's files.
    """
    import datasets

    folder = Path(mirror) / source.repo_id
    config = source.config or "default"
    where = f"hub_mirror {mirror}: {source.repo_id} config {config} split {source.split}"
    if not folder.is_dir():
        raise SourceError(f"hub_mirror {mirror}: no copy of {source.repo_id} (expected the folder {folder})")
    configs = mirror_configs(folder)
    if configs is not None:
        if config not in configs:
            raise SourceError(f"{where}: the copy has no config {config!r} (configs: {', '.join(configs)})")
        splits = configs[config]
        if splits is not None and source.split not in splits:
            raise SourceError(f"{where}: the copy has no split {source.split!r} (splits: {', '.join(splits)})")
    try:
        dataset = datasets.load_dataset(
            str(folder), source.config, split=source.split, cache_dir=str(paths.cache_dir() / "datasets")
        )
    except Exception as error:  # datasets raises many types for a bad layout; the message is what the user needs
        raise SourceError(
            f"{where}: cannot load: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
        ) from None
    commit = _mirror_commit(folder)
    if commit and is_commit_hash(source.revision) and commit != source.revision:
        log.warning("%s holds commit %s, not the revision %s that params ask for", where, commit, source.revision)
    provenance = hub_provenance(
        source, commit, mirror=portable_path(mirror), sha256=tree_digest(folder, contents=True)
    )
    return RawRows(dataset.to_list(), where, provenance)


def read_hub(source: HubDatasetSource) -> RawRows:
    where = f"hub {source.repo_id}@{source.revision}" + (f" config {source.config}" if source.config else "")
    where += f" split {source.split}"
    warn_if_unpinned(f"dataset {source.repo_id}", source.revision)
    try:
        dataset, commit = fetch_hub_dataset(source)
    except SourceError:
        raise
    except Exception as error:  # datasets/hub errors have many types; the message is what the user needs
        raise SourceError(f"{where}: cannot load: {type(error).__name__}: {error}") from None
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    return RawRows(rows, where, hub_provenance(source, commit))


def bundled_sets() -> list[str]:
    root = resources.files("budget_alignment.data").joinpath("bundled")
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def read_bundled(source: BundledSource, lang: str) -> RawRows:
    lang = source.lang or lang
    entry = resources.files("budget_alignment.data").joinpath("bundled", source.name, f"{lang}.jsonl")
    if not entry.is_file():
        if source.name not in bundled_sets():
            raise SourceError(f"bundled set {source.name!r} does not exist (sets: {', '.join(bundled_sets())})")
        raise SourceError(f"bundled set {source.name!r} has no {lang!r} file")
    with resources.as_file(entry) as path:
        rows = _read_jsonl(path)
        digest = sha256_file(path)
    where = f"bundled/{source.name}/{lang}.jsonl"
    return RawRows(rows, where, {"source": "bundled", "set": source.name, "lang": lang, "sha256": digest})


def apply_filters(raw: RawRows, filters: Mapping[str, Any]) -> RawRows:
    """Keep rows whose column equals the filter value (or is in the list given as value)."""
    if not filters:
        return raw
    columns = set().union(*(row.keys() for row in raw.rows)) if raw.rows else set()
    kept = raw.rows
    for column, wanted in filters.items():
        key: Any = column
        if column not in columns and str(column).isdigit() and int(column) in columns:
            key = int(column)
        elif column not in columns:
            raise SourceError(
                f"{raw.where}: filter column {column!r} is not a column ({', '.join(map(str, columns))})"
            )
        values = wanted if isinstance(wanted, list) else [wanted]
        accepted = {str(value) for value in values}
        kept = [row for row in kept if str(row.get(key)) in accepted]
    if not kept:
        raise SourceError(f"{raw.where}: no row passes the filters {dict(filters)}")
    return RawRows(kept, raw.where, {**raw.provenance, "filters": dict(filters)})


def load_source(source: DataSource, dataset: str, lang: str, *, hub_mirror: str | None = None) -> list[Problem]:
    """Every record of a source as `Problem`s of `dataset` in `lang`; hub sources from `hub_mirror` when it is set."""
    if isinstance(source, BundledSource):
        raw = read_bundled(source, lang)
        return map_rows(raw, "bundled", LoadContext(dataset, source.lang or lang, raw.where))
    if isinstance(source, HubDatasetSource):
        if hub_mirror is not None:
            warn_if_unpinned(f"dataset {source.repo_id}", source.revision)
            raw = read_hub_mirror(source, hub_mirror)
        else:
            raw = read_hub(source)
        raw = apply_filters(raw, source.filters)
        return map_rows(raw, source.loader, LoadContext(dataset, lang, raw.where))
    raw = apply_filters(read_local(source), source.filters)
    return map_rows(raw, source.loader, LoadContext(dataset, lang, raw.where, source.fields, source.answer_type))


def check_unique_ids(problems: Iterable[Problem], where: str) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise SourceError(f"{where}: id {problem.id!r} occurs more than once; map a unique `id` column")
        seen.add(problem.id)
