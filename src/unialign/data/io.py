"""Reading rows from jsonl, json, parquet, a saved ``datasets`` folder, the bundled data or the hub.

Every reader returns plain ``dict`` rows and names the file and line of anything it cannot read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unialign.data.errors import DataError


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """All rows of ``source``.

    ``source`` is a ``.jsonl``/``.json``/``.parquet`` file, a folder written by
    ``datasets.Dataset.save_to_disk``, ``bundled:<format>`` for the shipped dataset, or a hub name
    (needs a network).
    """
    if source.startswith("bundled"):
        from unialign.data.bundled import load_bundled

        _, _, fmt = source.partition(":")
        return load_bundled(fmt or "pairwise", split=split)
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            return read_json(path)
        if suffix == ".parquet":
            return read_parquet(path)
        raise DataError(f"unsupported file type {suffix!r}; use .jsonl, .json or .parquet", source=str(path))
    if path.is_dir():
        return read_saved_dataset(path, split)
    if path.suffix or source.startswith((".", "/")):
        raise DataError("file not found", source=source)
    return read_hub_dataset(source, split)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped, anything else unreadable is an error."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"is not valid UTF-8 ({err.reason} at byte {err.start})", source=str(path), row=number
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"is not valid JSON ({err.msg} at column {err.colno})", source=str(path), row=number
                ) from None
            except (ValueError, RecursionError) as err:  # a number over Python's digit limit; nesting too deep
                raise DataError(f"cannot be read as JSON ({_why(err)})", source=str(path), row=number) from None
            if not isinstance(value, dict):
                raise DataError(f"must be a JSON object, got {type(value).__name__}", source=str(path), row=number)
            rows.append(value)
    return rows


def read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or an object whose ``data``/``rows`` key holds that list."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"is not valid UTF-8 ({err.reason} at byte {err.start})", source=str(path)) from None
    except json.JSONDecodeError as err:
        raise DataError(f"is not valid JSON ({err.msg} at line {err.lineno})", source=str(path)) from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"cannot be read as JSON ({_why(err)})", source=str(path)) from None
    if isinstance(value, dict):
        value = value.get("data", value.get("rows"))
    if not isinstance(value, list):
        raise DataError("must hold a list of row objects (or {'data': [...]})", source=str(path))
    for index, row in enumerate(value):
        if not isinstance(row, dict):
            raise DataError(f"must be a JSON object, got {type(row).__name__}", source=str(path), row=index)
    return value


def _why(err: Exception) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return str(err).split(";")[0]


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """A parquet file through pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"is not a readable parquet file ({err})", source=str(path)) from None


def read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"has no split {split!r}; splits: {', '.join(data)}", source=str(path))
        data = data[split]
    return data.to_list()


def read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    """A dataset from the Hugging Face hub (needs a network connection)."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split).to_list()
    except Exception as err:  # the hub client raises many types; the user needs the name and the cause
        raise DataError(f"could not load it as a local file or a hub dataset: {err}", source=name) from err


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows as jsonl, json or parquet by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
