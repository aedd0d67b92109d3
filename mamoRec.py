"""Train MAMO and evaluate it in the four cold-start scenarios: `python mamoRec.py`.

Settings come from configs.py; flags override them. Writes RUN/config.json, RUN/epochs.csv,
RUN/checkpoint.pt (each epoch) and RUN/metrics.json, and prints the results table.
"""
import argparse
import copy
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs import config_settings
from data_prep.download import DownloadError
from data_prep.prepare_data import ensure_prepared, protocol_from_config
from data_prep.raw_io import DataError
from data_prep.task_io import load_processed
from meta_step import meta_step_settings
from models import MAMO, make_engine, meta_train_step, predict_query
from utils import (SUBSETS, atomic_write_bytes, atomic_write_json, atomic_write_text, batch_to,
                   evaluation_table, expected_rating, format_results, point_prediction, resolve_device,
                   seed_everything, select_users, tasks_to_batch)

CHECKPOINT = "checkpoint.pt"


def load_data(cfg):
    """Processed tasks for cfg['dataset'] with cfg's protocol settings: (manifest, train, test) batches.

    A data folder prepared with other settings is left alone: the data go to a folder named for
    the settings, recorded in cfg['data_dir'].
    """
    prepared = ensure_prepared(cfg["dataset"], cfg["raw_dir"], cfg["data_dir"], protocol_from_config(cfg),
                               download=cfg["download"], on_mismatch="new-folder")
    cfg["data_dir"] = str(prepared.data_dir)
    manifest, tasks = load_processed(prepared.data_dir)
    train = tasks_to_batch(manifest, [tasks[u] for u in manifest["split"]["train"]])
    test = tasks_to_batch(manifest, [tasks[u] for u in manifest["split"]["test"]])
    return manifest, train, test


def score_predictions(manifest, batch, probs_or_values, prediction):
    """Query predictions [U, Q, C] (class probabilities) or [U, Q] (regression) -> TABLE."""
    support, rating_min = batch.support_size, manifest["rating_min"]
    query_ratings = batch.ratings[:, support:]
    n_users, n_query = query_ratings.shape
    if probs_or_values.dim() == 3:
        flat = probs_or_values.reshape(n_users * n_query, -1).cpu().numpy()
        predicted = point_prediction(flat, rating_min, prediction)
        ranking = expected_rating(flat, rating_min)
    else:
        predicted = ranking = probs_or_values.reshape(-1).cpu().numpy()
    return evaluation_table(
        user_ids=np.repeat(np.arange(n_users), n_query),
        scenarios=batch.scenarios[:, support:].reshape(-1).cpu().numpy(),
        true_ratings=query_ratings.reshape(-1).cpu().numpy(),
        predicted_ratings=predicted, ranking_scores=ranking)


def reference_rows(manifest, train, test):
    """The training-set mean rating and each test user's support mean, as TABLEs."""
    support = test.support_size
    train_mean = train.ratings.double().mean()
    query_shape = test.ratings[:, support:].shape
    support_mean = test.ratings[:, :support].double().mean(1, keepdim=True)
    return {"train_mean": score_predictions(manifest, test, train_mean.expand(query_shape), None),
            "support_mean": score_predictions(manifest, test, support_mean.expand(query_shape), None)}


