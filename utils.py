"""Shared utilities: rating predictions, metrics (docs/method.md, Evaluation), reproducibility, devices, files.

Array arguments accept numpy arrays, torch tensors or sequences; metrics are computed in float64
numpy and returned as plain Python numbers so that results are JSON-serialisable.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.protocol import SCENARIOS

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

#: Subsets of an evaluation table, in report order.
SUBSETS = SCENARIOS + ("all",)


def _to_numpy(x) -> np.ndarray:
    """A numpy view/copy of `x` (torch tensors are detached and moved to CPU), dtype kept."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_float64(x, name: str, ndim: int) -> np.ndarray:
    """`x` as a float64 array of exactly `ndim` dimensions; ValueError if not, or not finite."""
    array = _to_numpy(x).astype(np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


# ---------------------------------------------------------------------------------------------
# Rating predictions from class probabilities
# ---------------------------------------------------------------------------------------------


def expected_rating(probs, rating_min: int = 1) -> np.ndarray:
    """Probability-weighted rating per row.

    probs: [N, C] class probabilities (class c is rating `rating_min + c`).
    Returns [N] float64: sum_c probs[n, c] * (rating_min + c).
    """
    probs = _to_float64(probs, "probs", ndim=2)
    return probs @ (rating_min + np.arange(probs.shape[1], dtype=np.float64))


def point_prediction(probs, rating_min: int = 1, mode: str = "argmax") -> np.ndarray:
    """One predicted rating per row of probs [N, C]; returns [N] float64.

    mode "argmax": the most probable class + rating_min (ties: the lowest class, as numpy/torch
    argmax), the released code's prediction. mode "expected": `expected_rating`.
    """
    if mode == "expected":
        return expected_rating(probs, rating_min)
    if mode != "argmax":
        raise ValueError(f"mode must be 'argmax' or 'expected', got {mode!r}")
    probs = _to_float64(probs, "probs", ndim=2)
    return (np.argmax(probs, axis=1) + rating_min).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Ranking metrics (one user's items)
# ---------------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _cut_discounts(n: int, k: int) -> np.ndarray:
    """[n] discounts 1 / log2(position + 1) for 1-based positions <= min(k, n), 0 beyond."""
    cut = min(k, n)
    discounts = np.zeros(n, dtype=np.float64)
    discounts[:cut] = 1.0 / np.log2(np.arange(2, cut + 2, dtype=np.float64))
    return discounts


def dcg(scores, ratings, k: int = 3) -> float:
    """Tie-aware DCG@k of one user's items (McSherry & Najork, 2008).

    scores: [n] ranking scores (higher ranks first); ratings: [n] true ratings.
    Gain 2^rating - 1, discount 1 / log2(position + 1), 1-based positions, cut at min(k, n).
    Items with equal scores form a tied group that shares the average of the discounts of the
    positions it occupies (positions beyond the cut count as discount 0), so the result does not
    depend on input order. Empty input gives 0.0.
    """
    _check_k(k)
    scores = _to_float64(scores, "scores", ndim=1)
    ratings = _to_float64(ratings, "ratings", ndim=1)
    if scores.shape != ratings.shape:
        raise ValueError(f"scores {scores.shape} and ratings {ratings.shape} differ in shape")
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    group = np.concatenate(([0], np.cumsum(ranked[1:] != ranked[:-1])))  # tie group per position
    discounts = _cut_discounts(scores.size, k)
    group_discount = np.bincount(group, weights=discounts) / np.bincount(group)
    gains = np.exp2(ratings[order]) - 1.0
    return float(np.sum(gains * group_discount[group]))


def ndcg_at_k(scores, ratings, k: int = 3) -> float | None:
    """Tie-aware NDCG@k of one user's items: `dcg` divided by the ideal DCG of the same items.

    scores, ratings: [n]. The ideal DCG ranks the items by true rating, cut at min(k, n).
    Returns None when undefined: no items, or ideal DCG 0 (every gain 0, i.e. all ratings 0);
    callers skip such users. One item gives 1.0.
    """
    _check_k(k)
    ratings = _to_float64(ratings, "ratings", ndim=1)
    if ratings.size == 0:
        return None
    ideal_gains = np.sort(np.exp2(ratings) - 1.0)[::-1]
    ideal = float(np.sum(ideal_gains * _cut_discounts(ratings.size, k)))
    if ideal == 0.0:
        return None
    return dcg(scores, ratings, k) / ideal


# ---------------------------------------------------------------------------------------------
# Evaluation table (docs/method.md, Evaluation) and its text report
# ---------------------------------------------------------------------------------------------


def _subset_metrics(users, truth, predicted, scores, k: int) -> dict:
    """MAE, RMSE and mean per-user NDCG@k of one subset of ratings, with the counts behind them."""
    key = f"ndcg@{k}"
    if truth.size == 0:
        return {"mae": None, "rmse": None, key: None,
                "n_ratings": 0, "n_users": 0, "n_ndcg_users": 0}
    errors = predicted - truth
    unique_users, inverse = np.unique(users, return_inverse=True)
    by_user = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    user_ndcgs = [ndcg_at_k(scores[items], truth[items], k) for items in by_user if items.size >= 2]
    user_ndcgs = [value for value in user_ndcgs if value is not None]
    return {
        "mae": float(np.mean(np.abs(errors))),
        "rmse": float(np.sqrt(np.mean(errors**2))),
        key: float(np.mean(user_ndcgs)) if user_ndcgs else None,
        "n_ratings": int(truth.size),
        "n_users": int(unique_users.size),
        "n_ndcg_users": len(user_ndcgs),
    }


def evaluation_table(user_ids, scenarios, true_ratings, predicted_ratings, ranking_scores,
                     k: int = 3) -> dict:
    """Per-scenario and overall metrics of the test users' query ratings (docs/method.md, Evaluation).

    All arguments are [N], one entry per query rating: user id, scenario code 0..3, true rating,
    predicted rating (for MAE/RMSE) and ranking score (for NDCG, e.g. the expected rating).

    Returns {subset: row} for subset in SCENARIOS + ("all",), row = {"mae", "rmse", f"ndcg@{k}",
    "n_ratings", "n_users", "n_ndcg_users"}. MAE and RMSE cover every rating of the subset.
    NDCG@k is computed per user on that user's items of the subset, only for users with at least
    2 of them (cut at min(k, n), ties as in `dcg`), then averaged over those users;
    n_ndcg_users counts them. n_users counts users with at least one rating in the subset.
    An empty subset has None metrics and zero counts. Values are plain floats, ints or None.
    """
    _check_k(k)
    users = _to_numpy(user_ids)
    codes = _to_numpy(scenarios)
    truth = _to_float64(true_ratings, "true_ratings", ndim=1)
    predicted = _to_float64(predicted_ratings, "predicted_ratings", ndim=1)
    scores = _to_float64(ranking_scores, "ranking_scores", ndim=1)
    n = truth.size
    for name, array in (("user_ids", users), ("scenarios", codes), ("predicted_ratings", predicted),
                        ("ranking_scores", scores)):
        if array.shape != (n,):
            raise ValueError(f"{name} has shape {array.shape}, expected ({n},) like true_ratings")
    if not np.isin(codes, np.arange(len(SCENARIOS))).all():
        found = sorted(set(codes.tolist()))
        raise ValueError(f"scenario codes must be in 0..{len(SCENARIOS) - 1}, got {found}")
    table = {}
    for code, name in enumerate(SCENARIOS):
        mask = codes == code
        table[name] = _subset_metrics(users[mask], truth[mask], predicted[mask], scores[mask], k)
    table["all"] = _subset_metrics(users, truth, predicted, scores, k)
    return table


def format_cell(value) -> str:
    """A table cell: floats to 4 decimals, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_results(results: dict) -> str:
    """Fixed-width text report of {method name: evaluation_table(...)}.

    One block per subset (scenarios, then "all"), one row per method; columns MAE, RMSE, NDCG@k,
    n_ratings, n_users, n_ndcg_users. None is shown as "-".
    """
    if not results:
        return "(no results)"
    ndcg_key = next(key for key in next(iter(results.values()))["all"] if key.startswith("ndcg@"))
    columns = ("mae", "rmse", ndcg_key, "n_ratings", "n_users", "n_ndcg_users")
    headers = ("MAE", "RMSE", ndcg_key.upper(), "n_ratings", "n_users", "n_ndcg_users")
    method_width = max(len("method"), *(len(method) for method in results))
    widths = [max(len(header), 8) for header in headers]
    header_cells = [header.rjust(width) for header, width in zip(headers, widths)]
    header_line = "  ".join(["method".ljust(method_width)] + header_cells)
    blocks = []
    for subset in SUBSETS:
        lines = [f"[{subset}]", header_line]
        for method, table in results.items():
            row = table.get(subset, {})
            cells = [format_cell(row.get(column)).rjust(w) for column, w in zip(columns, widths)]
            lines.append("  ".join([method.ljust(method_width)] + cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# Reproducibility and devices
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed python `random`, numpy's global generator and torch (CPU and every CUDA device).

    Returns a fresh CPU `torch.Generator` seeded with `seed`, for callers that prefer explicit
    generators to global state.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


_CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str) -> torch.device:
    """The torch.device for a config string: "auto", "cpu", "cuda" or "cuda:N".

    "auto" is CUDA when available, else CPU. "cuda"/"cuda:N" raise ValueError when CUDA is not
    available or N is not a visible device; anything else raises ValueError.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = _CUDA_DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"config device={name!r} but torch.cuda.is_available() is False; use 'cpu' or 'auto'"
        )
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"config device={name!r} but only {count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{count - 1})"
            )
    return torch.device(name)


