"""Where task rows come from: local files (JSONL, JSON, CSV, Parquet) and `datasets`.

Files are read here without heavy imports (Parquet needs pyarrow). A `dataset` is a Hub id read
from the local cache only (offline, as with `HF_DATASETS_OFFLINE=1`: nothing is downloaded), a
directory written by `save_to_disk`, or a directory of data files. Each row comes with its
`Where` (file and line, or dataset and row); a row that cannot be read at all (invalid JSON,
not an object) comes as a `BadRow` so the caller can skip or raise it. A missing file or dataset
is a `ConfigError` at once. `sources_from_params` turns a task's params into its sources.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins.tasks.formats import BadRow, Where
from stratosd.errors import ConfigError, MissingDependency

Row = dict[str, Any] | BadRow
DATA_EXTRA = "pip install 'stratos[data]'"


@dataclass(frozen=True)
class Source:
    """One split's data: a file (`path`, `train_path`, `test_path`) or a dataset split."""

    location: str
    param: str  # the task param that named it
    split: str | None = None  # dataset split; None for a file
    config: str | None = None
    cache_dir: str | None = None

    @property
    def label(self) -> str:
        """How messages name it: the path, or `dataset[split]`."""
        return self.location if self.split is None else f"{self.location}[{self.split}]"


def iter_rows(
    src: Source, datasets: Mapping[str, Any] | None = None
) -> Iterator[tuple[Where, Row]]:
    """(where, row or BadRow) for every row of a source, in order; blank lines are skipped.

    `datasets` holds the splits of an opened dataset (see `open_dataset`).
    """
    if src.split is not None:
        if datasets is None:
            datasets = open_dataset(src)
        yield from _dataset_rows(src, datasets)
        return
    path = Path(src.location).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{src.location}: no such file (param {src.param!r})",
            hint="give the path of a data file on the host that runs the step",
            field=f"task.params.{src.param}",
        )
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        yield from _csv_rows(src, path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _parquet_rows(src, path)
    elif suffix == ".json" and _starts_with(path, "["):
        yield from _json_array_rows(src, path)
    else:
        yield from _jsonl_rows(src, path)


def _starts_with(path: Path, char: str) -> bool:
    with path.open(encoding="utf-8") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped.startswith(char)
    return False


def _unreadable(where: Where, reason: str, param: str, hint: str) -> BadRow:
    return BadRow(where, reason, field=f"task.params.{param}", hint=hint)


def _jsonl_rows(src: Source, path: Path) -> Iterator[tuple[Where, Row]]:
    hint = "each line must be one JSON object"
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = Where(src.location, line=lineno)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                at = Where(src.location, line=lineno, column=exc.colno)
                yield where, _unreadable(at, f"invalid JSON ({exc.msg})", src.param, hint)
                continue
            if not isinstance(row, dict):
                reason = f"expected a JSON object, got {type(row).__name__}"
                yield where, _unreadable(where, reason, src.param, hint)
                continue
            yield where, row


def _json_array_rows(src: Source, path: Path) -> Iterator[tuple[Where, Row]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{src.location} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})",
            hint="a .json file must be one JSON array of objects, or JSON lines",
            field=f"task.params.{src.param}",
        ) from None
    for i, row in enumerate(items, 1):
        where = Where(src.location, row=i)
        if isinstance(row, dict):
            yield where, row
        else:
            reason = f"expected a JSON object, got {type(row).__name__}"
            yield where, _unreadable(where, reason, src.param, "each item must be an object")


