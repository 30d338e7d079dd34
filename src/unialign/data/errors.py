"""The one error type for bad input: it always says where (file, row, field) and what is wrong."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with one row of user data.

    The message reads ``<source>: row <n>, field '<field>': <problem>`` so the user can open the
    file at the row and fix it. ``row`` is 0-based in the API and printed 1-based for people.
    """

    def __init__(self, problem: str, *, source: str | None = None, row: int | None = None, field: str | None = None):
        self.problem, self.source, self.row, self.field = problem, source, row, field
        where = []
        if source:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row + 1}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


class PromptTooLong(DataError):
    """A row whose prompt alone leaves no room for a completion token: always a counted drop, never fatal."""


class DuplicateKey(DataError):
    """A JSON row that gives one key twice: which value was meant cannot be told.

    A bad row like any other in training (counted and dropped under ``on_bad_row: drop``); readers
    with no drop mode (converting, building, evaluating) refuse the file.
    """