def git_state(folder=Path(__file__).resolve().parent) -> dict:
    """{"git_commit": HEAD's hash, "git_dirty": whether tracked files differ from it} of the
    checkout holding `folder`; both None when git or the checkout is unavailable (never raises)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


M_TOP_PAD = -2  # glibc's mallopt parameter: bytes of free memory kept at the top of the heap
HEAP_TOP_PAD_BYTES = 64 << 20
heap_top_pad = {"bytes": 0}  # what keep_freed_heap set in this process (0: not called, or not glibc)


def libc_mallopt():
    """The C library's mallopt(param, value) -> 1 on success, or None where it has none (not glibc)."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):
        return None


def keep_freed_heap() -> int:
    """Have glibc's malloc keep HEAP_TOP_PAD_BYTES (64 MB) of freed memory at the top of the heap
    instead of returning it to the system after every step: a training step frees and reallocates
    tens of MB of tensors, and each return made the next step fault those pages in again
    (100,000-200,000 minor page faults per ML-1M-scale epoch on 2 CPU cores, 1,000-2,000 with the
    pad; the numbers computed do not change). Process-wide and idempotent. Returns the pad in
    bytes, or 0 where the C library has no mallopt (not glibc) or refuses it."""
    mallopt = libc_mallopt()
    if mallopt is None:
        return 0
    if mallopt(M_TOP_PAD, HEAP_TOP_PAD_BYTES) == 1:
        heap_top_pad["bytes"] = HEAP_TOP_PAD_BYTES
    return heap_top_pad["bytes"]


