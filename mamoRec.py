"""Train MAMO and evaluate it in the four cold-start scenarios: `python mamoRec.py`.

Settings come from configs.py; flags override them. Every run gets its own folder RUN (default
runs/<dataset>/<UTC start>-seed<S>) holding config.json, epochs.csv, checkpoint.pt (each epoch),
metrics.json, predictions.csv and inference.json. `python mamoRec.py --resume RUN` continues a
run; `load_run(RUN)` predicts and recommends for new users (docs/usage.md).
"""
import argparse
import copy
import csv
import io
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs import PRESETS, config_settings
from data_prep.download import DownloadError
from data_prep.prepare_data import BOOKCROSSING_DATASETS, ensure_prepared, protocol_from_config
from data_prep.preprocess_BookCrossing import AGE_RANGE as BX_AGE_RANGE, age_bucket_of, country_of
from data_prep.preprocess_MovieLens import age_bucket
from data_prep.raw_io import DataError
from data_prep.task_io import data_checksum, load_processed, load_vocabularies
from modules.diagnostics import as_record, collapse_warning, diagnostic_columns, diagnostic_values, is_collapsed, \
    memory_diagnostics
from modules.meta_step import meta_step_settings
from models import COMPILE_MODES, MAMO, make_engine, meta_train_step, predict_query
from utils import (SCENARIOS, SUBSETS, atomic_write_bytes, atomic_write_json, atomic_write_text, batch_to,
                   environment, evaluation_table, expected_rating, format_cell, format_results, keep_freed_heap,
                   point_prediction, resolve_device, seed_everything, select_users, tasks_to_batch)

CONFIG, METRICS, EPOCHS_CSV = "config.json", "metrics.json", "epochs.csv"
CHECKPOINT, PREDICTIONS, INFERENCE = "checkpoint.pt", "predictions.csv", "inference.json"
#: The memory-free models trained beside MAMO (config `ablation`), each in RUN/<name>/.
ABLATIONS = {
    "no_memory": {"feature_memory": False, "task_memory": False},
    "no_memory_frozen": {"feature_memory": False, "task_memory": False, "freeze_mem_layer": True},
}
#: Settings a resumed run may change: they change no number of the run.
RESUME_FREE_KEYS = ("n_epoch", "device", "download", "compile")
FOLDER_KEYS = ("data_dir", "raw_dir", "run_dir")
#: Settings that must be integers >= 1, with the flag that sets them (None: configs.py only).
POSITIVE_SETTINGS = {"n_epoch": "--epochs", "users_per_step": "--users-per-step", "eval_batch_users": None,
                     "batch_size": None, "n_inner_loop": None}
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
CHECKPOINT_KEYS = ("epoch", "epochs", "train_seconds", "eval_seconds", "model", "optimizer", "rng",
                   "config", "data")
PREDICTION_COLUMNS = ("method", "user_id", "item_id", "scenario", "rating", "prediction", "ranking_score")


class RunError(ValueError):
    """A bad flag, setting, run folder or checkpoint; the message is one line (exit status 2)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the run folder was written: the run can be continued with --resume."""

    def __init__(self, run_dir):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def one_line(error):
    """An exception's message on one line: multi-line messages joined with '; ', or with a space
    after a line that ends with ':' (it introduces what follows)."""
    text = ""
    for line in (line.strip() for line in str(error).splitlines() if line.strip()):
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text


def utc_iso(moment):
    """A UTC datetime as ISO 8601 text, to the second."""
    return moment.isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def prepared_tasks(cfg):
    """(manifest, {user_id: task}) prepared with cfg's protocol settings (prepared first if missing).
    A data folder prepared with other settings is left alone: the data go to a folder named for the
    settings, recorded in cfg['data_dir']."""
    prepared = ensure_prepared(cfg["dataset"], cfg["raw_dir"], cfg["data_dir"], protocol_from_config(cfg),
                               download=cfg["download"], on_mismatch="new-folder")
    cfg["data_dir"] = str(prepared.data_dir)
    return load_processed(prepared.data_dir)


def split_batches(manifest, tasks):
    """(training users, test users) as TaskBatches, in the manifest's order."""
    return tuple(tasks_to_batch(manifest, [tasks[u] for u in manifest["split"][part]]) for part in ("train", "test"))


def load_data(cfg):
    """Processed tasks for cfg['dataset'] (prepared first if missing): (manifest, train, test) batches."""
    manifest, tasks = prepared_tasks(cfg)
    return (manifest, *split_batches(manifest, tasks))