class MAMRec:
    """Meta-training and evaluation of one MAMO model, with per-epoch checkpoints in run_dir."""

    def __init__(self, cfg, manifest, train, test, run_dir, device):
        self.cfg, self.manifest, self.run_dir, self.device = cfg, manifest, Path(run_dir), device
        self.train_tasks, self.test_tasks = batch_to(train, device), batch_to(test, device)
        generator = seed_everything(cfg["seed"])
        self.model = MAMO(manifest["features"], manifest["n_rating_classes"], manifest["rating_min"],
                          cfg, generator).to(device)
        self.engine = make_engine(self.model, cfg["engine"])
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        if cfg["meta_optimizer"] not in optimizers:
            raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {cfg['meta_optimizer']!r}")
        self.optimizer = optimizers[cfg["meta_optimizer"]](self.model.meta_parameters(), **meta_step_settings(
            cfg["meta_optimizer"], cfg["lambda"], cfg["users_per_step"], cfg["meta_step_scaling"]))
        self.epochs, self.epoch, self.train_seconds, self.eval_seconds = [], 0, 0.0, 0.0

    def user_order(self, epoch):
        """Training users in a fresh order for each epoch, from (seed, epoch) alone."""
        rng = np.random.default_rng([self.cfg["seed"], epoch])
        return torch.from_numpy(rng.permutation(self.train_tasks.ratings.shape[0]))

    def train_epoch(self, epoch):
        """One pass over every training user; returns the mean query loss."""
        order, step = self.user_order(epoch), self.cfg["users_per_step"]
        losses = []
        with tqdm(total=len(order), desc=f"epoch {epoch} train", unit="user", leave=False) as bar:
            for start in range(0, len(order), step):
                batch = select_users(self.train_tasks, order[start:start + step].to(self.device))
                losses.append(meta_train_step(self.model, self.engine, batch, self.optimizer))
                bar.update(len(losses[-1]))
        return torch.cat(losses).mean().item()

    def evaluate(self):
        """TABLE for the test users' query ratings (no parameter or memory changes)."""
        size, outputs = self.cfg["eval_batch_users"], []
        n_users = self.test_tasks.ratings.shape[0]
        for start in tqdm(range(0, n_users, size), desc="evaluate", unit="batch", leave=False):
            batch = select_users(self.test_tasks, slice(start, start + size))
            probs, expected = self.model.predictions(predict_query(self.model, self.engine, batch))
            outputs.append(expected if probs is None else probs)
        return score_predictions(self.manifest, self.test_tasks, torch.cat(outputs), self.cfg["prediction"])

    def fit(self, n_epoch, label="mamo"):
        """Train up to n_epoch (continuing after a resumed epoch), evaluating after each."""
        for epoch in tqdm(range(self.epoch + 1, n_epoch + 1), desc=f"{label} epochs", unit="epoch"):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            self.train_seconds += time.perf_counter() - started
            started = time.perf_counter()
            table = self.evaluate()
            self.eval_seconds += time.perf_counter() - started
            self.epochs.append({"epoch": epoch, "train_loss": train_loss, "results": {label: table}})
            self.epoch = epoch
            self.save_checkpoint()
        return self.epochs[-1]["results"][label] if self.epochs else None

    def save_checkpoint(self):
        state = {
            "epoch": self.epoch, "epochs": self.epochs,
            "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "config": self.cfg,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.run_dir / CHECKPOINT, buffer.getvalue())

    def load_checkpoint(self):
        """Continue from run_dir/checkpoint.pt if it exists; returns whether it did."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        self.epoch, self.epochs = state["epoch"], state["epochs"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        return True


def write_epochs_csv(path, epochs):
    """One row per (epoch, method): train loss and the overall and per-scenario metrics."""
    out = io.StringIO()
    writer = csv.writer(out)
    columns = [f"{subset}_{metric}" for subset in SUBSETS for metric in ("mae", "rmse", "ndcg@3")]
    writer.writerow(["epoch", "method", "train_loss"] + columns)
    for row in epochs:
        for method, table in row["results"].items():
            values = [table[subset][metric] for subset in SUBSETS for metric in ("mae", "rmse", "ndcg@3")]
            writer.writerow([row["epoch"], method, row["train_loss"]] + ["" if v is None else v for v in values])
    atomic_write_text(path, out.getvalue())


def run(cfg, resume=False):
    """The whole experiment: prepare/load data, train MAMO (and the ablation), write the outputs."""
    device = resolve_device(cfg["device"])
    manifest, train, test = load_data(cfg)
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg)
    print(f"{manifest['dataset']}: {train.ratings.shape[0]} training users, {test.ratings.shape[0]} test users, "
          f"device {device}", file=sys.stderr)
    trainer = MAMRec(cfg, manifest, train, test, run_dir, device)
    if resume and trainer.load_checkpoint():
        print(f"resumed {run_dir / CHECKPOINT} after epoch {trainer.epoch}", file=sys.stderr)
    results = {"mamo": trainer.fit(cfg["n_epoch"])}
    results.update(reference_rows(manifest, train, test))
    epochs = trainer.epochs
    if cfg["with_ablation"]:
        ablation_cfg = dict(cfg, feature_memory=False, task_memory=False)
        ablation = MAMRec(ablation_cfg, manifest, train, test, run_dir / "no_memory", device)
        if resume:
            ablation.load_checkpoint()
        results["no_memory"] = ablation.fit(cfg["n_epoch"], label="no_memory")
        epochs = [{**row, "results": {**row["results"], **other["results"]}}
                  for row, other in zip(epochs, ablation.epochs)]
    metrics = {"dataset": manifest["dataset"], "config": cfg,
               "train_seconds": trainer.train_seconds, "eval_seconds": trainer.eval_seconds,
               "epochs": epochs, "results": results}
    write_epochs_csv(run_dir / "epochs.csv", epochs)
    atomic_write_json(run_dir / "metrics.json", metrics)
    print(format_results(results))
    return metrics


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="movielens | movielens-100k | synthetic | synthetic-types | bookcrossing | synthetic-bookcrossing")
    parser.add_argument("--data-dir", help="processed tasks folder (default from configs.py)")
    parser.add_argument("--raw-dir", help="raw data folder for data_prep")
    parser.add_argument("--run-dir", help="output folder (default runs/<dataset>)")
    parser.add_argument("--epochs", type=int, help="meta-training epochs (n_epoch)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, help="training seed")
    parser.add_argument("--users-per-step", type=int, help="training users per global step")
    parser.add_argument("--engine", choices=["auto", "batched", "reference"], help="computation path")
    parser.add_argument("--download", action="store_true", help="download missing raw MovieLens files")
    parser.add_argument("--with-ablation", action="store_true", help="also train the memory-free model")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last checkpoint")
    return parser.parse_args(argv)


def build_config(args):
    """configs.py overridden by the flags; folder templates filled with the dataset name."""
    cfg = copy.deepcopy(config_settings)
    if args.resume:
        cfg.update(json.loads((Path(args.resume) / "config.json").read_text()))
        cfg["run_dir"] = args.resume
    flags = {"dataset": args.dataset, "data_dir": args.data_dir, "raw_dir": args.raw_dir, "run_dir": args.run_dir,
             "n_epoch": args.epochs, "device": args.device, "seed": args.seed,
             "users_per_step": args.users_per_step, "engine": args.engine}
    cfg.update({key: value for key, value in flags.items() if value is not None})
    cfg["download"] = cfg["download"] or args.download
    cfg["with_ablation"] = cfg["with_ablation"] or args.with_ablation
    for key in ("data_dir", "raw_dir", "run_dir"):
        cfg[key] = str(cfg[key]).format(dataset=cfg["dataset"])
    return cfg


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = build_config(args)
    try:
        run(cfg, resume=bool(args.resume))
    except (DataError, DownloadError) as error:
        print(f"error: {error}\nTo fetch MovieLens: `python mamoRec.py --download`; to try the method "
              f"offline: `python mamoRec.py --dataset synthetic`.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