def environment(device: torch.device) -> dict:
    """What a run's numbers depend on besides its settings and data: the resolved device, torch's
    CPU thread count, the torch / numpy / python versions, the platform, the heap pad set in this
    process (speed only: `keep_freed_heap`, which every trainer calls) and the code's git state."""
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "heap_top_pad_bytes": heap_top_pad["bytes"],
        **git_state(),
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file in the same directory, then os.replace.

    Readers see the old file or the complete new one, never a partial write; the temporary file
    is removed if anything fails. The directory must exist. The new file's mode follows the umask.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` of `text` encoded with `encoding`."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, indent: int = 2) -> None:
    """Serialise `obj` to JSON (newline-terminated), then `atomic_write_text` it to `path`.

    Serialisation happens before anything touches the disk, so an object that json cannot
    encode raises TypeError/ValueError and leaves `path` (and its directory) unchanged.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# ---------------------------------------------------------------------------------------------
# Task loading
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """B users' tasks; rows 0..S-1 of every [B, N] tensor are the support set, the rest the query."""
    user_codes: torch.Tensor  # [B, F_u] long
    item_features: dict  # field -> [B, N] codes or [B, N, L] padded indices
    ratings: torch.Tensor  # [B, N] long
    scenarios: torch.Tensor  # [B, N] long, 0..3
    support_size: int
    user_ids: torch.Tensor | None = None  # [B] long, the raw user ids (batches built from task files)
    item_ids: torch.Tensor | None = None  # [B, N] long, the raw item ids


def tasks_to_batch(manifest, tasks):
    """Stack task dicts (docs/data.md) into one `TaskBatch` over all of them, in the given
    order. Multi-hot fields become [U, N, L] active indices padded with the field's size."""
    if not tasks:
        raise ValueError("no tasks to load")
    support_size = len(tasks[0]["support"]["ratings"])

    def both(task, key):
        return task["support"][key] + task["query"][key]

    item_features = {}
    for field in manifest["features"]["item"]:
        name, size = field["name"], field["size"]
        rows = [task["support"]["item_features"][name] + task["query"]["item_features"][name] for task in tasks]
        if field["kind"] == "categorical":
            item_features[name] = torch.tensor(rows, dtype=torch.long)
        else:
            width = max(1, max(len(active) for row in rows for active in row))
            padded = np.full((len(rows), len(rows[0]), width), size, dtype=np.int64)
            for u, row in enumerate(rows):
                for i, active in enumerate(row):
                    padded[u, i, :len(active)] = active
            item_features[name] = torch.from_numpy(padded)
    return TaskBatch(
        user_codes=torch.tensor([task["user_features"] for task in tasks], dtype=torch.long),
        item_features=item_features,
        ratings=torch.tensor([both(task, "ratings") for task in tasks], dtype=torch.long),
        scenarios=torch.tensor([both(task, "scenarios") for task in tasks], dtype=torch.long),
        support_size=support_size,
        user_ids=torch.tensor([task["user_id"] for task in tasks], dtype=torch.long),
        item_ids=torch.tensor([both(task, "item_ids") for task in tasks], dtype=torch.long),
    )


def _map_batch(batch, transform):
    """A TaskBatch with `transform` applied to every tensor of `batch`."""
    return TaskBatch(
        user_codes=transform(batch.user_codes),
        item_features={name: transform(value) for name, value in batch.item_features.items()},
        ratings=transform(batch.ratings),
        scenarios=transform(batch.scenarios),
        support_size=batch.support_size,
        user_ids=None if batch.user_ids is None else transform(batch.user_ids),
        item_ids=None if batch.item_ids is None else transform(batch.item_ids),
    )


def select_users(batch, index):
    """The users `index` (LongTensor or slice) of a TaskBatch, as a TaskBatch."""
    return _map_batch(batch, lambda tensor: tensor[index])


def batch_to(batch, device):
    """A TaskBatch moved to `device`."""
    return _map_batch(batch, lambda tensor: tensor.to(device))
