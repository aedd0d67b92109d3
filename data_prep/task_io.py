"""Write, read and check processed data (format ``mamo-tasks-v1``, described in docs/data.md).

Task pickles hold plain Python data only; :func:`load_task` uses an unpickler whose
``find_class`` refuses every global, so a pickle that would build any object (``os.system``,
a numpy array, ...) is refused with a :class:`DataError` naming the file.

:func:`load_processed` checks everything it returns: the manifest's keys and types, that train and
test users are disjoint, that every split user has a task, and that every task agrees with the
manifest (sizes, codes below the vocabulary sizes, ratings within the rating classes, scenario
codes). Each problem is a one-line :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import Counter
from pathlib import Path

from data_prep.raw_io import DataError, is_int, is_number

FORMAT = "mamo-tasks-v1"
MANIFEST = "manifest.json"
VOCABULARIES = "vocabularies.json"
ITEM_KEYS = "item_keys.json"
TASKS = "tasks"
FEATURE_KINDS = ("categorical", "multi_hot")
RATING_SET_LISTS = ("item_ids", "ratings", "timestamps", "scenarios")


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for dict/list/int/float/str/bool/None only: every class lookup is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def task_path(out_dir: Path, user_id: int) -> Path:
    """``OUT/tasks/<user_id>.pkl``."""
    return Path(out_dir) / TASKS / f"{user_id}.pkl"


def write_task(path: Path, task: dict) -> None:
    """Pickle one task (plain data) to ``path``."""
    Path(path).write_bytes(pickle.dumps(task, protocol=4))


def load_task(path: Path) -> dict:
    """Read one task pickle, refusing anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found, expected a task pickle")
    try:
        return PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a plain-data task pickle ({exc})") from None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented UTF-8 JSON."""
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json_object(path: Path, expected: str) -> dict:
    """A JSON file holding an object; DataError naming the file (and line) when it is absent or not that."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found, expected {expected}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text, expected {expected}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}, expected {expected}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a JSON {type(data).__name__}, expected {expected}")
    return data


def read_manifest(out_dir: Path) -> dict:
    """``OUT/manifest.json``, checked by :func:`check_manifest`."""
    path = Path(out_dir) / MANIFEST
    manifest = read_json_object(path, "the JSON manifest of a prepared data folder (python -m data_prep.prepare_data)")
    check_manifest(manifest, path)
    return manifest


def is_int_list(value) -> bool:
    """A list of ints, bools refused (the types are collected in C: this runs over every code)."""
    return isinstance(value, list) and set(map(type, value)) <= {int}


KINDS = {  # kind: (how an error message names it, its test)
    "int": ("an integer", is_int),
    "number": ("a number", is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list of int": ("a list of integers", is_int_list),
}


def shown(value) -> str:
    """``repr`` of a value, cut to 60 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def entry(path: Path, record: dict, key: str, kind: str, where: str = ""):
    """``record[key]``, which must exist and be of ``kind`` (a key of :data:`KINDS`)."""
    description, is_kind = KINDS[kind]
    if key not in record:
        raise DataError(f"{path}: missing key {where}{key}, expected {description}")
    value = record[key]
    if not is_kind(value):
        raise DataError(f"{path}: {where}{key} = {shown(value)}, expected {description}")
    return value


def check_features(path: Path, fields: list, part: str) -> None:
    """Manifest ``features[part]``: a list of ``{"name", "kind", "size"}`` with unique names."""
    names = set()
    for k, field in enumerate(fields):
        where = f"features.{part}[{k}]."
        if not isinstance(field, dict):
            raise DataError(f"{path}: features.{part}[{k}] = {shown(field)}, expected an object with name, kind, size")
        name = entry(path, field, "name", "str", where)
        kind = entry(path, field, "kind", "str", where)
        size = entry(path, field, "size", "int", where)
        allowed = ("categorical",) if part == "user" else FEATURE_KINDS
        if kind not in allowed:
            raise DataError(f"{path}: {where}kind = {kind!r}, expected one of {allowed}")
        if size < 1:
            raise DataError(f"{path}: {where}size = {size}, expected at least 1")
        if name in names:
            raise DataError(f"{path}: features.{part} names {name!r} twice, expected unique field names")
        names.add(name)


