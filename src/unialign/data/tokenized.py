"""Tokenized datasets kept in Arrow: the data path for datasets of millions of rows.

:func:`tokenize_table` runs every row through the same per-row code as
:func:`~unialign.data.tokenize.tokenize_rows` (``validate_row`` then ``tokenize_example``) inside
``datasets.Dataset.map``, in ``num_proc`` worker processes when asked, and writes token ids to an
Arrow cache file. A second run with the same data, tokenizer (vocabulary, chat template, special
tokens), format and length settings memory-maps that file instead of tokenizing again.

:class:`TokenizedDataset` is what the trainer gets: a ``torch.utils.data.Dataset`` whose items are
:class:`~unialign.data.tokenize.TokenizedExample` objects built when asked for, so the rows stay in
Arrow rather than as Python lists of ints (about 30 bytes per token id). Values computed later
(precomputed reference log-probs) live in a compact side store that items merge in, and KTO's
mismatched completions are an index of partner rows.

Columns follow ``dataclasses.fields(TokenizedExample)``: each field's type annotation gives its Arrow
type (lists of ints as int32 token ids, floats as float64 so values round-trip exactly), and a field
of a type Arrow columns do not express is stored as JSON text. New fields travel without changes here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Features, is_caching_enabled
from datasets.fingerprint import Hasher

import unialign.data.tokenize as tokenization
from unialign.data.errors import DataError, DuplicateKey
from unialign.data.sources import RowTable, cache_root, decode_rows
from unialign.data.tokenize import (
    DropReport,
    TokenizedExample,
    drop_reason,
    is_fatal,
    tokenize_one,
)

logger = logging.getLogger(__name__)

# Bump when the cache file's columns or their meaning change.
LAYOUT_VERSION = "1"
KEPT, DROPPED, FATAL, SKIPPED = 0, 1, 2, 3
_STATUS, _REASON, _ERROR = "__status", "__reason", "__error"
_UNSET = object()


# ----------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class FieldCodec:
    """How one :class:`TokenizedExample` field is stored: its Arrow type, or JSON text (``as_json``)."""

    name: str
    arrow_type: pa.DataType
    as_json: bool = False

    def encode(self, value: Any) -> Any:
        """The column value of ``value``."""
        return json.dumps(value) if self.as_json and value is not None else value

    def decode(self, value: Any) -> Any:
        """The field value of a column value."""
        return json.loads(value) if self.as_json and value is not None else value


def field_codecs() -> list[FieldCodec]:
    """One codec per field of :class:`TokenizedExample`, in declaration order."""
    hints = typing.get_type_hints(TokenizedExample)
    codecs = []
    for item in dataclasses.fields(TokenizedExample):
        arrow_type = _arrow_type(hints[item.name])
        codecs.append(FieldCodec(item.name, arrow_type or pa.large_string(), as_json=arrow_type is None))
    return codecs


def _arrow_type(hint: Any) -> pa.DataType | None:
    """The Arrow type for a field annotation, or ``None`` when it has no faithful one."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _arrow_type(options[0]) if len(options) == 1 else None
    if origin is list:
        (inner,) = typing.get_args(hint) or (None,)
        inner_type = _arrow_type(inner)
        if inner_type is None:
            return None
        return pa.list_(pa.int32() if inner_type == pa.int64() else inner_type)  # ints in lists are token ids
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.large_string()}.get(hint)


def _schema(codecs: list[FieldCodec]) -> pa.Schema:
    status = [(_STATUS, pa.int8()), (_REASON, pa.large_string()), (_ERROR, pa.large_string())]
    return pa.schema(status + [(c.name, c.arrow_type) for c in codecs])


