"""Reading rows from jsonl, json, parquet, a saved ``datasets`` folder or the hub.

Every reader returns plain ``dict`` rows and names the file and line of anything it cannot read.
This is the lowest data layer: it reads paths and hub names it is given and knows no dataset by
name (:mod:`unialign.data.sources` decides what a name means).
"""

# Deferred imports: pyarrow datasets (seconds to load; needed only for the file kinds that use them).

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unialign.data.errors import DataError, DuplicateKey
from unialign.jsonfile import dumps as json_dumps


def read_path(path: Path, split: str = "train") -> list[dict[str, Any]]:
    """All rows of the file or folder at ``path``: ``.jsonl``, ``.json``, ``.parquet``, or a ``save_to_disk`` folder.

    Names that are not paths (``bundled:<format>``, hub datasets) are resolved by
    :mod:`unialign.data.sources`, which calls this for paths.
    """
    path = Path(path)
    if path.is_dir():
        return read_saved_dataset(path, split)
    kind = file_kind(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "json":
        return read_json(path)
    return read_parquet(path)


def file_kind(path: Path) -> str:
    """``jsonl``, ``json`` or ``parquet``, by the file's suffix.

    A file without a suffix is told by its first bytes: ``PAR1`` is parquet, ``[`` a JSON list,
    anything else JSON lines.
    """
    if not path.is_file():
        raise DataError("file not found", source=str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        return suffix[1:]
    if suffix:
        raise DataError(f"unsupported file type {suffix!r}; use .jsonl, .json or .parquet", source=str(path))
    with open(path, "rb") as handle:
        start = handle.read(4096)
    if start.startswith(b"PAR1"):
        return "parquet"
    return "json" if start.lstrip()[:1] == b"[" else "jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped, anything else unreadable is an error."""
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            line = decode_jsonl_line(raw, number, str(path))
            if line.strip():
                rows.append(parse_jsonl_line(line, number, str(path)))
    return rows


def decode_jsonl_line(raw: bytes, number: int, source: str) -> str:
    """The text of line ``number`` (0-based) of a jsonl file; invalid UTF-8 is a :class:`DataError`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"is not valid UTF-8 ({err.reason} at byte {err.start})", source=source, row=number) from None


def parse_jsonl_line(line: str, number: int, source: str) -> dict[str, Any]:
    """The JSON object on line ``number`` (0-based) of a jsonl file; anything else is a :class:`DataError`."""
    try:
        value, twice = loads_keeping_duplicates(line)
    except json.JSONDecodeError as err:
        raise DataError(f"is not valid JSON ({err.msg} at column {err.colno})", source=source, row=number) from None
    except (ValueError, RecursionError) as err:  # a number over Python's digit limit; nesting too deep
        raise DataError(f"cannot be read as JSON ({_why(err)})", source=source, row=number) from None
    if not isinstance(value, dict):
        raise DataError(f"must be a JSON object, got {type(value).__name__}", source=source, row=number)
    if twice:
        raise duplicate_key_error(value, twice, source, number)
    return value


def loads_keeping_duplicates(text: str) -> tuple[Any, list[tuple[dict, str]]]:
    """``json.loads(text)`` and every (object, key) where the text names that key twice in that object.

    Python's ``json`` silently keeps the last value of a repeated key; RFC 8259 leaves the meaning
    open, so a reader cannot know which value was meant. The caller refuses such text.
    """
    twice: list[tuple[dict, str]] = []

    def build(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            twice.append((obj, key))
        return obj

    return json.loads(text, object_pairs_hook=build), twice


def duplicate_key_error(root: Any, twice: list[tuple[dict, str]], source: str, row: int | None) -> DuplicateKey:
    """The :class:`DataError` for the first repeated key found in ``root`` (a row, or a .json file's list).

    The field is the row's column holding the repeated key (the key itself for a top-level column).
    """
    obj, key = twice[0]
    path = _path_to(root, obj) or []
    if row is None and path and isinstance(path[0], int):  # a .json file: the first step is the row
        row, path = path[0], path[1:]
    if not path:
        where = "this row" if row is not None else "the file's top-level object"
        return DuplicateKey(
            f"the key {key!r} appears more than once in {where}; JSON keys must be unique, "
            "and which value was meant cannot be told",
            source=source, row=row, field=key if row is not None else None,
        )
    inside = path[0] + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path[1:])
    return DuplicateKey(
        f"the key {key!r} appears more than once in {inside}; JSON keys must be unique, "
        "and which value was meant cannot be told",
        source=source, row=row, field=str(path[0]),
    )


def _path_to(root: Any, target: dict) -> list | None:
    """The keys and indices leading from ``root`` to the object ``target`` (by identity); None if absent."""
    stack = [(root, [])]
    while stack:
        value, path = stack.pop()
        if value is target:
            return path
        if isinstance(value, dict):
            stack.extend((item, [*path, key]) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, [*path, index]) for index, item in enumerate(value))
    return None


def read_json(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects, or an object whose ``data``/``rows`` key holds that list."""
    try:
        value, twice = loads_keeping_duplicates(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"is not valid UTF-8 ({err.reason} at byte {err.start})", source=str(path)) from None
    except json.JSONDecodeError as err:
        raise DataError(f"is not valid JSON ({err.msg} at line {err.lineno})", source=str(path)) from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"cannot be read as JSON ({_why(err)})", source=str(path)) from None
    if twice:
        wrapped = isinstance(value, dict)
        rows = value.get("data", value.get("rows")) if wrapped else value
        inner = [(obj, key) for obj, key in twice if obj is not value]
        if inner and isinstance(rows, list):
            raise duplicate_key_error(rows, inner, str(path), None)
        raise duplicate_key_error(value, twice, str(path), None)
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
    """The rows of a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return load_saved_dataset(path, split).to_list()


def load_saved_dataset(path: Path, split: str):
    """A ``save_to_disk`` folder as a memory-mapped ``datasets.Dataset`` (``split`` of a ``DatasetDict``)."""
    from datasets import load_from_disk

    return pick_split(load_from_disk(str(path)), split, str(path))


def pick_split(data, split: str, source: str):
    """``data[split]`` for a ``DatasetDict`` (an error lists its splits when it lacks one), else ``data``."""
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"has no split {split!r}; splits: {', '.join(data)}", source=source)
        return data[split]
    return data


def read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    """The rows of a dataset from the Hugging Face hub (needs a network connection)."""
    return load_hub_dataset(name, split).to_list()


def load_hub_dataset(name: str, split: str):
    """A dataset from the Hugging Face hub as a ``datasets.Dataset`` (needs a network connection)."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; the user needs the name and the cause
        raise DataError(
            f"is not a local file or folder, so it was read as a hub dataset (owner/name, needs a network "
            f"connection), which failed: {err}",
            source=name,
        ) from err


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write rows as jsonl, json or parquet by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json_dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json_dumps(row, ensure_ascii=False) + "\n")
