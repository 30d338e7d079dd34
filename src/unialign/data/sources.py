"""Dataset sources: what a name, a path or an object given as ``dataset`` means, decided in one place.

Everything that accepts data (``unialign.train``'s ``dataset`` and ``eval_dataset``, online prompts,
evaluation prompts and pairs, ``unialign data convert``/``build``, the experiment runner, the demo)
resolves it with :func:`resolve_source`. The rules, in order:

1. Objects: a ``pathlib.Path`` is a path; a ``list`` is the rows themselves; a ``datasets.Dataset``
   is that data and a ``DatasetDict`` gives the split being read.
2. ``bundled:<format>`` or ``bundled:<format>:<split>`` is the dataset shipped with unialign; the
   format must be one it has (an unknown one is an error that lists them).
3. A string naming a file or folder that exists is that path. This includes a file or folder
   literally named ``bundled``: the user's data wins over the shipped set, and a log line says so.
4. The bare word ``bundled`` is the shipped set in the caller's default format, only where the
   caller has one (training: the method's preferred format; online training: prompts).
5. A string shaped like a path (a file suffix, ``./`` or ``/`` at the start, more than one ``/``)
   that does not exist is a missing file.
6. ``owner/name`` is a Hugging Face hub dataset (needs a network connection).

:func:`read_rows` gives the rows as a list of dicts; :func:`open_table` gives them as Arrow for the
tokenization path (``unialign.data.tokenized``), without turning them into Python objects first.
"""

# Deferred imports: pyarrow datasets (seconds to load; resolving a source name or path needs neither).

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unialign.config import describe_dataset
from unialign.data.bundled import FORMATS as BUNDLED_FORMATS
from unialign.data.bundled import SPLITS as BUNDLED_SPLITS
from unialign.data.bundled import load_bundled
from unialign.data.errors import DataError, DuplicateKey
from unialign.data.io import (
    decode_jsonl_line,
    file_kind,
    load_hub_dataset,
    load_saved_dataset,
    parse_jsonl_line,
    pick_split,
    read_json,
    read_path,
)
from unialign.models import cache_dir

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
# Suffixes that make an ``owner/name``-shaped string a file path rather than a hub dataset.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv", ".txt", ".gz", ".zst")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BATCH_ROWS = 10_000


@dataclass(frozen=True)
class Source:
    """A resolved data source.

    ``kind`` is ``bundled`` (``value`` = its format), ``path`` (a ``Path``), ``hub`` (the name),
    ``rows`` (a list) or ``dataset`` (a ``datasets`` object). ``name`` is how messages, ``config.json``
    and model cards show it; ``split`` is a split fixed by the name (``bundled:pairwise:test``).
    """

    kind: str
    name: str
    value: Any
    split: str | None = None


def resolve_source(source: Any, *, bundled_default: str | None = None) -> Source:
    """Decide what ``source`` names (see the module docstring for the rules).

    Args:
        source: a string, a ``Path``, a list of row dicts, or a ``datasets.Dataset``/``DatasetDict``.
        bundled_default: the bundled format the bare word ``bundled`` means here; ``None`` where it
            means nothing (then it is an error unless a file or folder of that name exists).
    """
    if isinstance(source, Source):
        return source
    if isinstance(source, os.PathLike):
        path = Path(source)
        return Source("path", str(path), path)
    if isinstance(source, list):
        return Source("rows", describe_dataset(source), source)
    if _is_datasets_object(source):
        return Source("dataset", describe_dataset(source), source)
    if not isinstance(source, str):
        raise DataError(
            f"cannot read data from a {type(source).__name__}; give a file or folder path, bundled:<format>, "
            "a hub name (owner/name), a list of row dicts or a datasets.Dataset",
            source="dataset",
        )
    if source.startswith(f"{BUNDLED}:"):
        return _bundled(source)
    path = Path(source).expanduser()
    if path.exists():
        if source == BUNDLED:
            logger.warning(
                "'bundled' is read as the %s ./bundled in the working directory, not the shipped dataset "
                "(write bundled:<format> for that)",
                "folder" if path.is_dir() else "file",
            )
        return Source("path", source, path)
    if source == BUNDLED:
        if bundled_default is None:
            raise DataError(
                f"there is no file or folder named 'bundled' here; the shipped dataset is bundled:<format>, "
                f"format one of {', '.join(BUNDLED_FORMATS)}",
                source=source,
            )
        return _bundled(f"{BUNDLED}:{bundled_default}")
    if _looks_like_path(source):
        raise DataError("file not found", source=source)
    if _HUB_NAME.match(source):
        return Source("hub", source, source)
    raise DataError(
        "no such file or folder (a hub dataset is named owner/name; the shipped dataset is bundled:<format>)",
        source=source,
    )


