"""Fingerprints of a few short trainings, to show that a refactor keeps results bit-identical.

    python bench/bitcheck.py [--ml100k RAW_DIR] [--work-dir DIR]

For each case (both engines, memories on, a few option variants) it seeds, builds MAMO, takes a
few global steps on a fixed user order, evaluates the first test users, and prints SHA-256 hashes
of the final parameters and memories, of the training losses and of the evaluation outputs, with
one value of each at full precision. Run it before and after a change on the same machine and
compare the output: any difference in any bit changes a hash.
"""
import argparse
import copy
import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from mamoRec import load_data  # noqa: E402
from models import MAMO, make_engine, meta_train_step, predict_query  # noqa: E402
from utils import seed_everything, select_users  # noqa: E402

CASES = {  # name: (config overrides, global steps)
    "batched": (dict(engine="batched"), 6),
    "reference": (dict(engine="reference"), 6),
    "batched-1-per-step": (dict(engine="batched", users_per_step=1), 12),
    "reference-1-per-step": (dict(engine="reference", users_per_step=1), 12),
    "batched-task-memory-only": (dict(engine="batched", feature_memory=False), 4),
    "batched-regression": (dict(engine="batched", head="regression"), 4),
    "reference-second-order": (dict(engine="reference", first_order=False, users_per_step=8), 3),
    "reference-adam": (dict(engine="reference", local_optimizer="adam", users_per_step=8), 3),
}
EVAL_USERS = 64


def memory_tensors(model):
    """{name: tensor} of every memory (empty without memories)."""
    memories = model.memories
    if memories is None:
        return {}
    tensors = {"memories.profile": memories.profile}
    tensors.update({f"memories.embedding.{name}": slots for name, slots in memories.embedding.items()})
    if memories.task is not None:
        tensors["memories.task"] = memories.task
    return tensors


def digest(tensors):
    """SHA-256 over the names and raw bytes of {name: tensor}, in name order."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


def run_case(manifest, train, test, cfg, n_steps):
    generator = seed_everything(cfg["seed"])
    model = MAMO(manifest["features"], manifest["n_rating_classes"], manifest["rating_min"], cfg, generator)
    engine = make_engine(model, cfg["engine"])
    optimizer = torch.optim.Adam(model.meta_parameters(), lr=cfg["lambda"])
    order = torch.from_numpy(np.random.default_rng([cfg["seed"], 1]).permutation(train.ratings.shape[0]))
    step = cfg["users_per_step"]
    losses = torch.cat([meta_train_step(model, engine, select_users(train, order[s * step:(s + 1) * step]), optimizer)
                        for s in range(n_steps)])
    outputs = predict_query(model, engine, select_users(test, slice(0, EVAL_USERS)))
    state = {name: p for name, p in model.named_parameters()}
    state.update(memory_tensors(model))
    return {"state": digest(state), "losses": digest({"losses": losses}), "outputs": digest({"outputs": outputs}),
            "last_loss": repr(losses[-1].item()), "output_0": repr(outputs.flatten()[0].item()),
            "task_0": repr(model.memories.task.flatten()[0].item()) if model.memories.task is not None else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ml100k", help="raw MovieLens-100K folder (u.data, u.user, u.item): also check on it")
    parser.add_argument("--work-dir", help="where to put the prepared data (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-bitcheck-"))
    datasets = {"synthetic": dict(dataset="synthetic", raw_dir=str(work / "raw-synthetic"),
                                  data_dir=str(work / "synthetic"))}
    if args.ml100k:
        datasets["movielens-100k"] = dict(dataset="movielens-100k", raw_dir=args.ml100k,
                                          data_dir=str(work / "ml-100k"))
    for dataset, paths in datasets.items():
        cfg = copy.deepcopy(config_settings)
        cfg.update(paths, seed=1)
        manifest, train, test = load_data(cfg)
        for case, (overrides, n_steps) in CASES.items():
            result = run_case(manifest, train, test, dict(cfg, **overrides), n_steps)
            print(f"{dataset:15s} {case:26s} " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
