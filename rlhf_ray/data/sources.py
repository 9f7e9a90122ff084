"""Rows from wherever ``data.path`` points, each remembering where it came from.

``load_rows`` reads ``demo:<name>`` (built in), a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a
directory written by ``datasets.save_to_disk``, or otherwise a ``datasets`` hub name. Every row keeps
its location (``data/train.jsonl:17`` for a JSONL line, ``data/train.json row 3`` for a row index) so
that the tokenizers can say exactly which row is wrong. Malformed rows raise ``DataError``
(``data.on_bad_row: error``) or are skipped and counted (``skip``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.demo import make_demo_rows
from rlhf_ray.data.errors import DataError

log = logging.getLogger(__name__)

FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
MAX_REASONS_KEPT = 5
EVAL_DEMO_SEED = 1
"""Demo seed for ``data.eval_path: demo:<name>``, so a demo eval set is not the train set's rows."""


@dataclass
class RowSet:
    """Rows (plain dicts) with the location of each and what was skipped on the way."""

    rows: list[dict[str, Any]]
    locations: list[str]
    """One per row, for error messages: ``data/train.jsonl:17``, ``data/train.parquet row 3``, ``demo:arithmetic row 5``."""
    source: str
    """What was read: the path (and split for ``datasets`` sources)."""
    skipped_malformed: int = 0
    """Rows skipped under ``on_bad_row: skip`` (not valid JSON, not an object, ...)."""
    skip_reasons: list[str] = field(default_factory=list)
    """The first few skip messages, each with its location."""

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.locations):
            raise ValueError(f"RowSet: {len(self.rows)} rows but {len(self.locations)} locations")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(location, row) pairs."""
        return zip(self.locations, self.rows)

    def subset(self, indices: Sequence[int], source: Optional[str] = None) -> "RowSet":
        """The rows at ``indices`` (in that order), keeping their locations; counters are not carried."""
        return RowSet([self.rows[i] for i in indices], [self.locations[i] for i in indices],
                      source or self.source)


class _Bad:
    """A row that could not be read; ``reason`` already names its location."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


RawRow = Union[dict, _Bad]


# ---- readers: each yields (location, row-or-_Bad) lazily, so max_samples can stop early ----------