def _bundled(name: str) -> Source:
    parts = name.split(":")
    fmt = parts[1] if len(parts) > 1 else ""
    if len(parts) > 3 or fmt not in BUNDLED_FORMATS:
        raise DataError(
            f"unknown bundled format {fmt!r}; write bundled:<format>[:<split>] with format one of "
            f"{', '.join(BUNDLED_FORMATS)}",
            source=name,
        )
    split = parts[2] if len(parts) == 3 else None
    if split is not None and split not in BUNDLED_SPLITS:
        raise DataError(f"unknown bundled split {split!r}; choose one of {', '.join(BUNDLED_SPLITS)}", source=name)
    return Source("bundled", name, fmt, split)


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    suffix = Path(name).suffix.lower()
    return suffix in DATA_SUFFIXES or ("/" not in name and bool(suffix))


def _is_datasets_object(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "datasets" and hasattr(value, "column_names")


def read_rows(source: Any, split: str = "train", *, bundled_default: str | None = None) -> list[dict[str, Any]]:
    """All rows of ``source`` as dicts (``split`` is read from bundled data, hub datasets and ``DatasetDict``s)."""
    resolved = resolve_source(source, bundled_default=bundled_default)
    split = resolved.split or split
    if resolved.kind == "bundled":
        return load_bundled(resolved.value, split=split)
    if resolved.kind == "rows":
        return list(resolved.value)
    if resolved.kind == "dataset":
        return pick_split(resolved.value, split, resolved.name).to_list()
    if resolved.kind == "hub":
        return load_hub_dataset(resolved.value, split).to_list()
    return read_path(resolved.value, split)


# ----------------------------------------------------------------------------- rows as Arrow
def cache_root() -> Path:
    """Where unialign keeps Arrow caches: ``$HF_DATASETS_CACHE/unialign``, else ``~/.cache/unialign/datasets``.

    (``~/.cache/unialign`` follows ``$UNIALIGN_CACHE``.) Never inside the user's data folder.
    """
    hf = os.environ.get("HF_DATASETS_CACHE")
    return Path(hf) / "unialign" if hf else cache_dir() / "datasets"


@dataclass
class RowTable:
    """A source's rows as a ``datasets.Dataset``, for ``Dataset.map``.

    ``encoding`` says how a batch becomes row dicts (:func:`decode_rows`): ``jsonl`` (each line's
    text, parsed in the worker so that a bad line is reported like any bad row), ``json`` (rows
    written as JSON text, read back exactly) or ``arrow`` (the dataset's own columns). ``digest``
    changes whenever the data do.
    """

    dataset: Any
    encoding: str
    digest: str
    name: str

    def __len__(self) -> int:
        return len(self.dataset)

    def head(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` rows; an unreadable one among them raises its :class:`DataError`.

        Rows that repeat a key are left out here: they are bad rows, which tokenization reports or drops.
        """
        batch = self.dataset[: min(count, len(self.dataset))]
        rows = decode_rows(self.encoding, batch, self.name)
        for row in rows:
            if isinstance(row, DataError) and not isinstance(row, DuplicateKey):
                raise row
        return [row for row in rows if not isinstance(row, DataError)]


def decode_rows(encoding: str, batch: dict[str, list], source: str) -> list[Any]:
    """Row dicts of one batch of a :class:`RowTable`; a row that cannot be read is its :class:`DataError`."""
    if encoding == "arrow":
        names = list(batch)
        return [dict(zip(names, values)) for values in zip(*batch.values())]
    if encoding == "json":
        return [json.loads(text) for text in batch["text"]]
    rows: list[Any] = []
    for number, text, raw in zip(batch["line"], batch["text"], batch["raw"]):
        try:
            rows.append(parse_jsonl_line(text if text is not None else decode_jsonl_line(raw, number, source),
                                         number, source))
        except DataError as err:
            rows.append(err)
    return rows


def open_table(source: Any, split: str = "train", *, bundled_default: str | None = None) -> RowTable:
    """The rows of ``source`` as a :class:`RowTable`.

    Local files are converted once into an Arrow file under :func:`cache_root` (keyed by a hash of the
    file's bytes) and memory-mapped, so a large file never sits in memory as Python objects.
    """
    resolved = resolve_source(source, bundled_default=bundled_default)
    split = resolved.split or split
    name = resolved.name
    if resolved.kind == "bundled":
        return _rows_table(load_bundled(resolved.value, split=split), name, f"bundled:{resolved.value}:{split}")
    if resolved.kind == "rows":
        return _rows_table(resolved.value, name)
    if resolved.kind == "dataset":
        data = pick_split(resolved.value, split, name)
        return RowTable(data, "arrow", f"dataset:{data._fingerprint}", name)
    if resolved.kind == "hub":
        data = load_hub_dataset(resolved.value, split)
        return RowTable(data, "arrow", f"hub:{data._fingerprint}", name)
    path: Path = resolved.value
    if path.is_dir():
        data = load_saved_dataset(path, split)
        return RowTable(data, "arrow", f"saved:{data._fingerprint}", name)
    kind = file_kind(path)
    if kind == "jsonl":
        return RowTable(_cached_arrow(path, "jsonl", _jsonl_batches), "jsonl", f"jsonl:{file_digest(path)}", name)
    if kind == "json":
        return _rows_table(read_json(path), name, f"json:{file_digest(path)}")
    return RowTable(_cached_arrow(path, "parquet", _parquet_batches), "arrow", f"parquet:{file_digest(path)}", name)


def file_digest(path: Path) -> str:
    """A hash of a file's bytes (with its size), the key of every cache derived from it."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()[:32]


def _rows_table(rows: list, name: str, digest: str | None = None) -> RowTable:
    import pyarrow as pa
    from datasets import Dataset

    texts = []
    for index, row in enumerate(rows):
        try:
            texts.append(json.dumps(row, ensure_ascii=False, default=_plain))
        except (TypeError, ValueError) as err:
            raise DataError(f"cannot be stored as JSON ({err})", source=name, row=index) from None
    if digest is None:
        hasher = hashlib.sha256()
        for text in texts:
            hasher.update(text.encode("utf-8", "surrogatepass") + b"\n")
        digest = f"rows:{hasher.hexdigest()[:32]}"
    return RowTable(Dataset(pa.table({"text": pa.array(texts, pa.large_string())})), "json", digest, name)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in user rows become their Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def _cached_arrow(path: Path, kind: str, batches) -> Any:
    """The Arrow file made from ``path`` by ``batches`` (record batches), written once per file content."""
    import pyarrow as pa
    from datasets import Dataset

    target = cache_root() / "rows" / f"{kind}-{file_digest(path)}.arrow"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            schema, produced = batches(path)
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for batch in produced:
                    writer.write_batch(batch)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return Dataset.from_file(str(target))


def _jsonl_batches(path: Path):
    """Non-blank lines of a jsonl file as (line number, text) batches; undecodable lines keep their bytes."""
    import pyarrow as pa

    schema = pa.schema([("line", pa.int64()), ("text", pa.large_string()), ("raw", pa.large_binary())])

    def produce():
        lines, texts, raws = [], [], []
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if text is not None and not text.strip():
                    continue
                lines.append(number)
                texts.append(text)
                raws.append(raw if text is None else None)
                if len(lines) == _BATCH_ROWS:
                    yield pa.record_batch([lines, texts, raws], schema=schema)
                    lines, texts, raws = [], [], []
        if lines:
            yield pa.record_batch([lines, texts, raws], schema=schema)

    return schema, produce()


def _parquet_batches(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"is not a readable parquet file ({err})", source=str(path)) from None

    def produce():
        try:
            yield from handle.iter_batches(batch_size=_BATCH_ROWS)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"is not a readable parquet file ({err})", source=str(path)) from None

    return handle.schema_arrow, produce()
