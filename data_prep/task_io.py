"""Write and read processed data (format ``mamo-tasks-v1``, see FORMAT.md).

Task pickles hold plain Python data only; :func:`load_task` uses an unpickler whose
``find_class`` refuses every global, so a pickle that would build any object (``os.system``,
a numpy array, ...) is refused with a :class:`DataError` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

from data_prep.raw_io import DataError

FORMAT = "mamo-tasks-v1"
MANIFEST = "manifest.json"
VOCABULARIES = "vocabularies.json"
TASKS = "tasks"


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
    try:
        return PlainDataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a plain-data task pickle ({exc})") from None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented UTF-8 JSON."""
    Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_manifest(out_dir: Path) -> dict:
    """``OUT/manifest.json`` as a dict."""
    return json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))


def load_processed(out_dir: Path) -> tuple[dict, dict[int, dict]]:
    """``(manifest, {user_id: task})`` for every user of the manifest's split."""
    manifest = read_manifest(out_dir)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{Path(out_dir) / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    user_ids = sorted(manifest["split"]["train"] + manifest["split"]["test"])
    return manifest, {user_id: load_task(task_path(out_dir, user_id)) for user_id in user_ids}


def data_checksum(out_dir: Path) -> str:
    """md5 (hex) over ``manifest.json`` and every ``tasks/*.pkl`` in sorted name order, each file's
    relative path and size hashed before its bytes: equal iff the processed data is the same."""
    out_dir = Path(out_dir)
    digest = hashlib.md5()
    for path in [out_dir / MANIFEST, *sorted((out_dir / TASKS).glob("*.pkl"))]:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(out_dir).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