def _csv_rows(src: Source, path: Path, delimiter: str) -> Iterator[tuple[Where, Row]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        header = reader.fieldnames or []
        start = reader.line_num + 1
        for row in reader:
            where = Where(src.location, line=start)
            start = reader.line_num + 1
            if None in row or any(v is None for v in row.values()):
                cells = (
                    len(header) + len(row.get(None) or []) - sum(v is None for v in row.values())
                )
                reason = f"has {cells} cells, the header has {len(header)}"
                yield (
                    where,
                    _unreadable(
                        where,
                        reason,
                        src.param,
                        "quote cells that hold the delimiter or a newline",
                    ),
                )
                continue
            if not any(str(v).strip() for v in row.values()):
                continue  # a blank line, as in JSONL
            yield where, dict(row)


def _parquet_rows(src: Source, path: Path) -> Iterator[tuple[Where, Row]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(
            f"{src.location}: reading Parquet needs pyarrow",
            hint=f"{DATA_EXTRA} (installs `datasets` and pyarrow)",
            field=f"task.params.{src.param}",
        ) from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            n += 1
            yield Where(src.location, row=n), row


def _dataset_rows(src: Source, splits: Mapping[str, Any]) -> Iterator[tuple[Where, Row]]:
    assert src.split is not None
    if src.split not in splits:
        have = ", ".join(sorted(splits)) or "none"
        raise ConfigError(
            f"dataset {src.location!r} has no split {src.split!r} (splits: {have})",
            hint=f"set {src.param} to one of: {have}",
            field=f"task.params.{src.param}",
        )
    rows: Iterable[Any] = splits[src.split]
    for i, row in enumerate(rows, 1):
        yield Where(src.label, row=i), dict(row)


def sources_from_params(task: str, cfg: Mapping[str, Any]) -> tuple[Source, Source | None]:
    """The train source and the test source (None: split train by test_fraction)."""
    path, train, test, dataset = (cfg[n] for n in ("path", "train_path", "test_path", "dataset"))
    if path and (train or test):
        raise ConfigError(
            f"task {task!r}: give either `path` or `train_path`/`test_path`, not both",
            hint="use `path` with `test_fraction`, or two separate files",
            field="task.params.path",
        )
    if dataset and (path or train or test):
        raise ConfigError(
            f"task {task!r}: give either `dataset` or data files (`path`, `train_path`), not both",
            hint="keep one source of data",
            field="task.params.dataset",
        )
    if not (path or train or dataset):
        raise ConfigError(
            f"task {task!r}: no data file (set `path`, or `train_path` and `test_path`, "
            "or `dataset`)",
            hint="point the task at a data file or a dataset",
            field="task.params.path",
        )
    if test and not train:
        raise ConfigError(
            f"task {task!r}: `test_path` needs `train_path`",
            hint="set train_path too",
            field="task.params.train_path",
        )
    if not dataset:
        for name in ("dataset_config", "test_split", "cache_dir"):
            if cfg[name]:
                raise ConfigError(
                    f"task {task!r}: `{name}` needs `dataset`",
                    hint="set `dataset`, or remove the param",
                    field=f"task.params.{name}",
                )
        if path:
            return Source(path, "path"), None
        return Source(train, "train_path"), Source(test, "test_path") if test else None
    common = {"config": cfg["dataset_config"], "cache_dir": cfg["cache_dir"]}
    train_src = Source(dataset, "train_split", split=cfg["train_split"], **common)
    test_src = (
        Source(dataset, "test_split", split=cfg["test_split"], **common)
        if cfg["test_split"]
        else None
    )
    return train_src, test_src


# --- datasets ---------------------------------------------------------------------------


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependency(
            "task param `dataset` needs the `datasets` library",
            hint=DATA_EXTRA,
            field="task.params.dataset",
        ) from None
    return datasets


@contextmanager
def offline(datasets: Any) -> Iterator[None]:
    """`datasets` in offline mode (HF_DATASETS_OFFLINE=1) for the block: the cache only."""
    config = datasets.config
    names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, n)]
    saved = {n: getattr(config, n) for n in names}
    try:
        for n in names:
            setattr(config, n, True)
        yield
    finally:
        for n, value in saved.items():
            setattr(config, n, value)


def open_dataset(src: Source) -> dict[str, Any]:
    """split name → rows of a dataset: a save_to_disk directory, a data folder or a Hub id.

    Hub ids are read from the local cache only: first the `datasets` cache, then a snapshot
    in the Hub cache (`hf download --repo-type dataset ID`). Nothing is downloaded.
    """
    datasets = _import_datasets()
    path = Path(src.location).expanduser()
    root = Path(src.cache_dir).expanduser() if src.cache_dir else None
    ds_cache = str(root / "datasets") if root else None
    with offline(datasets):
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                if (path / "state.json").is_file():  # one saved Dataset: it is every split
                    return {src.split or "train": loaded}
                return dict(loaded)
            return dict(datasets.load_dataset(str(path), name=src.config, cache_dir=ds_cache))
        if src.location.startswith((".", "/", "~")) or src.location.count("/") > 1:
            raise ConfigError(
                f"dataset {src.location!r}: no such directory (param 'dataset')",
                hint="give a directory written by save_to_disk, a folder of data files, "
                "or a Hub id like `tatsu-lab/alpaca`",
                field="task.params.dataset",
            )
        return _open_hub(datasets, src, ds_cache, str(root / "hub") if root else None)


def _open_hub(
    datasets: Any, src: Source, ds_cache: str | None, hub_cache: str | None
) -> dict[str, Any]:
    try:
        return dict(datasets.load_dataset(src.location, name=src.config, cache_dir=ds_cache))
    except (OSError, ValueError) as exc:  # offline and not cached: ConnectionError
        first: Exception = exc
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(
            src.location, repo_type="dataset", local_files_only=True, cache_dir=hub_cache
        )
    except Exception:  # noqa: BLE001 - any failure here means "not in the Hub cache either"
        where = f" under {src.cache_dir}" if src.cache_dir else ""
        raise ConfigError(
            f"dataset {src.location!r} is not in the local cache{where}, and Stratos reads "
            "Hub datasets offline (HF_DATASETS_OFFLINE=1: nothing is downloaded) "
            f"[{type(first).__name__}: {first}]",
            hint=f'pre-download it on this host with network access: `python -c "import '
            f"datasets; datasets.load_dataset('{src.location}')\"` or `hf download "
            f"--repo-type dataset {src.location}`; or save_to_disk it and set `dataset` to "
            "that directory",
            field="task.params.dataset",
        ) from None
    return dict(datasets.load_dataset(snapshot, name=src.config, cache_dir=ds_cache))