# ----------------------------------------------------------------------------- the cache key
def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything of a tokenizer that changes token ids: vocabulary and pipeline, chat template, specials."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: datasets' own hashing of the object
        digest.update(Hasher.hash(tokenizer).encode())
    added = sorted((int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    for part in (
        tokenizer.chat_template,
        sorted((k, repr(v)) for k, v in tokenizer.special_tokens_map.items()),
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        len(tokenizer),
        added,
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    ):
        digest.update(repr(part).encode() + b"\0")
    return digest.hexdigest()[:32]


def cache_fingerprint(table: RowTable, fmt: str, tokenizer, *, max_length: int, max_prompt_length: int | None,
                      on_bad_row: str, score_range, codecs: list[FieldCodec], split_special_tokens: bool = True) -> str:
    """The key of a tokenized cache: changes with the data, the tokenizer, the settings and the tokenization code."""
    parts = {
        "tokenization": tokenization.TOKENIZATION_VERSION,  # read at call time: a bump invalidates caches
        "layout": LAYOUT_VERSION,
        "fields": [(c.name, str(c.arrow_type), c.as_json) for c in codecs],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": fmt,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "score_range": list(score_range) if score_range is not None else None,
        "on_bad_row": on_bad_row,  # "error" stops a worker at its first bad row, so the files differ
        "split_special_tokens": split_special_tokens,
        "data": table.digest,
        "encoding": table.encoding,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


# ----------------------------------------------------------------------------- tokenizing
class _TokenizeBatch:
    """The ``Dataset.map`` function: one batch of raw rows in, one status and the fields per row out.

    A bad row never raises in a worker (a traceback from a child process helps nobody): it is recorded
    as its error or its drop reason, and :func:`tokenize_table` raises or counts it in the main process.
    Under ``on_bad_row: error`` a worker skips the rest of its rows after its first fatal one; workers
    get contiguous shards, so the first fatal row over all shards is the first bad row of the dataset.
    """

    def __init__(self, table: RowTable, fmt: str, tokenizer, max_length: int, max_prompt_length: int | None,
                 score_range, on_bad_row: str, codecs: list[FieldCodec], split_special_tokens: bool = True):
        self.encoding, self.source = table.encoding, table.name
        self.fmt, self.tokenizer = fmt, tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.score_range, self.on_bad_row, self.codecs = score_range, on_bad_row, codecs
        self.split_special_tokens = split_special_tokens
        self.failed = False

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in (_STATUS, _REASON, _ERROR, *(c.name for c in self.codecs))}
        for index, row in zip(indices, decode_rows(self.encoding, batch, self.source)):
            status, reason, error, example = SKIPPED, None, None, None
            if not self.failed:
                result = row if isinstance(row, DataError) else tokenize_one(
                    row, self.fmt, index, self.source, self.tokenizer, self.max_length, self.max_prompt_length,
                    self.score_range, self.split_special_tokens,
                )
                if isinstance(result, TokenizedExample):
                    status, example = KEPT, result
                elif unreadable(row) or is_fatal(result, self.on_bad_row):
                    status, error, self.failed = FATAL, _error_to_json(result), True
                else:
                    status, reason = DROPPED, drop_reason(result)
            out[_STATUS].append(status)
            out[_REASON].append(reason)
            out[_ERROR].append(error)
            for codec in self.codecs:
                out[codec.name].append(codec.encode(getattr(example, codec.name)) if example is not None else None)
        return out


def unreadable(row: Any) -> bool:
    """A line that is not a row at all (malformed JSON, bad UTF-8): always fatal, whatever ``on_bad_row``.

    A row that repeats a key was read, and is a bad row like one that fails validation.
    """
    return isinstance(row, DataError) and not isinstance(row, DuplicateKey)


def _error_to_json(error: DataError) -> str:
    return json.dumps({"type": type(error).__name__, "problem": error.problem, "row": error.row, "field": error.field})


def _error_from_json(text: str, source: str) -> DataError:
    """The :class:`DataError` (of its original subclass) a worker recorded, naming ``source``."""
    info = json.loads(text)
    classes, kind = [DataError], DataError
    while classes:
        cls = classes.pop()
        if cls.__name__ == info["type"]:
            kind = cls
            break
        classes.extend(cls.__subclasses__())
    return kind(info["problem"], source=source, row=info["row"], field=info["field"])


def tokenize_table(
    table: RowTable,
    fmt: str,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None,
    on_bad_row: str = "error",
    score_range: tuple[float, float] | None = None,
    split_special_tokens: bool = True,
    num_proc: int | None = None,
) -> tuple[TokenizedDataset, DropReport]:
    """Validate and tokenize every row of ``table`` into a cached :class:`TokenizedDataset`.

    The same rules as :func:`~unialign.data.tokenize.tokenize_rows`: over-long prompts are always
    dropped and counted; other bad rows raise a :class:`DataError` naming source, row and field (the
    first in row order, whatever ``num_proc``), or with ``on_bad_row="drop"`` are counted by reason.
    """
    if not len(table):
        raise DataError("has no rows", source=table.name)
    codecs = field_codecs()
    key = cache_fingerprint(table, fmt, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                            on_bad_row=on_bad_row, score_range=score_range, codecs=codecs,
                            split_special_tokens=split_special_tokens)
    target = cache_root() / "tokenized" / f"{key}.arrow"
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = is_caching_enabled() and (target.exists() or any(target.parent.glob(f"{key}_*_of_*.arrow")))
    if cached:
        logger.info("%s: reusing its tokenized cache %s", table.name, target.name)
    mapped = table.dataset.map(
        _TokenizeBatch(
            table, fmt, tokenizer, max_length, max_prompt_length, score_range, on_bad_row, codecs, split_special_tokens
        ),
        batched=True,
        with_indices=True,
        remove_columns=table.dataset.column_names,
        features=Features.from_arrow_schema(_schema(codecs)),
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        cache_file_name=str(target),
        new_fingerprint=key,
        desc=f"tokenizing {table.name}",
    )
    status = mapped.data.table.column(_STATUS).to_numpy()
    fatal = np.flatnonzero(status == FATAL)
    if fatal.size:
        raise _error_from_json(mapped.data.table.column(_ERROR)[int(fatal[0])].as_py(), table.name)
    report = DropReport(total=len(table))
    dropped = np.flatnonzero(status == DROPPED)
    for index, reason in zip(dropped.tolist(), mapped.data.table.column(_REASON).take(dropped).to_pylist()):
        report.add(reason, index)
    if report.dropped:
        logger.warning("%s: %s", table.name, report.summary())
    kept = np.flatnonzero(status == KEPT)
    if not kept.size:
        raise DataError(f"no usable rows ({report.summary()})", source=table.name)
    return TokenizedDataset(mapped, kept, codecs, from_cache=cached), report


# ----------------------------------------------------------------------------- the lazy dataset
class _SideColumn:
    """Values of one field set after tokenization, as numpy arrays (float fields) or a Python list."""

    def __init__(self, size: int, codec: FieldCodec):
        self.kind = "object"
        if codec.arrow_type == pa.float64():
            self.kind = "float"
        elif pa.types.is_list(codec.arrow_type) and codec.arrow_type.value_type == pa.float64():
            self.kind = "floats"
        self.present = np.zeros(size, dtype=bool)
        self.values: Any = np.zeros(size) if self.kind == "float" else np.zeros((size, 0))
        if self.kind == "object":
            self.values = [None] * size
        self.widths = np.zeros(size, dtype=np.int32)

    def set(self, indices: Sequence[int], values: Sequence[Any]) -> None:
        for index, value in zip(indices, values):
            self.present[index] = value is not None
            if value is None:
                continue
            if self.kind == "float":
                self.values[index] = value
            elif self.kind == "floats":
                if len(value) > self.values.shape[1]:
                    grown = np.zeros((len(self.values), len(value)))
                    grown[:, : self.values.shape[1]] = self.values
                    self.values = grown
                self.values[index, : len(value)] = value
                self.widths[index] = len(value)
            else:
                self.values[index] = value

    def get(self, index: int) -> Any:
        if not self.present[index]:
            return _UNSET
        if self.kind == "float":
            return float(self.values[index])
        if self.kind == "floats":
            return self.values[index, : self.widths[index]].tolist()
        return self.values[index]


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized rows in Arrow; ``dataset[i]`` is a :class:`TokenizedExample`, built on access.

    Args:
        data: the ``datasets.Dataset`` :func:`tokenize_table` wrote (one row per source row).
        positions: the table row of each kept example, in order.
        codecs: the stored fields (:func:`field_codecs`).
        from_cache: whether ``data`` was loaded from an earlier run's cache.
    """

    def __init__(self, data, positions: np.ndarray, codecs: list[FieldCodec], from_cache: bool = False):
        self.data = data
        self.positions = np.asarray(positions, dtype=np.int64)
        self.codecs = codecs
        self.from_cache = from_cache
        self._side: dict[str, _SideColumn] = {}
        self._kl_partner: np.ndarray | None = None
        self._kl_max_length = 0
        self._table = self._fields_table()

    def _fields_table(self) -> pa.Table:
        return self.data.data.table.select([c.name for c in self.codecs])

    def __getstate__(self) -> dict:
        # The Arrow table is memory-mapped; pickling it would copy every row into the receiving process
        # (DataLoader workers). The datasets.Dataset pickles as a reference to its files.
        state = dict(self.__dict__)
        state.pop("_table")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._table = self._fields_table()

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.__getitems__(range(len(self))[index])
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} rows")
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[TokenizedExample]:
        """Several items with one Arrow read (``torch.utils.data.DataLoader`` calls this for a batch)."""
        wanted = np.asarray(indices, dtype=np.int64)
        if wanted.size == 0:
            return []
        rows = self._table.take(self.positions[wanted]).to_pylist()
        partners = None
        if self._kl_partner is not None:
            taken = self._table.select(["completion_ids"]).take(self.positions[self._kl_partner[wanted]])
            partners = taken.column(0).to_pylist()
        examples = []
        for k, (index, row) in enumerate(zip(wanted.tolist(), rows)):
            values = {codec.name: codec.decode(row[codec.name]) for codec in self.codecs}
            for name, column in self._side.items():
                value = column.get(index)
                if value is not _UNSET:
                    values[name] = value
            if partners is not None:
                values["kl_completion_ids"] = partners[k][0][: self._kl_max_length - len(values["prompt_ids"])]
            examples.append(TokenizedExample(**values))
        return examples

    def __iter__(self) -> Iterator[TokenizedExample]:
        for start in range(0, len(self), 512):
            yield from self.__getitems__(range(start, min(len(self), start + 512)))

    # -- values set after tokenization
    def set_values(self, name: str, indices: Sequence[int], values: Sequence[Any]) -> None:
        """Set field ``name`` of the items at ``indices`` (e.g. precomputed reference log-probs)."""
        if name not in self._side:
            codec = next((c for c in self.codecs if c.name == name), None)
            if codec is None:
                raise AttributeError(f"TokenizedExample has no field {name!r}")
            self._side[name] = _SideColumn(len(self), codec)
        self._side[name].set(indices, values)

    def values(self, name: str) -> list[Any]:
        """Field ``name`` of every item, in order (what ``[getattr(e, name) for e in dataset]`` gives)."""
        if name == "kl_completion_ids" and self._kl_partner is not None:
            return [e.kl_completion_ids for e in self]
        codec = next(c for c in self.codecs if c.name == name)
        stored = [codec.decode(v) for v in self._table.column(name).take(self.positions).to_pylist()]
        side = self._side.get(name)
        if side is not None:
            for index in np.flatnonzero(side.present).tolist():
                stored[index] = side.get(index)
        return stored

    def attach_kl_pairs(self, max_length: int) -> None:
        """KTO's mismatched pairs, as :func:`unialign.data.tokenize.attach_kl_pairs` makes them.

        Each item gets the first completion of the next item (cyclically) whose prompt differs, cut to
        ``max_length`` with its own prompt. Stored as one partner index per item.
        """
        keys = [hashlib.blake2b(ids.tobytes(), digest_size=16).digest() for ids in self._id_lists("prompt_ids")]
        count = len(keys)
        following = np.full(count, -1, dtype=np.int64)  # first later item with another prompt, without wrapping
        for index in range(count - 2, -1, -1):
            following[index] = index + 1 if keys[index + 1] != keys[index] else following[index + 1]
        if following[0] == -1 and keys[0] == keys[-1]:
            raise DataError(
                "KTO's KL estimate pairs each prompt with another prompt's completion; "
                "the dataset needs at least two different prompts"
            )
        # The last run of equal prompts wraps around to the start.
        following[following == -1] = 0 if keys[0] != keys[-1] else following[0]
        self._kl_partner, self._kl_max_length = following, max_length

    # -- whole-column views, without building items
    def _id_lists(self, name: str, indices: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Each item's ``name`` (a list of ints field) as an int64 array, read in chunks."""
        positions = self.positions if indices is None else self.positions[indices]
        for start in range(0, len(positions), 8192):
            array = self._table.column(name).take(positions[start : start + 8192]).combine_chunks()
            offsets, values = array.offsets.to_numpy(), array.values.to_numpy().astype(np.int64)
            for i in range(len(array)):
                yield values[offsets[i] : offsets[i + 1]]

    def token_arrays(self) -> Iterator[list[np.ndarray]]:
        """Per item: prompt ids, each completion's ids, the KL completion's ids (empty if none), as int64 arrays."""
        for start in range(0, len(self), 4096):
            wanted = np.arange(start, min(len(self), start + 4096))
            prompts = list(self._id_lists("prompt_ids", wanted))
            completions = self._nested_ids(self.positions[wanted])
            if self._kl_partner is not None:
                firsts = [c[0] for c in self._nested_ids(self.positions[self._kl_partner[wanted]])]
                kls = [f[: self._kl_max_length - len(p)] for f, p in zip(firsts, prompts)]
            else:
                kls = [np.asarray(v or [], dtype=np.int64) for v in
                       self._table.column("kl_completion_ids").take(self.positions[wanted]).to_pylist()]
            for prompt, items, kl in zip(prompts, completions, kls):
                yield [prompt, *items, kl]

    def _nested_ids(self, positions: np.ndarray) -> list[list[np.ndarray]]:
        array = self._table.column("completion_ids").take(positions).combine_chunks()
        outer, inner = array.offsets.to_numpy(), array.values
        inner_offsets, values = inner.offsets.to_numpy(), inner.values.to_numpy().astype(np.int64)
        return [
            [values[inner_offsets[j] : inner_offsets[j + 1]] for j in range(outer[i], outer[i + 1])]
            for i in range(len(array))
        ]

    def list_lengths(self, name: str) -> np.ndarray:
        """Length of each item's list field ``name`` (0 where it is None)."""
        lengths = pc.fill_null(pc.list_value_length(self._table.column(name)), 0).to_numpy()
        return lengths[self.positions]

    def first_tokens(self, name: str = "prompt_ids") -> np.ndarray:
        """Each item's first token of ``name``."""
        return pc.fill_null(pc.list_element(self._table.column(name), 0), -1).to_numpy()[self.positions]

    def is_none(self, name: str) -> np.ndarray:
        """Whether each item's field ``name`` is None."""
        return pc.is_null(self._table.column(name)).to_numpy(zero_copy_only=False)[self.positions]

    def example_lengths(self, packed: bool) -> list[int]:
        """:func:`unialign.trainer.example_length` of every item, from the Arrow lengths alone."""
        prompt = self.list_lengths("prompt_ids")
        column = self._table.column("completion_ids").combine_chunks()
        offsets = column.offsets.to_numpy()
        rows, sizes = len(column), np.diff(offsets)
        inner = pc.list_value_length(column.values).to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        inner = inner.astype(np.int64)
        owner = np.repeat(np.arange(rows), sizes)
        total = np.bincount(owner, weights=inner, minlength=rows).astype(np.int64)[self.positions]
        present = np.bincount(owner, weights=inner > 0, minlength=rows).astype(np.int64)[self.positions]
        longest = np.zeros(rows, dtype=np.int64)
        np.maximum.at(longest, owner, inner)
        longest = longest[self.positions]
        if self._kl_partner is not None:
            first = np.zeros(rows, dtype=np.int64)
            first[sizes > 0] = inner[(offsets[:-1] - offsets[0])[sizes > 0]]
            kl = np.minimum(first[self.positions[self._kl_partner]], self._kl_max_length - prompt)
        else:
            kl = self.list_lengths("kl_completion_ids")
        count = present + (kl > 0)
        packed_length = prompt + total + kl
        plain_length = prompt + np.maximum(longest, kl)
        return np.where(packed & (count > 1), packed_length, plain_length).tolist()


# ----------------------------------------------------------------------------- lists or lazy datasets
def store_values(examples, name: str, indices: Sequence[int], values: Sequence[Any]) -> None:
    """Set field ``name`` of ``examples[i]`` for each ``i`` in ``indices``: a list of examples or a TokenizedDataset."""
    if isinstance(examples, TokenizedDataset):
        examples.set_values(name, indices, values)
        return
    for index, value in zip(indices, values):
        setattr(examples[index], name, value)


def field_values(examples, name: str) -> list[Any]:
    """Field ``name`` of every example, in order, for a list of examples or a TokenizedDataset."""
    if isinstance(examples, TokenizedDataset):
        return examples.values(name)
    return [getattr(e, name) for e in examples]


def token_arrays(examples) -> Iterator[Sequence[Any]]:
    """Per example: prompt ids, each completion's ids and the KL completion's ids (empty when none)."""
    if isinstance(examples, TokenizedDataset):
        yield from examples.token_arrays()
        return
    for example in examples:
        yield [example.prompt_ids, *example.completion_ids, example.kl_completion_ids or []]


def max_completions(examples) -> int:
    """The most completions any example has."""
    if isinstance(examples, TokenizedDataset):
        return int(examples.list_lengths("completion_ids").max())
    return max(len(e.completion_ids) for e in examples)
