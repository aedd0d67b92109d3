"""Strict, fast readers for delimiter-separated raw rating files.

Every problem raises :class:`DataError` naming the file, the 1-based line number and what was
expected, so that a user can fix the file. Files are read whole as bytes, decoded, and split in
Python (``str.split`` per line); columns become numpy arrays through pandas' vectorised
``to_numeric``. This is about ten times faster than ``pandas.read_csv(sep='::', engine='python')``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Raw input that does not follow the expected format (file, line and expectation named)."""


@dataclass
class Table:
    """Fields of a delimited file: ``columns[name]`` is a list of str, one per record.

    ``line_numbers[k]`` is the 1-based line of record ``k`` in ``path``.
    """

    path: Path
    columns: dict[str, list[str]]
    line_numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.line_numbers)

    def error(self, record: int, expectation: str) -> DataError:
        """A DataError pointing at record ``record`` (0-based) of this table."""
        return DataError(f"{self.path}: line {int(self.line_numbers[record])}: {expectation}")


def md5_of(path: Path) -> str:
    """Hex md5 of a file's bytes."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lines(path: Path, encoding: str) -> list[str]:
    """The file's lines without line ends (LF or CRLF); trailing blank lines are dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not valid {encoding} text") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: line 1: file is empty, expected at least one record")
    return lines


def read_table(path: Path, separator: str, names: list[str], encoding: str) -> Table:
    """Split every line of ``path`` into exactly ``len(names)`` fields on ``separator``."""
    path = Path(path)
    lines = read_lines(path, encoding)
    records = [line.split(separator) for line in lines]
    field_counts = np.fromiter(map(len, records), dtype=np.int64, count=len(records))
    wrong = np.flatnonzero(field_counts != len(names))
    if wrong.size:
        k = int(wrong[0])
        raise DataError(
            f"{path}: line {k + 1}: expected {len(names)} fields "
            f"({separator.join(names)}) separated by {separator!r}, found {field_counts[k]}"
        )
    columns = dict(zip(names, map(list, zip(*records))))
    return Table(path, columns, np.arange(1, len(lines) + 1, dtype=np.int64))


def int_column(table: Table, name: str, low: int | None = None, high: int | None = None) -> np.ndarray:
    """Column ``name`` as int64, every value an integer in ``[low, high]`` (bounds optional)."""
    values = pd.to_numeric(pd.Series(table.columns[name], dtype=object).str.strip(), errors="coerce")
    numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
    invalid = ~np.isfinite(numbers) | (numbers != np.round(numbers))
    if low is not None:
        invalid |= numbers < low
    if high is not None:
        invalid |= numbers > high
    bad = np.flatnonzero(invalid)
    if bad.size:
        k = int(bad[0])
        raise table.error(k, f"field {name} = {table.columns[name][k]!r}, expected an integer{bounds}")
    return numbers.astype(np.int64)


def choice_column(table: Table, name: str, allowed: set[str]) -> list[str]:
    """Column ``name`` (stripped), every value one of ``allowed``."""
    values = [value.strip() for value in table.columns[name]]
    for k, value in enumerate(values):
        if value not in allowed:
            raise table.error(k, f"field {name} = {value!r}, expected one of {sorted(allowed)}")
    return values


def unique_ids(table: Table, name: str) -> np.ndarray:
    """Column ``name`` as positive int64 ids, each appearing once."""
    ids = int_column(table, name, low=1)
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size:
        duplicate_value = ids[first[repeated[0]]]
        k = int(np.flatnonzero(ids == duplicate_value)[1])
        raise table.error(k, f"{name} {duplicate_value} appears twice, expected unique ids")
    return ids