def inference_assets(cfg, manifest, tasks, checksum):
    """What `load_run` needs besides the model: the feature schema, the users' field vocabularies
    and the feature codes of every item of the prepared data, keyed by raw item id."""
    vocabularies = load_vocabularies(cfg["data_dir"], manifest)
    items = {}
    for user_id in sorted(tasks):
        for part in ("support", "query"):
            rows = tasks[user_id][part]
            for k, item_id in enumerate(rows["item_ids"]):
                items.setdefault(item_id, {name: codes[k] for name, codes in rows["item_features"].items()})
    return {"dataset": manifest["dataset"], "data_checksum": checksum, "features": manifest["features"],
            "rating_min": manifest["rating_min"], "rating_max": manifest["rating_max"],
            "n_rating_classes": manifest["n_rating_classes"], "user_vocabularies": vocabularies["user"],
            "items": {str(item_id): items[item_id] for item_id in sorted(items)}}


# ---------------------------------------------------------------------------------------------
# Predictions (one path for evaluation and inference) and the reference rows
# ---------------------------------------------------------------------------------------------


@dataclass
class QueryPredictions:
    """One method's predictions for the query ratings of B users; every field is a [B, Q] array."""
    user_ids: np.ndarray  # raw user ids
    item_ids: np.ndarray  # raw item ids
    scenarios: np.ndarray  # scenario codes 0..3 of the query rows
    ratings: np.ndarray  # true ratings
    prediction: np.ndarray  # float64: the point prediction that MAE and RMSE score
    ranking_score: np.ndarray  # float64: the score NDCG ranks by (expected rating)

    def table(self):
        """The evaluation TABLE (utils.evaluation_table) of these predictions."""
        return evaluation_table(user_ids=self.user_ids.ravel(), scenarios=self.scenarios.ravel(),
                                true_ratings=self.ratings.ravel(), predicted_ratings=self.prediction.ravel(),
                                ranking_scores=self.ranking_score.ravel())


def query_predictions(model, engine, batch, prediction, users_per_batch):
    """Adapt every user of `batch` on its support rows and predict its query rows, users_per_batch
    users at a time; changes no parameter and no memory. Returns (point predictions, ranking
    scores), float64 [B, Q]: point predictions per `prediction` (expected | argmax), ranking
    scores the expected rating. Evaluation and `load_run` inference both go through here."""
    n_users = batch.ratings.shape[0]
    outputs = torch.cat([predict_query(model, engine, select_users(batch, slice(start, start + users_per_batch)))
                         for start in range(0, n_users, users_per_batch)])
    probs, expected = model.predictions(outputs)
    if probs is None:
        values = expected.double().cpu().numpy()
        return values, values
    flat = probs.reshape(-1, probs.shape[-1]).cpu().numpy()
    return (point_prediction(flat, model.rating_min, prediction).reshape(expected.shape),
            expected_rating(flat, model.rating_min).reshape(expected.shape))


def query_record(batch, prediction, ranking_score):
    """QueryPredictions of `batch`'s query rows (batches built from task files) from [B, Q] arrays."""
    support = batch.support_size
    n_query = batch.ratings.shape[1] - support
    return QueryPredictions(user_ids=np.repeat(batch.user_ids.cpu().numpy()[:, None], n_query, 1),
                            item_ids=batch.item_ids[:, support:].cpu().numpy(),
                            scenarios=batch.scenarios[:, support:].cpu().numpy(),
                            ratings=batch.ratings[:, support:].cpu().numpy(),
                            prediction=prediction, ranking_score=ranking_score)


def reference_predictions(train, test):
    """{"train_mean": the training users' mean rating, "support_mean": each test user's support
    mean} as QueryPredictions of the test users' query ratings."""
    support = test.support_size
    query_shape = test.ratings[:, support:].shape
    means = {"train_mean": train.ratings.double().mean(),
             "support_mean": test.ratings[:, :support].double().mean(1, keepdim=True)}
    records = {}
    for name, mean in means.items():
        values = mean.expand(query_shape).cpu().numpy()
        records[name] = query_record(test, prediction=values, ranking_score=values)
    return records