def check_manifest(manifest: dict, path: Path) -> None:
    """Keys, types and consistency of a manifest (``path`` names it in errors)."""
    found = entry(path, manifest, "format", "str")
    if found != FORMAT:
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}")
    entry(path, manifest, "dataset", "str")
    protocol = entry(path, manifest, "protocol", "dict")
    for key in ("support_size", "query_size"):
        if entry(path, protocol, key, "int", "protocol.") < 1:
            raise DataError(f"{path}: protocol.{key} = {protocol[key]}, expected at least 1")
    for key, kind in (("time_split_ratio", "number"), ("train_ratio", "number"),
                      ("item_cold_max_ratings", "int"), ("random_state", "int")):
        entry(path, protocol, key, kind, "protocol.")
    entry(path, manifest, "settings", "dict")
    entry(path, manifest, "checksums", "dict")
    rating_min, rating_max = entry(path, manifest, "rating_min", "int"), entry(path, manifest, "rating_max", "int")
    n_classes = entry(path, manifest, "n_rating_classes", "int")
    if rating_max < rating_min or n_classes != rating_max - rating_min + 1:
        raise DataError(f"{path}: n_rating_classes = {n_classes} with ratings {rating_min}..{rating_max}, "
                        f"expected rating_max - rating_min + 1 classes (at least 1)")
    features = entry(path, manifest, "features", "dict")
    for part in ("user", "item"):
        check_features(path, entry(path, features, part, "list", "features."), part)
    split = entry(path, manifest, "split", "dict")
    train, test = entry(path, split, "train", "list of int", "split."), entry(path, split, "test", "list of int", "split.")
    for name, users in (("train", train), ("test", test)):
        if len(set(users)) != len(users):
            repeated = next(u for u, count in Counter(users).items() if count > 1)
            raise DataError(f"{path}: split.{name} lists user {repeated} twice, expected each user once")
    both = sorted(set(train) & set(test))
    if both:
        raise DataError(f"{path}: user {both[0]} is in both split.train and split.test ({len(both)} users in both), "
                        "expected disjoint train and test users (test users must not be trained on)")
    for key, count in (("n_users", len(train) + len(test)), ("n_train_users", len(train)), ("n_test_users", len(test))):
        if entry(path, manifest, key, "int") != count:
            raise DataError(f"{path}: {key} = {manifest[key]}, expected {count} (the users in split)")


def first_bad(values: list, is_good) -> int:
    """Index of the first value for which ``is_good`` is false."""
    return next(k for k, value in enumerate(values) if not is_good(value))


def is_code(value, size: int) -> bool:
    """An int code into a vocabulary of ``size`` values."""
    return is_int(value) and 0 <= value < size


def code_error(path: Path, where: str, value, field: dict) -> DataError:
    """A value that is not a code of manifest feature ``field``."""
    return DataError(f"{path}: {where} = {shown(value)}, expected a code in 0..{field['size'] - 1} "
                     f"(feature {field['name']} has size {field['size']} in {MANIFEST})")


def are_codes(values: list, size: int) -> bool:
    """Every value an int code into a vocabulary of ``size`` values (fast: one pass, then min/max)."""
    return is_int_list(values) and (not values or (min(values) >= 0 and max(values) < size))


def check_codes(path: Path, values: list, field: dict, where: str) -> None:
    """Every value a code of manifest feature ``field``."""
    if not are_codes(values, field["size"]):
        k = first_bad(values, lambda v: is_code(v, field["size"]))
        raise code_error(path, f"{where}[{k}]", values[k], field)


def check_multi_hot(path: Path, values: list, field: dict, where: str) -> None:
    """Every value a list of codes of manifest feature ``field`` (checked at once, then one by one on failure)."""
    if set(map(type, values)) <= {list} and \
            are_codes([code for active in values for code in active], field["size"]):
        return
    for k, active in enumerate(values):
        if not isinstance(active, list):
            raise DataError(f"{path}: {where}[{k}] = {shown(active)}, expected a list of codes")
        check_codes(path, active, field, f"{where}[{k}]")


def check_rating_set(path: Path, rating_set, part: str, length: int, manifest: dict, user_is_new: bool) -> None:
    """A task's support or query SET against the manifest (sizes, ratings, scenarios, item codes)."""
    if not isinstance(rating_set, dict):
        raise DataError(f"{path}: {part} = {shown(rating_set)}, expected an object")
    for key in RATING_SET_LISTS:
        values = entry(path, rating_set, key, "list of int", f"{part}.")
        if len(values) != length:
            raise DataError(f"{path}: {part}.{key} has {len(values)} values, expected {length} "
                            f"(protocol {part}_size)")
    low, high = manifest["rating_min"], manifest["rating_max"]
    ratings = rating_set["ratings"]
    if min(ratings) < low or max(ratings) > high:
        k = first_bad(ratings, lambda r: low <= r <= high)
        raise DataError(f"{path}: {part}.ratings[{k}] = {ratings[k]}, expected a rating in {low}..{high} "
                        f"(manifest rating_min, rating_max)")
    scenarios, lowest = rating_set["scenarios"], 2 * user_is_new  # new users: 2, 3; existing users: 0, 1
    if min(scenarios) < lowest or max(scenarios) > lowest + 1:
        k = first_bad(scenarios, lambda s: lowest <= s <= lowest + 1)
        expected = "2 or 3 (a new user)" if user_is_new else "0 or 1 (an existing user)"
        raise DataError(f"{path}: {part}.scenarios[{k}] = {scenarios[k]}, expected {expected}")
    item_features = entry(path, rating_set, "item_features", "dict", f"{part}.")
    for field in manifest["features"]["item"]:
        name = field["name"]
        where = f"{part}.item_features.{name}"
        values = entry(path, item_features, name, "list", f"{part}.item_features.")
        if len(values) != length:
            raise DataError(f"{path}: {where} has {len(values)} values, expected {length} (one per rating)")
        if field["kind"] == "categorical":
            check_codes(path, values, field, where)
        else:
            check_multi_hot(path, values, field, where)


