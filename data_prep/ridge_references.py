"""Linear references on prepared tasks: how well ridge regressions on item features (genres, MPAA
rate) predict the test users' query ratings, given more or less knowledge about each user.

Every prediction is the user's support mean plus a regression on the item's features, clipped to
the rating range; the regressions are fitted on rating minus the user's support mean:
- support_mean:       no regression;
- shared:             one regression for all training users (one shared start);
- per_group:          one regression per user group (e.g. a planted type read from the profile);
- per_user:           one regression per test user, on its 15 support ratings alone;
- per_user_in_space:  the same, fitting only the user's coordinates in the space the per-group
                      regressions span (the support used with the shared structure known).
Used to check that a generated dataset holds the structure it plants (tests) and to report that
ceiling beside trained models (bench/memory_study.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SHARED_PENALTY = 1.0  # ridge penalties, in units of squared rating per unit weight
PER_USER_PENALTY = 3.0
IN_SPACE_PENALTY = 0.3


def item_design(rating_set: dict, sizes: dict) -> np.ndarray:
    """Rows [genre multi-hot, rate one-hot, 1] for a SET: float array (n_ratings, n_genres + n_rates + 1)."""
    rows = np.zeros((len(rating_set["ratings"]), sizes["genre"] + sizes["rate"] + 1))
    for k, (genres, rate) in enumerate(zip(rating_set["item_features"]["genre"], rating_set["item_features"]["rate"])):
        rows[k, genres] = 1.0
        rows[k, sizes["genre"] + rate] = 1.0
    rows[:, -1] = 1.0
    return rows


def ridge_weights(design: np.ndarray, targets: np.ndarray, penalty: float) -> np.ndarray:
    """argmin_w |design @ w - targets|^2 + penalty * |w|^2 (float arrays (n, f) and (n,))."""
    return np.linalg.solve(design.T @ design + penalty * np.eye(design.shape[1]), design.T @ targets)


def rmse(errors) -> float:
    return float(np.sqrt(np.mean(np.square(errors))))


def ridge_references(manifest: dict, tasks: dict, group_of: Callable[[dict], int]) -> dict[str, dict[str, float]]:
    """{reference name: {"mae", "rmse"}} over the test users' query ratings (see the module docstring).

    manifest, tasks: `data_prep.task_io.load_processed`; group_of: task -> group index 0..G-1.
    """
    sizes = {field["name"]: field["size"] for field in manifest["features"]["item"]}
    rating_min, rating_max = manifest["rating_min"], manifest["rating_max"]
    designs, targets, groups = [], [], []
    for task in (t for t in tasks.values() if t["split"] == "train"):
        mean = np.mean(task["support"]["ratings"])
        for part in ("support", "query"):
            designs.append(item_design(task[part], sizes))
            targets.append(np.asarray(task[part]["ratings"]) - mean)
            groups += [group_of(task)] * len(task[part]["ratings"])
    design, target, groups = np.vstack(designs), np.concatenate(targets), np.asarray(groups)
    shared = ridge_weights(design, target, SHARED_PENALTY)
    per_group = [ridge_weights(design[groups == g], target[groups == g], SHARED_PENALTY)
                 for g in range(groups.max() + 1)]
    space = np.linalg.svd(np.stack(per_group), full_matrices=False)[2][:len(per_group) - 1].T  # (features, G-1)

    errors = {"support_mean": [], "shared": [], "per_group": [], "per_user": [], "per_user_in_space": []}
    for task in (t for t in tasks.values() if t["split"] == "test"):
        support, query = task["support"], task["query"]
        mean, truth = np.mean(support["ratings"]), np.asarray(query["ratings"])
        support_design, query_design = item_design(support, sizes), item_design(query, sizes)
        support_targets = np.asarray(support["ratings"]) - mean
        weights = {
            "support_mean": np.zeros(design.shape[1]),
            "shared": shared,
            "per_group": per_group[group_of(task)],
            "per_user": ridge_weights(support_design, support_targets, PER_USER_PENALTY),
            "per_user_in_space": space @ ridge_weights(support_design @ space, support_targets, IN_SPACE_PENALTY),
        }
        for name, w in weights.items():
            errors[name] += list(truth - np.clip(mean + query_design @ w, rating_min, rating_max))
    return {name: {"mae": float(np.mean(np.abs(e))), "rmse": rmse(e)} for name, e in errors.items()}