def _read_demo(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    rows = make_demo_rows(path[len("demo:"):], cfg.demo_size, seed)
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _read_jsonl(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    # Read bytes and decode per line: a bad byte then costs one row, not the file.
    with open(Path(path).expanduser(), "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield loc, _Bad(f"{loc}: not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield loc, _Bad(f"{loc}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield loc, row if isinstance(row, dict) else _Bad(
                f"{loc}: expected a JSON object, got {type(row).__name__}")


def _read_json(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        # One document: nothing can be skipped, so this always raises.
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, "
                        f"got {type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
    for i, row in enumerate(data):
        loc = f"{path} row {i}"
        yield loc, row if isinstance(row, dict) else _Bad(f"{loc}: expected a JSON object, got {type(row).__name__}")


def _read_parquet(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(Path(path).expanduser())
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types; all mean "not a readable parquet file"
        raise DataError(f"{path}: cannot read as parquet ({type(exc).__name__}: {exc})") from exc
    if cfg.max_samples is not None:
        table = table.slice(0, cfg.max_samples)
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _dataset_rows(ds: Any, name: str, max_samples: Optional[int]) -> Iterator[tuple[str, RawRow]]:
    if max_samples is not None and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    for i, row in enumerate(ds.to_list()):
        yield f"{name} row {i}", row


def _read_saved_dataset(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk "
                        f"({type(exc).__name__}: {exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (data.split); it has {sorted(ds)}")
        ds = ds[split]
        path = f"{path}[{split}]"
    yield from _dataset_rows(ds, path, cfg.max_samples)


def _read_hub(path: str, split: str, cfg: DataConfig, seed: int) -> Iterator[tuple[str, RawRow]]:
    import datasets

    try:
        ds = datasets.load_dataset(path, cfg.subset, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise DataError(f"data.path '{path}' is neither a local file nor a reachable dataset "
                        f"(datasets.load_dataset(split='{split}') failed: {type(exc).__name__}: {exc})") from exc
    yield from _dataset_rows(ds, f"{path}[{split}]", cfg.max_samples)


READERS = {
    "demo": _read_demo,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "saved_dataset": _read_saved_dataset,
    "hub": _read_hub,
}


def resolve_format(path: str, fmt: str = "auto") -> str:
    """Which reader in ``READERS`` handles ``path`` (``fmt`` is ``data.format``).

    A path is taken as local when it exists, starts with ``/``, ``.`` or ``~``, or ends in a known
    file suffix; a local path that does not exist is an error naming it. Anything else is a hub name.
    """
    if path.startswith("demo:"):
        return "demo"
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    looks_local = p.exists() or path.startswith(("/", ".", "~")) or suffix in FILE_SUFFIXES
    if fmt in ("jsonl", "json", "parquet"):
        if not p.is_file():
            raise DataError(f"data.path: file '{path}' does not exist" if not p.exists()
                            else f"data.path: '{path}' is not a file (data.format is {fmt})")
        return fmt
    if p.is_dir():
        return "saved_dataset"
    if p.is_file():
        if fmt == "hf" or suffix not in FILE_SUFFIXES:
            raise DataError(f"data.path: cannot tell the format of '{path}' from its suffix; name files "
                            f"{', '.join(sorted(FILE_SUFFIXES))} or set data.format to jsonl, json or parquet")
        return FILE_SUFFIXES[suffix]
    if looks_local:
        raise DataError(f"data.path: file '{path}' does not exist")
    return "hub"


def load_rows(cfg: DataConfig, split: Optional[str] = None, *, demo_seed: int = 0) -> RowSet:
    """Read the rows of ``cfg.path`` (split ``split``, default ``cfg.split``, for ``datasets`` sources).

    Malformed rows raise ``DataError`` under ``on_bad_row: error`` or are skipped and counted in
    ``RowSet.skipped_malformed`` under ``skip``. At most ``cfg.max_samples`` rows are kept (the first
    ones). ``demo_seed`` seeds the ``demo:`` generators. Raises ``DataError`` when nothing is left.
    """
    split = split or cfg.split
    kind = resolve_format(cfg.path, cfg.format)
    source = f"{cfg.path}[{split}]" if kind == "hub" else cfg.path
    rows: list[dict] = []
    locations: list[str] = []
    skipped, reasons = 0, []
    for loc, row in READERS[kind](cfg.path, split, cfg, demo_seed):
        if isinstance(row, _Bad):
            if cfg.on_bad_row == "error":
                raise DataError(f"{row.reason} (set data.on_bad_row=skip to skip such rows)")
            skipped += 1
            if len(reasons) < MAX_REASONS_KEPT:
                reasons.append(row.reason)
            continue
        rows.append(row)
        locations.append(loc)
        if cfg.max_samples is not None and len(rows) >= cfg.max_samples:
            break
    if not rows:
        if skipped:
            raise DataError(f"data set {source}: all {skipped} rows were skipped as malformed "
                            f"(first: {reasons[0]})")
        raise DataError(f"data set {source} has no rows")
    if skipped:
        log.warning("%s: skipped %d malformed rows (data.on_bad_row=skip); first: %s", source, skipped,
                    "; ".join(reasons))
    return RowSet(rows, locations, source, skipped, reasons)


def split_rows(rows: RowSet, fraction: float, seed: int) -> tuple[RowSet, RowSet]:
    """Hold out ``round(fraction * len(rows))`` rows (at least 1) chosen by a ``seed``-ed shuffle.

    Both parts keep the original row order; the same rows and seed always give the same split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n = len(rows)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} of {n} rows leaves no training rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = rows.subset([i for i in range(n) if i not in held])
    evaluation = rows.subset(sorted(held), source=f"{rows.source} (eval split)")
    train.skipped_malformed, train.skip_reasons = rows.skipped_malformed, list(rows.skip_reasons)
    return train, evaluation


def split_eval(rows: RowSet, fraction: Union[float, DataConfig], seed: int) -> tuple[RowSet, Optional[RowSet]]:
    """The training rows and the evaluation rows (``None`` when there is no evaluation set).

    ``fraction`` is a float (hold out that share, see ``split_rows``) or the ``DataConfig``, which
    uses ``eval_fraction`` or reads ``eval_path`` (its demo sets with ``EVAL_DEMO_SEED``); setting
    both is refused.
    """
    if isinstance(fraction, DataConfig):
        cfg = fraction
        if cfg.eval_path and cfg.eval_fraction > 0:
            from rlhf_ray.config.loader import ConfigError

            raise ConfigError("data.eval_fraction: set either data.eval_fraction or data.eval_path, not both")
        if cfg.eval_path:
            return rows, load_rows(dataclasses.replace(cfg, path=cfg.eval_path), demo_seed=EVAL_DEMO_SEED)
        fraction = cfg.eval_fraction
    if fraction == 0:
        return rows, None
    return split_rows(rows, fraction, seed)