def check_task(task, path: Path, manifest: dict, user_id: int, split: str) -> None:
    """One task against the manifest: its user, split, user codes and both rating sets."""
    if not isinstance(task, dict):
        raise DataError(f"{path}: a {type(task).__name__}, expected a task dict")
    if entry(path, task, "user_id", "int") != user_id:
        raise DataError(f"{path}: user_id = {task['user_id']}, expected {user_id} (the file name)")
    if entry(path, task, "split", "str") != split:
        raise DataError(f"{path}: split = {task['split']!r}, expected {split!r} (the manifest's split)")
    user_is_new = entry(path, task, "user_is_new", "bool")
    codes = entry(path, task, "user_features", "list")
    fields = manifest["features"]["user"]
    if len(codes) != len(fields):
        raise DataError(f"{path}: user_features has {len(codes)} codes, expected {len(fields)} (one per user field)")
    for k, (code, field) in enumerate(zip(codes, fields)):
        if not is_code(code, field["size"]):
            raise code_error(path, f"user_features[{k}]", code, field)
    protocol = manifest["protocol"]
    for part in ("support", "query"):
        if part not in task:
            raise DataError(f"{path}: missing key {part}, expected an object")
        check_rating_set(path, task[part], part, protocol[f"{part}_size"], manifest, user_is_new)


def split_users_in_order(manifest: dict) -> list[tuple[int, str]]:
    """``[(user_id, "train" | "test"), ...]`` sorted by user id."""
    split = manifest["split"]
    return sorted([(u, "train") for u in split["train"]] + [(u, "test") for u in split["test"]])


def load_processed(out_dir: Path) -> tuple[dict, dict[int, dict]]:
    """``(manifest, {user_id: task})`` for every user of the manifest's split, all checked."""
    manifest = read_manifest(out_dir)
    tasks = {}
    for user_id, split in split_users_in_order(manifest):
        path = task_path(out_dir, user_id)
        if not path.is_file():
            raise DataError(f"{path}: not found, expected the task of user {user_id} (split.{split} of {MANIFEST})")
        tasks[user_id] = load_task(path)
        check_task(tasks[user_id], path, manifest, user_id, split)
    return manifest, tasks


def load_vocabularies(out_dir: Path, manifest: dict) -> dict[str, dict[str, list[str]]]:
    """``OUT/vocabularies.json`` (``{"user": {field: values}, "item": {...}}``), sizes checked against ``manifest``."""
    path = Path(out_dir) / VOCABULARIES
    vocabularies = read_json_object(path, 'the JSON vocabularies {"user": {field: [value, ...]}, "item": {...}}')
    for part in ("user", "item"):
        fields = entry(path, vocabularies, part, "dict")
        for field in manifest["features"][part]:
            values = entry(path, fields, field["name"], "list", f"{part}.")
            if len(values) != field["size"]:
                raise DataError(f"{path}: {part}.{field['name']} has {len(values)} values, "
                                f"expected {field['size']} (its size in {MANIFEST})")
    return vocabularies


def data_checksum(out_dir: Path) -> str:
    """md5 (hex) of a prepared folder's content: what training reads, in a fixed order.

    Hashed, for each file in turn, its path relative to ``out_dir``, a NUL byte, its size in bytes,
    a NUL byte and its bytes. Files: ``manifest.json``, ``vocabularies.json``, ``item_keys.json``
    (when present), then ``tasks/<user_id>.pkl`` of every split user in increasing user id. Equal
    checksums mean the same manifest (raw-file md5s, settings, split) and the same tasks.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    names = [MANIFEST, VOCABULARIES] + ([ITEM_KEYS] if (out_dir / ITEM_KEYS).is_file() else [])
    names += [f"{TASKS}/{user_id}.pkl" for user_id, _ in split_users_in_order(manifest)]
    digest = hashlib.md5()
    for name in names:
        path = out_dir / name
        if not path.is_file():
            raise DataError(f"{path}: not found, expected it in the prepared folder {out_dir}")
        content = path.read_bytes()
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()
