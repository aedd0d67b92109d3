"""Strict, fast readers for delimiter-separated raw rating files.

Every problem raises :class:`DataError` naming the file, the 1-based line number and what was
expected, so that a user can fix the file. Files are read whole as bytes and decoded; after
checking every line's separator count, the lines are joined and split once, and integer columns
are parsed with ``int`` into numpy arrays. For 1,000,000 ``ratings.dat`` lines this takes about
1.7 s on 2 cores, against 3.5 s for ``pandas.read_csv(sep='::', engine='python')``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Raw input that does not follow the expected format (file, line and expectation named)."""


def is_int(value) -> bool:
    """An int that is not a bool (JSON true/false load as bool, a subclass of int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    """The file's lines without line ends (LF or CRLF); trailing blank lines are dropped.

    Only LF ends a line: ``str.splitlines`` would also split at characters such as NEL (byte
    0x85 in latin-1, the cp1252 ellipsis found in Book-Crossing titles) and shift line numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not valid {encoding} text") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: line 1: file is empty, expected at least one record")
    return lines


def read_table(path: Path, separator: str, names: list[str], encoding: str) -> Table:
    """Split every line of ``path`` into exactly ``len(names)`` fields on ``separator``."""
    path = Path(path)
    lines = read_lines(path, encoding)
    separator_counts = np.fromiter((line.count(separator) for line in lines), dtype=np.int64, count=len(lines))
    wrong = np.flatnonzero(separator_counts != len(names) - 1)
    if wrong.size:
        k = int(wrong[0])
        raise DataError(
            f"{path}: line {k + 1}: expected {len(names)} fields "
            f"({separator.join(names)}) separated by {separator!r}, found {separator_counts[k] + 1}"
        )
    fields = separator.join(lines).split(separator)
    columns = {name: fields[k::len(names)] for k, name in enumerate(names)}
    return Table(path, columns, np.arange(1, len(lines) + 1, dtype=np.int64))


def first_non_integer(values: list[str]) -> int:
    """Index of the first value that is not an int64 integer (``int()`` syntax)."""
    for k, value in enumerate(values):
        try:
            if not -(2**63) <= int(value) < 2**63:
                return k
        except ValueError:
            return k
    raise AssertionError("every value is an int64 integer")


def int_column(table: Table, name: str, low: int | None = None, high: int | None = None) -> np.ndarray:
    """Column ``name`` as int64, every value an integer in ``[low, high]`` (bounds optional)."""
    values = table.columns[name]
    bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
    try:
        numbers = np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, OverflowError):
        k = first_non_integer(values)
        raise table.error(k, f"field {name} = {values[k]!r}, expected an integer{bounds}") from None
    out_of_range = np.zeros(len(numbers), dtype=bool)
    if low is not None:
        out_of_range |= numbers < low
    if high is not None:
        out_of_range |= numbers > high
    if out_of_range.any():
        k = int(out_of_range.argmax())
        raise table.error(k, f"field {name} = {values[k]!r}, expected an integer{bounds or f' >= {low}'}")
    return numbers


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
