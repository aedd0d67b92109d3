"""Feature vocabularies (built from the data, sorted, saved) and integer encoders.

A vocabulary is the sorted list of a field's distinct str values: numbers first in numeric order
(ages, years, occupation codes), then other strings in code-point order (so ``nan`` and names
sort alphabetically). A value's code is its index in the vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_prep.protocol import RawDataset


def vocabulary_order(value: str) -> tuple:
    """Sort key: integers numerically before any other string; others by code point."""
    is_integer = value.lstrip("-").isdigit()
    return (0, int(value), "") if is_integer else (1, 0, value)


def field_values(column: pd.Series, kind: str) -> set[str]:
    """Distinct values of a categorical column, or of all tuples of a multi-hot column."""
    if kind == "multi_hot":
        return {value for values in column for value in values}
    return set(column)


def build_vocabularies(raw: RawDataset) -> dict[str, dict[str, list[str]]]:
    """``{"user": {field: sorted values}, "item": {...}}`` over all rows of the users and items files.

    Built over every row (not only kept users and items), so that ML-1M's sizes match the released
    lists (genre 25, director 2,186, both with ``nan``).
    """
    users, items = raw.users, raw.items
    return {
        "user": {name: sorted(field_values(users[name], kind), key=vocabulary_order) for name, kind in raw.user_fields},
        "item": {name: sorted(field_values(items[name], kind), key=vocabulary_order) for name, kind in raw.item_fields},
    }


def encode_table(table: pd.DataFrame, fields: list[tuple[str, str]], vocabularies: dict[str, list[str]]) -> dict:
    """Per row id, per field: a code (categorical) or a sorted list of codes (multi-hot).

    Returns ``{field name: {row id: int | list[int]}}``.
    """
    encoded = {}
    for name, kind in fields:
        code = {value: index for index, value in enumerate(vocabularies[name])}
        if kind == "multi_hot":
            encoded[name] = {row: sorted(code[v] for v in values) for row, values in table[name].items()}
        else:
            encoded[name] = {row: code[value] for row, value in table[name].items()}
    return encoded


def feature_schema(fields: list[tuple[str, str]], vocabularies: dict[str, list[str]]) -> list[dict]:
    """Manifest ``features`` entries: ``[{"name", "kind", "size"}, ...]`` in field order."""
    return [{"name": name, "kind": kind, "size": len(vocabularies[name])} for name, kind in fields]


def save_vocabularies(vocabularies: dict, path: Path) -> None:
    """Write vocabularies as JSON (UTF-8, stable key order)."""
    Path(path).write_text(json.dumps(vocabularies, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