def reference_rows(train, test):
    """The reference rows as TABLEs."""
    return {name: predictions.table() for name, predictions in reference_predictions(train, test).items()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def method_config(cfg, method):
    """The settings of one method row: MAMO's, or an ablation's (memories off)."""
    return dict(cfg, **ABLATIONS.get(method, {}))


def method_dir(run_dir, method):
    """Where a method keeps its checkpoint: RUN for MAMO, RUN/<method> for an ablation."""
    return Path(run_dir) if method == "mamo" else Path(run_dir) / method


def read_checkpoint(path):
    """A checkpoint's contents, loaded with weights_only=True (tensors and plain data only: a
    crafted file runs nothing); RunError with one line for an unreadable or foreign file."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        foreign = re.search(r"GLOBAL (\S+)", str(error))
        reason = f"it asks to load {foreign.group(1)}" if foreign else "it holds more than tensors and plain data"
        raise RunError(f"{path}: not a readable MAMO checkpoint, nothing was loaded ({reason})") from None
    except Exception as error:  # a damaged file fails in many ways; each gets the one-line error
        raise RunError(f"{path}: not a readable MAMO checkpoint, truncated or damaged "
                       f"({type(error).__name__}: {one_line(error)[:160]})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise RunError(f"{path}: not a MAMO checkpoint (missing {', '.join(missing)})")
    if not (isinstance(state["epoch"], int) and isinstance(state["epochs"], list) and isinstance(state["config"], dict)
            and isinstance(state["data"], dict) and {"checksum", "split"} <= set(state["data"])):
        raise RunError(f"{path}: not a MAMO checkpoint (malformed epoch, epochs, config or data entries)")
    return state


def differing_settings(saved, cfg):
    """Keys whose values differ between two configs, besides RESUME_FREE_KEYS and the folders
    (the data's identity is checked by its checksum)."""
    return sorted(key for key in set(saved) | set(cfg)
                  if key not in RESUME_FREE_KEYS + FOLDER_KEYS and saved.get(key) != cfg.get(key))


class MAMRec:
    """Meta-training and evaluation of one model (MAMO or an ablation), checkpointed in run_dir
    after every epoch. After each epoch's evaluation, a model with memories also records the
    diagnostics of the test users' memory reads (modules/diagnostics.py; `diagnostics=False` skips
    them, for the test that they change no result). It makes the process's malloc keep freed
    memory (`utils.keep_freed_heap`: fewer page faults, same numbers)."""

    def __init__(self, cfg, manifest, train, test, run_dir, device, method="mamo", data_checksum=None,
                 progress=False, log=None, diagnostics=True):
        keep_freed_heap()
        self.cfg, self.manifest, self.run_dir, self.device = cfg, manifest, Path(run_dir), device
        self.method, self.data_checksum, self.progress = method, data_checksum, progress
        self.diagnostics, self.warned_collapse = diagnostics, False
        self.log = log or (lambda line: print(line, file=sys.stderr))
        self.train_tasks, self.test_tasks = batch_to(train, device), batch_to(test, device)
        generator = seed_everything(cfg["seed"])
        self.model = MAMO(manifest["features"], manifest["n_rating_classes"], manifest["rating_min"],
                          cfg, generator).to(device)
        self.engine = make_engine(self.model, cfg["engine"])
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        if cfg["meta_optimizer"] not in optimizers:
            raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {cfg['meta_optimizer']!r}")
        # fused: one kernel per parameter instead of about ten (5 % of a 32-user step on 2 CPU threads)
        self.optimizer = optimizers[cfg["meta_optimizer"]](self.model.meta_parameters(), fused=True, **meta_step_settings(
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
        with tqdm(total=len(order), desc=f"{self.method} epoch {epoch}", unit="user", leave=False,
                  disable=not self.progress) as bar:
            for start in range(0, len(order), step):
                batch = select_users(self.train_tasks, order[start:start + step].to(self.device))
                losses.append(meta_train_step(self.model, self.engine, batch, self.optimizer))
                bar.update(len(losses[-1]))
        return torch.cat(losses).mean().item()

    def predict_test(self):
        """QueryPredictions for the test users' query ratings (no parameter or memory changes)."""
        point, ranking = query_predictions(self.model, self.engine, self.test_tasks, self.cfg["prediction"],
                                           self.cfg["eval_batch_users"])
        return query_record(self.test_tasks, point, ranking)

    def evaluate(self):
        """The TABLE of the test users' query ratings."""
        return self.predict_test().table()

    def memory_record(self):
        """The diagnostics of the test users' memory reads as a dict (None without memories or diagnostics)."""
        if not self.diagnostics:
            return None
        profiles = self.model.input_loading.user_profile(self.test_tasks.user_codes)
        return as_record(memory_diagnostics(self.model, profiles))

    def warn_collapse(self, epoch, memory):
        """One warning line, the first time the attention is found collapsed in this session."""
        if memory is not None and is_collapsed(memory) and not self.warned_collapse:
            self.log(collapse_warning(self.method, epoch, memory, self.cfg["attention_temperature"]))
            self.warned_collapse = True

    def fit(self, n_epoch):
        """Train up to n_epoch (continuing after a resumed epoch), evaluating after each epoch; one
        summary line per epoch. Returns the final QueryPredictions."""
        predictions = None
        for epoch in range(self.epoch + 1, n_epoch + 1):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            predictions = self.predict_test()
            table = predictions.table()
            memory = self.memory_record()
            eval_seconds = time.perf_counter() - started
            self.train_seconds += train_seconds
            self.eval_seconds += eval_seconds
            self.epochs.append({"epoch": epoch, "train_loss": train_loss, "results": table, "memory": memory})
            self.epoch = epoch
            self.save_checkpoint()
            overall = {metric: format_cell(value) for metric, value in table["all"].items()}
            self.log(f"{self.method} epoch {epoch}/{n_epoch}: loss {train_loss:.4f}, MAE {overall['mae']}, "
                     f"RMSE {overall['rmse']}, NDCG@3 {overall['ndcg@3']} "
                     f"({train_seconds:.1f} s train, {eval_seconds:.1f} s eval)")
            self.warn_collapse(epoch, memory)
        return self.predict_test() if predictions is None else predictions

    def save_checkpoint(self):
        """run_dir/checkpoint.pt (atomic): tensors and plain data only, loadable with weights_only=True.
        Nothing draws from numpy's or Python's global generators during training (user orders come
        from (seed, epoch)), so only torch's CPU generator state is kept."""
        state = {
            "epoch": self.epoch, "epochs": self.epochs,
            "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": self.cfg,
            "data": {"checksum": self.data_checksum, "split": self.manifest["split"]},
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.run_dir / CHECKPOINT, buffer.getvalue())

    def load_checkpoint(self):
        """Continue from run_dir/checkpoint.pt if it exists; returns whether it did. Refuses (RunError)
        a checkpoint of other settings or other data, or one that does not load safely."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            return False
        state = read_checkpoint(path)
        changed = differing_settings(state["config"], self.cfg)
        if changed:
            raise RunError(f"{path}: made with other settings than {CONFIG} (differing: {', '.join(changed)})")
        split = self.manifest["split"]
        if state["data"]["split"] != split:
            moved = len(set(state["data"]["split"]["train"]) & set(split["test"]))
            raise RunError(f"{path}: the data folder {self.cfg['data_dir']} has another train/test split than "
                           f"the run ({moved} of its test users were training users)")
        if state["data"]["checksum"] != self.data_checksum:
            raise RunError(f"{path}: the data folder {self.cfg['data_dir']} differs from the run's data "
                           f"(checksum {self.data_checksum}, the run used {state['data']['checksum']})")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
            raise RunError(f"{path}: does not fit this model ({one_line(error)[:200]})") from None
        torch.set_rng_state(state["rng"]["torch"])
        self.epoch, self.epochs = state["epoch"], state["epochs"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        return True


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def merged_epochs(trainers, references):
    """Per epoch: {"epoch", "train_loss": {trained method: loss}, "results": {method: TABLE},
    "memory": {method with memories: its diagnostics dict}}; the reference rows do not train and
    repeat their table every epoch."""
    rows = []
    for per_method in zip(*(trainer.epochs for trainer in trainers.values())):
        tables = {method: row["results"] for method, row in zip(trainers, per_method)}
        rows.append({"epoch": per_method[0]["epoch"],
                     "train_loss": {method: row["train_loss"] for method, row in zip(trainers, per_method)},
                     "results": {"mamo": tables.pop("mamo"), **references, **tables},
                     "memory": {method: row["memory"] for method, row in zip(trainers, per_method)
                                if row.get("memory") is not None}})
    return rows


def write_epochs_csv(path, epochs, n_slots):
    """One row per (epoch, method): the method's own train loss (empty for reference rows), the
    overall and per-scenario metrics, and the memory diagnostics (modules/diagnostics.py, K = n_slots
    slot-usage columns; empty for rows without memories)."""
    out = io.StringIO()
    writer = csv.writer(out)
    metrics = ("mae", "rmse", "ndcg@3")
    writer.writerow(["epoch", "method", "train_loss"] + [f"{subset}_{metric}" for subset in SUBSETS for metric in metrics]
                    + [f"memory_{name}" for name in diagnostic_columns(n_slots)])
    for row in epochs:
        for method, table in row["results"].items():
            values = [table[subset][metric] for subset in SUBSETS for metric in metrics]
            writer.writerow([row["epoch"], method, row["train_loss"].get(method, "")] +
                            ["" if value is None else value for value in values] +
                            diagnostic_values(row["memory"].get(method), n_slots))
    atomic_write_text(path, out.getvalue())


def write_predictions_csv(path, predictions):
    """One row per method and test query rating (PREDICTION_COLUMNS); floats written exactly."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(PREDICTION_COLUMNS)
    for method, record in predictions.items():
        for user_id, item_id, scenario, rating, prediction, score in zip(
                record.user_ids.ravel().tolist(), record.item_ids.ravel().tolist(), record.scenarios.ravel().tolist(),
                record.ratings.ravel().tolist(), record.prediction.ravel().tolist(),
                record.ranking_score.ravel().tolist()):
            writer.writerow([method, user_id, item_id, SCENARIOS[scenario], rating, prediction, score])
    atomic_write_text(path, out.getvalue())


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


def fill_folder(template, cfg, started):
    """The folder a template names, {dataset}, {seed} and {timestamp} (UTC start) filled in."""
    try:
        return Path(str(template).format(dataset=cfg["dataset"], seed=cfg["seed"],
                                         timestamp=started.strftime(TIMESTAMP_FORMAT)))
    except (KeyError, IndexError, ValueError) as error:
        raise RunError(f"folder {template!r}: bad placeholder ({error}); expected {{dataset}}, {{seed}}, "
                       "{timestamp}") from None


def is_unique_template(template):
    """Whether a run-folder template makes a new name per run (it holds {timestamp})."""
    return "{timestamp}" in str(template)


def check_run_dir(path, overwrite):
    """Refuse, before anything is written, a run folder that holds files (unless `overwrite` and
    it is a run's folder)."""
    if path.exists() and not path.is_dir():
        raise RunError(f"run folder {path} is a file, expected a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise RunError(f"run folder {path} already holds files: choose a new --run-dir, continue it with "
                           f"--resume {path}, or replace it with --overwrite")
        if not (path / CONFIG).is_file():
            raise RunError(f"run folder {path} holds files but no {CONFIG}: --overwrite only replaces a run's folder")


def check_creatable(path):
    """Refuse a run folder that cannot be created: its nearest existing ancestor must be a writable folder."""
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunError(f"run folder {path} cannot be created: {ancestor} is not a writable folder")


def claim_run_dir(template, planned, overwrite):
    """Create the run folder. A unique-per-run template that another run took meanwhile gets the
    next free suffix (-2, -3, ...); an explicit folder is emptied first when `overwrite`."""
    try:
        if is_unique_template(template):
            for suffix in range(1, 1000):
                candidate = planned if suffix == 1 else planned.with_name(f"{planned.name}-{suffix}")
                candidate.parent.mkdir(parents=True, exist_ok=True)
                try:
                    candidate.mkdir()
                    return candidate
                except FileExistsError:
                    continue
            raise RunError(f"run folder {planned}: no free name")
        check_run_dir(planned, overwrite)
        if planned.is_dir() and any(planned.iterdir()):
            shutil.rmtree(planned)
        planned.mkdir(parents=True, exist_ok=True)
        return planned
    except OSError as error:
        raise RunError(f"run folder {planned} cannot be created ({error.strerror or error})") from None


def read_run_config(run_dir):
    """RUN/config.json of an earlier run: {"config": settings, "provenance": ...}; RunError if RUN is
    not a run folder of this version."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunError(f"{run_dir} holds no run (no {CONFIG}), expected a run folder written by mamoRec.py")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: not valid JSON ({error})") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and isinstance(saved.get("provenance"), dict) and isinstance(saved["provenance"].get("sessions"), list)
            and "data_checksum" in saved["provenance"]):
        raise RunError(f"{path}: not a run's {CONFIG} (expected 'config', and 'provenance' with 'sessions' and "
                       "'data_checksum')")
    missing = sorted(set(config_settings) - set(saved["config"]))
    if missing:
        raise RunError(f"{path}: settings {', '.join(missing)} are missing (written by another version)")
    return saved


def check_settings(cfg):
    """RunError for a setting no run can use."""
    for key, flag in POSITIVE_SETTINGS.items():
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            name = f"{flag} ({key})" if flag else f"{key} in configs.py"
            raise RunError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def run(cfg, resume=False, overwrite=False, progress=False):
    """The whole experiment: check the settings and run folder, prepare/load the data, train MAMO
    (and the ablations), write the outputs into the run folder. Nothing is written to the run
    folder until every check has passed; a resumed run continues from its checkpoints.
    Returns the metrics dict (as metrics.json)."""
    started = datetime.now(timezone.utc)
    cfg = dict(cfg)
    for key in ("data_dir", "raw_dir"):
        cfg[key] = str(fill_folder(cfg[key], cfg, started))
    check_settings(cfg)
    try:
        device = resolve_device(cfg["device"])
    except ValueError as error:
        raise RunError(f"--device: {error}") from None
    template = cfg["run_dir"]
    if resume:
        run_dir = Path(template)
        previous = read_run_config(run_dir)["provenance"]
    else:
        run_dir = fill_folder(template, cfg, started)
        if not is_unique_template(template):
            check_run_dir(run_dir, overwrite)
        check_creatable(run_dir)
        previous = {"sessions": []}
    manifest, tasks = prepared_tasks(cfg)
    train, test = split_batches(manifest, tasks)
    checksum = data_checksum(cfg["data_dir"])
    print(f"{manifest['dataset']}: {train.ratings.shape[0]} training users, {test.ratings.shape[0]} test users, "
          f"device {device}", file=sys.stderr)
    methods = ["mamo", *(ABLATIONS if cfg["ablation"] else ())]
    try:
        trainers = {method: MAMRec(method_config(cfg, method), manifest, train, test, method_dir(run_dir, method),
                                   device, method=method, data_checksum=checksum, progress=progress)
                    for method in methods}
    except ValueError as error:
        raise RunError(f"configs.py: {error}") from None
    if resume:
        for trainer in trainers.values():
            if trainer.load_checkpoint():
                print(f"{trainer.method}: resumed after epoch {trainer.epoch}", file=sys.stderr)
        if previous["data_checksum"] != checksum:
            raise RunError(f"{cfg['data_dir']}: differs from the data of run {run_dir} (checksum {checksum}, the run "
                           f"used {previous['data_checksum']}); resume needs the same prepared data")
    # Every check passed: from here on the run folder is written.
    if not resume:
        run_dir = claim_run_dir(template, run_dir, overwrite)
        for method, trainer in trainers.items():
            trainer.run_dir = method_dir(run_dir, method)
    cfg["run_dir"] = str(run_dir)
    session = {"started_utc": utc_iso(started), "ended_utc": None, "resumed": resume, **environment(device)}
    provenance = {"data_checksum": checksum, "sessions": previous["sessions"] + [session]}
    try:
        atomic_write_json(run_dir / CONFIG, {"config": cfg, "provenance": provenance})
        atomic_write_json(run_dir / INFERENCE, inference_assets(cfg, manifest, tasks, checksum), indent=None)
        trained = {method: trainer.fit(cfg["n_epoch"]) for method, trainer in trainers.items()}
        references = reference_predictions(train, test)
        predictions = {"mamo": trained.pop("mamo"), **references, **trained}
        results = {method: record.table() for method, record in predictions.items()}
        session["ended_utc"] = utc_iso(datetime.now(timezone.utc))
        metrics = {"dataset": manifest["dataset"], "config": cfg, "provenance": provenance,
                   "train_seconds": {method: trainer.train_seconds for method, trainer in trainers.items()},
                   "eval_seconds": {method: trainer.eval_seconds for method, trainer in trainers.items()},
                   "epochs": merged_epochs(trainers, {name: results[name] for name in references}),
                   "results": results}
        write_predictions_csv(run_dir / PREDICTIONS, predictions)
        write_epochs_csv(run_dir / EPOCHS_CSV, metrics["epochs"], cfg["n_k"])
        atomic_write_json(run_dir / METRICS, metrics)
        atomic_write_json(run_dir / CONFIG, {"config": cfg, "provenance": provenance})
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    print(format_results(results))
    print(f"run folder: {run_dir}")
    return metrics


# ---------------------------------------------------------------------------------------------
# Cold-start inference from a run folder
# ---------------------------------------------------------------------------------------------


def raw_field_value(dataset, field, value):
    """A raw users-file value as the vocabulary holds it, converted as data preparation does: a
    stripped string; ML-100K ages in years -> the ML-1M age groups; Book-Crossing ages in years ->
    age groups, locations -> countries."""
    text = str(value).strip()
    bookcrossing = dataset in BOOKCROSSING_DATASETS
    if field == "age" and text.isdigit():
        if dataset == "movielens-100k":
            return str(age_bucket(np.array([int(text)]))[0])
        if bookcrossing and BX_AGE_RANGE[0] <= int(text) <= BX_AGE_RANGE[1]:
            return age_bucket_of(int(text))
    if field == "country" and bookcrossing:
        return country_of(text)
    return text


class TrainedRun:
    """A trained model of a run folder, for users it has never seen (see `load_run`)."""

    def __init__(self, run_dir, method="mamo", device="cpu"):
        run_dir = Path(run_dir)
        if method not in ("mamo", *ABLATIONS):
            raise RunError(f"method {method!r} is not trained in a run, expected mamo or one of {', '.join(ABLATIONS)}")
        cfg = method_config(read_run_config(run_dir)["config"], method)
        try:
            assets = json.loads((run_dir / INFERENCE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunError(f"{run_dir / INFERENCE}: cannot be read ({one_line(error)})") from None
        path = method_dir(run_dir, method) / CHECKPOINT
        if not path.is_file():
            raise RunError(f"{path}: missing (was {method} trained in this run?)")
        state = read_checkpoint(path)
        if state["data"]["checksum"] != assets["data_checksum"]:
            raise RunError(f"{path}: trained on other data than {run_dir / INFERENCE} describes")
        self.cfg, self.assets, self.device = cfg, assets, torch.device(device)
        with torch.random.fork_rng(devices=[]):  # initial values are overwritten: leave the caller's generator alone
            self.model = MAMO(assets["features"], assets["n_rating_classes"], assets["rating_min"], cfg,
                              torch.Generator()).to(self.device)
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
            raise RunError(f"{path}: does not fit the run's model ({one_line(error)[:200]})") from None
        self.engine = make_engine(self.model, cfg["engine"], compile="auto")  # the run's mode may not suit this device
        self.item_keys = list(assets["items"])  # raw item ids as strings, in id order

    def user_codes(self, profile):
        """Raw profile {field: value} -> the codes of the manifest's user fields, in order."""
        fields = [field["name"] for field in self.assets["features"]["user"]]
        if not isinstance(profile, dict):
            raise ValueError(f"profile must be a dict of {', '.join(fields)}, got {type(profile).__name__}")
        unknown, missing = sorted(set(profile) - set(fields)), [name for name in fields if name not in profile]
        if unknown or missing:
            raise ValueError(f"profile fields must be exactly {', '.join(fields)}; unknown: {unknown}, missing: {missing}")
        codes = []
        for name in fields:
            vocabulary = self.assets["user_vocabularies"][name]
            value = raw_field_value(self.assets["dataset"], name, profile[name])
            if value not in vocabulary:
                shown = ", ".join(vocabulary[:25]) + (", ..." if len(vocabulary) > 25 else "")
                raise ValueError(f"profile {name}={profile[name]!r} is not a known value, expected one of {shown}")
            codes.append(vocabulary.index(value))
        return codes

    def item_key(self, item_id):
        """A raw item id (int or digits) -> its key in the item table; ValueError when unknown."""
        valid = isinstance(item_id, (int, np.integer, str)) and not isinstance(item_id, bool)
        key = str(item_id).strip() if valid else None
        if key not in self.assets["items"]:
            raise ValueError(f"unknown item {item_id!r}: not an item of the run's data ({len(self.item_keys)} items)")
        return key

    def checked_support(self, support):
        """[(item key, rating)] of a support list of (raw item id, rating), at least one, no item twice."""
        low, high = self.assets["rating_min"], self.assets["rating_max"]
        if not isinstance(support, (list, tuple)) or not support:
            raise ValueError("support must be a non-empty list of (item_id, rating) pairs")
        checked, seen = [], set()
        for entry in support:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"support entry {entry!r} is not an (item_id, rating) pair")
            key, rating = self.item_key(entry[0]), entry[1]
            if key in seen:
                raise ValueError(f"item {entry[0]!r} appears twice in the support list")
            whole = isinstance(rating, (int, float, np.integer, np.floating)) and not isinstance(rating, bool) \
                and float(rating).is_integer()
            if not whole or not low <= rating <= high:
                raise ValueError(f"rating {rating!r} of item {entry[0]!r} is not a whole number in {low}..{high}")
            seen.add(key)
            checked.append((key, int(rating)))
        return checked

    def query_scores(self, profile, support, item_keys):
        """(point predictions, ranking scores) [n] for item_keys after adapting on the support list."""
        codes, rows = self.user_codes(profile), self.checked_support(support)
        items = self.assets["items"]

        def part(keys, ratings):
            return {"item_ids": [int(key) for key in keys], "ratings": list(ratings), "scenarios": [0] * len(keys),
                    "item_features": {field["name"]: [items[key][field["name"]] for key in keys]
                                      for field in self.assets["features"]["item"]}}

        task = {"user_id": -1, "user_features": codes, "support": part(*zip(*rows)),
                # query ratings are not used by prediction; the lowest rating fills the slot
                "query": part(item_keys, [self.assets["rating_min"]] * len(item_keys))}
        batch = batch_to(tasks_to_batch(self.assets, [task]), self.device)
        point, ranking = query_predictions(self.model, self.engine, batch, self.cfg["prediction"], 1)
        return point[0], ranking[0]

    def predict(self, profile, support, item_ids):
        """Predicted ratings of `item_ids` for a new user, after adapting on `support`.

        profile: {field: raw value} as in the raw users file (ML-1M: gender, age, occupation);
        support: [(raw item id, rating)], any length >= 1; item_ids: raw item ids.
        Returns the point predictions the run's MAE/RMSE score (config `prediction`), as floats."""
        if not isinstance(item_ids, (list, tuple)) or not item_ids:
            raise ValueError(f"item_ids must be a non-empty list of raw item ids, got {item_ids!r}")
        keys = [self.item_key(item_id) for item_id in item_ids]
        return self.query_scores(profile, support, keys)[0].tolist()

    def recommend(self, profile, support, k=10):
        """The k items with the highest expected rating (NDCG's ranking score) among the run's items
        not in `support`: [(item id, score)], best first, ties by item id."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        rated = {key for key, _ in self.checked_support(support)}
        keys = [key for key in self.item_keys if key not in rated]
        if not keys:
            return []
        scores = self.query_scores(profile, support, keys)[1]
        order = sorted(range(len(keys)), key=lambda j: (-scores[j], int(keys[j])))[:k]
        return [(int(keys[j]), float(scores[j])) for j in order]


def load_run(run_dir, method="mamo", device="cpu"):
    """The trained model of a run folder, ready for new users: `.predict` and `.recommend`.
    method: mamo, no_memory or no_memory_frozen. Needs only the run folder."""
    return TrainedRun(run_dir, method, device)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

#: Flag (argparse dest) -> config key, for flags that set a config key.
FLAG_KEYS = {"dataset": "dataset", "data_dir": "data_dir", "raw_dir": "raw_dir", "run_dir": "run_dir",
             "epochs": "n_epoch", "device": "device", "seed": "seed", "users_per_step": "users_per_step",
             "engine": "engine", "compile": "compile", "download": "download", "ablation": "ablation"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="movielens | movielens-100k | synthetic | synthetic-types | bookcrossing | synthetic-bookcrossing")
    parser.add_argument("--data-dir", help="processed tasks folder (default from configs.py)")
    parser.add_argument("--raw-dir", help="raw data folder for data_prep")
    parser.add_argument("--run-dir", help="new output folder (default runs/<dataset>/<UTC start>-seed<S>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the earlier run in --run-dir")
    parser.add_argument("--epochs", type=int, help="meta-training epochs (n_epoch)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, help="training seed")
    parser.add_argument("--users-per-step", type=int, help="training users per global step")
    parser.add_argument("--engine", choices=["auto", "batched", "reference"], help="computation path")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="auto | none | cuda-graphs (same numbers; see configs.py)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings from configs.PRESETS, applied "
                        "over configs.py (other flags still override them)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                        help="download missing raw files (default on; --no-download refuses)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", default=None,
                        help="skip the memory-free rows no_memory and no_memory_frozen")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--recommend", metavar="RUN", help="recommend items for a new user with RUN's model")
    parser.add_argument("--profile", help="with --recommend: the user's fields, e.g. gender=F,age=25,occupation=4")
    parser.add_argument("--support", help="with --recommend: rated items, e.g. 1193:5,661:3,914:4")
    parser.add_argument("--top-k", type=int, default=10, help="with --recommend: number of items (default 10)")
    parser.add_argument("--method", default="mamo", help="with --recommend: mamo | no_memory | no_memory_frozen")
    return parser.parse_args(argv)


def given_flags(args):
    """{config key: value} of the flags given on the command line."""
    return {key: getattr(args, dest) for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None}


def flag_text(key, value):
    """How a config key's value is given on the command line: '--seed 9', '--no-ablation'."""
    dest = next(dest for dest, flag_key in FLAG_KEYS.items() if flag_key == key)
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{dest.replace('_', '-')}"
    return f"--{dest.replace('_', '-')} {value}"


def build_config(args):
    """configs.py, overridden by the --preset's settings, then by the flags (a new run)."""
    cfg = copy.deepcopy(config_settings)
    cfg.update(PRESETS.get(args.preset, {}))
    cfg.update(given_flags(args))
    return cfg


def resumed_config(args):
    """RUN/config.json's settings for --resume RUN; only --epochs (to extend), --device, --compile
    and --download may differ, any other differing flag is refused with its name."""
    if args.overwrite:
        raise RunError("--overwrite cannot be combined with --resume")
    cfg = read_run_config(args.resume)["config"]
    flags = given_flags(args)
    refused = [f"{flag_text(key, value)} (the run has {key}={cfg[key]!r})" for key, value in flags.items()
               if key not in RESUME_FREE_KEYS + ("run_dir",) and value != cfg[key]]
    refused += [f"--preset {args.preset} (the run has {key}={cfg[key]!r})"
                for key, value in PRESETS.get(args.preset, {}).items() if value != cfg[key]]
    if "run_dir" in flags and Path(flags["run_dir"]).resolve() != Path(args.resume).resolve():
        refused.append(f"--run-dir {flags['run_dir']} (resuming {args.resume})")
    if refused:
        raise RunError(f"--resume {args.resume} keeps the run's settings; refused: {'; '.join(refused)}. "
                       "Only --epochs (to extend the run), --device, --compile, --download and --quiet may change")
    if flags.get("n_epoch", cfg["n_epoch"]) < cfg["n_epoch"]:
        raise RunError(f"--epochs {flags['n_epoch']} would shorten run {args.resume} (n_epoch {cfg['n_epoch']}); "
                       "resume can only extend it")
    cfg.update({key: flags[key] for key in RESUME_FREE_KEYS if key in flags})
    cfg["run_dir"] = args.resume
    return cfg


def parse_pairs(text, flag, separator):
    """'a=1,b=2' -> [('a', '1'), ('b', '2')]; RunError naming the flag when malformed."""
    pairs = [item.split(separator) for item in (text or "").split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        example = "gender=F,age=25,occupation=4" if separator == "=" else "1193:5,661:3"
        raise RunError(f"{flag} {text!r}: expected comma-separated pairs like {example}")
    return [(key.strip(), value.strip()) for key, value in pairs]


def recommend_command(args):
    """--recommend RUN --profile ... --support ...: print the top-k items, one 'item_id<TAB>score' a line."""
    profile = dict(parse_pairs(args.profile, "--profile", "="))
    support = [(item, int(rating) if rating.lstrip("-").isdigit() else rating)
               for item, rating in parse_pairs(args.support, "--support", ":")]
    try:
        recommended = load_run(args.recommend, args.method).recommend(profile, support, args.top_k)
    except ValueError as error:
        raise RunError(f"--recommend {args.recommend}: {one_line(error)}") from None
    for item_id, score in recommended:
        print(f"{item_id}\t{score:.4f}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.recommend:
            recommend_command(args)
            return 0
        cfg = resumed_config(args) if args.resume else build_config(args)
        run(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet and sys.stderr.isatty())
    except Interrupted as stop:
        print(f"interrupted; continue with: python mamoRec.py --resume {stop.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before the run folder was written; nothing to resume", file=sys.stderr)
        return 130
    except (RunError, DataError, DownloadError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
