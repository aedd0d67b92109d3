"""Do MAMO's memories help? A grid of model variants x training seeds x datasets, rerunnable in one command.

    python bench/memory_study.py --ml100k-raw RAW/ml-100k [--ml1m-raw RAW/ml-1m] [--seeds 1 .. 10]
        [--datasets ml100k planted ml1m] [--variants ...] [--planted-users 3000] [--epochs 3]
        [--out bench/results/memory_study] [--data-root data/processed] [--threads 1] [--no-figures]

Datasets: MovieLens-100K (`ml100k`, from --ml100k-raw), the planted-types synthetic set (`planted`,
--planted-users users, generated) and MovieLens-1M (`ml1m`, only when --ml1m-raw is given).
Models: MAMO as published (`mamo`), each departure from it alone, the three memory departures
together (`best_departures`, configs.PRESETS), the two task-memory departures without the
temperature (`increment_phi`: the same start, but collapsed, impersonal reads), and the memory-free references `no_memory` and `no_memory_frozen`
(VARIANTS, ABLATIONS). A variant that changes more than the memories (clip_query_grad also clips
the memory-free models' query gradients) gets its own memory-free models, trained with the same
setting, and is compared with those; the other variants share one pair per seed and dataset.

One cell = one model trained on one dataset with one seed (the default configuration otherwise),
written to OUT/cells/<dataset>/<model>/seed<S>.json (atomically) with its final table, per-epoch
losses, metrics and memory diagnostics, and timings. A finished cell is never run again, so an
interrupted study continues where it stopped, and several processes may share OUT: each cell is
claimed by a lock file (created with O_EXCL, held with flock while the cell runs) and a lock whose
process has died is taken over. Every process then writes OUT/study.json (every cell's final table per
seed, summaries, paired differences), OUT/study.md (tables) and, with matplotlib installed
(`pip install -r requirements-extra.txt`), OUT/*.png figures.
"""
import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.seeds_table import METRICS  # noqa: E402
from configs import PRESETS, config_settings  # noqa: E402
from data_prep.prepare_data import ensure_prepared, protocol_from_config  # noqa: E402
from data_prep.ridge_references import ridge_references  # noqa: E402
from data_prep.synthetic_types import task_type  # noqa: E402
from data_prep.task_io import data_checksum, load_processed, load_vocabularies  # noqa: E402
from mamoRec import ABLATIONS, MAMRec, reference_rows, split_batches  # noqa: E402
from models import MEM_WEIGHT  # noqa: E402
from modules.diagnostics import critical_temperature  # noqa: E402
from utils import SUBSETS, atomic_write_json, atomic_write_text, environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "memory_study"
#: MAMO variants: the published method and its departures (config overrides).
VARIANTS = {
    "mamo": {},
    "temperature_0.05": {"attention_temperature": 0.05},
    "increment_write": {"task_memory_write": "increment"},
    "phi_init": {"task_memory_init": "phi"},
    "clip_query_grad_5": {"clip_query_grad": 5.0},
    "best_departures": dict(PRESETS["best_departures"]),
    # the two task-memory departures at T = 1, where the attention collapses: best_departures without
    # its personal reads, which tells what the personal part adds
    "increment_phi": {"task_memory_write": "increment", "task_memory_init": "phi"},
}
#: Further comparisons of a variant: best_departures against itself without personal reads.
CONTROLS = {"best_departures": ("increment_phi",)}
#: Settings that only change the memories: the memory-free models do not depend on them.
MEMORY_ONLY_KEYS = ("attention_temperature", "task_memory_write", "task_memory_init")
DATASETS = {  # study name -> dataset key of mamoRec
    "ml100k": "movielens-100k",
    "planted": "synthetic-types",
    "ml1m": "movielens",
}
REFERENCES = ("support_mean", "train_mean")
LOWER_IS_BETTER = {"mae": True, "rmse": True, "ndcg@3": False}
STALE_CREATING_SECONDS = 60  # an empty lock file older than this was left by a process that died creating it


# ---------------------------------------------------------------------------------------------
# Models of the grid
# ---------------------------------------------------------------------------------------------


def ablation_name(ablation, variant):
    """The memory-free model a variant is compared with: no_memory, or no_memory[clip_query_grad=5.0]
    when the variant changes settings the memory-free model also uses."""
    shared = {key: value for key, value in VARIANTS[variant].items() if key not in MEMORY_ONLY_KEYS}
    return ablation + ("[" + ",".join(f"{key}={value}" for key, value in sorted(shared.items())) + "]" if shared else "")


def model_overrides(model):
    """Config overrides of a model of the grid: a variant's, or a memory-free model's (see ablation_name)."""
    if model in VARIANTS:
        return dict(VARIANTS[model])
    for variant in VARIANTS:
        for ablation, switches in ABLATIONS.items():
            if ablation_name(ablation, variant) == model:
                shared = {key: value for key, value in VARIANTS[variant].items() if key not in MEMORY_ONLY_KEYS}
                return {**shared, **switches}
    raise ValueError(f"unknown model {model!r}")


def grid_models(variants):
    """The models to train for these variants: the variants, then their memory-free models (once each)."""
    models = list(variants)
    for variant in variants:
        for ablation in ABLATIONS:
            name = ablation_name(ablation, variant)
            if name not in models:
                models.append(name)
    return models


# ---------------------------------------------------------------------------------------------
# Cells: claim, run, record
# ---------------------------------------------------------------------------------------------


def cell_path(out, dataset, model, seed):
    return Path(out) / "cells" / dataset / model / f"seed{seed}.json"


class CellLock:
    """A cell's lock file LOCK (the cell's JSON path + .lock).

    Created with O_EXCL and held with flock for as long as the cell runs; the file names its host
    and process. A lock file that nobody holds (its process died: the kernel released its flock) is
    stale and taken over. acquire() is False when another live process holds the cell.
    """

    def __init__(self, path):
        self.path, self.fd = Path(str(path) + ".lock"), None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return self.take_over()
        return self.hold(fd)

    def hold(self, fd):
        """flock fd and write who holds it; False (fd closed) when another process got the flock first."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n".encode())
        self.fd = fd
        return True

    def take_over(self):
        """Take a stale lock: only while nobody holds its flock and the path still names that file."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile: try again from the start
            return self.acquire()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by a live process
            os.close(fd)
            return False
        info = os.fstat(fd)
        replaced = not self.path.exists() or os.stat(self.path).st_ino != info.st_ino
        being_created = info.st_size == 0 and time.time() - info.st_mtime < STALE_CREATING_SECONDS
        if replaced or being_created:
            os.close(fd)
            return False if being_created else self.acquire()
        fcntl.flock(fd, fcntl.LOCK_UN)
        return self.hold(fd)

    def release(self):
        """Remove the lock file, then drop the flock."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def overall(table):
    return {metric: table["all"][metric] for metric in METRICS}


class Dataset:
    """One prepared dataset of the study, loaded once per process."""

    def __init__(self, name, raw_dir, data_root, planted_users):
        self.name, self.key = name, DATASETS[name]
        self.n_users = planted_users if name == "planted" else None
        folder = f"{self.key}-{planted_users}users" if name == "planted" else self.key
        self.cfg = dict(copy.deepcopy(config_settings), dataset=self.key, raw_dir=str(raw_dir) if raw_dir else None,
                        data_dir=str(Path(data_root) / folder), device="cpu", download=False)
        prepared = ensure_prepared(self.key, raw_dir, self.cfg["data_dir"], protocol_from_config(self.cfg),
                                   n_users=self.n_users, on_mismatch="new-folder", log=lambda line: None)
        self.cfg["data_dir"] = str(prepared.data_dir)
        self.manifest, self.tasks = load_processed(prepared.data_dir)
        self.train, self.test = split_batches(self.manifest, self.tasks)
        self.checksum = data_checksum(prepared.data_dir)
        self.test_types = None
        if name == "planted":
            vocabularies = load_vocabularies(prepared.data_dir, self.manifest)["user"]
            self.test_types = torch.tensor([task_type(self.tasks[u], vocabularies) for u in self.manifest["split"]["test"]])

    def record(self):
        """What the study keeps about the dataset: sizes, checksum, reference rows (and ridge references)."""
        record = {"dataset": self.key, "data_dir": self.cfg["data_dir"], "data_checksum": self.checksum,
                  "n_train_users": self.train.ratings.shape[0], "n_test_users": self.test.ratings.shape[0],
                  "references": reference_rows(self.train, self.test)}
        if self.name == "planted":
            vocabularies = load_vocabularies(self.cfg["data_dir"], self.manifest)["user"]
            record["ridge_references"] = ridge_references(self.manifest, self.tasks,
                                                          lambda task: task_type(task, vocabularies))
        return record


@torch.no_grad()
def profiles_of(trainer, batch):
    return trainer.model.input_loading.user_profile(batch.user_codes)


@torch.no_grad()
def attention_by_type(trainer, types):
    """Mean attention [K] of the test users of each planted type: {type: [K floats]}."""
    attention = trainer.model.read(profiles_of(trainer, trainer.test_tasks))
    return {str(int(k)): attention[types == k].double().mean(0).tolist() for k in types.unique()}


def run_cell(data, model, seed, epochs, scratch):
    """Train one model with one seed on one dataset -> the cell's record."""
    cfg = dict(data.cfg, **model_overrides(model), seed=seed, n_epoch=epochs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=scratch) as run_dir, contextlib.redirect_stdout(sys.stderr):
        trainer = MAMRec(cfg, data.manifest, data.train, data.test, run_dir, torch.device("cpu"), method=model,
                         data_checksum=data.checksum)
        memory_at_start = trainer.memory_record()
        critical_at_start = critical_temperature(profiles_of(trainer, data.train))
        trainer.fit(epochs)
    record = {
        "dataset": data.name, "model": model, "seed": seed, "overrides": model_overrides(model), "n_epoch": epochs,
        "data_checksum": data.checksum, "results": trainer.epochs[-1]["results"],
        "epochs": [{"epoch": row["epoch"], "train_loss": row["train_loss"], **overall(row["results"]),
                    "memory": row["memory"]} for row in trainer.epochs],
        "memory_at_start": memory_at_start,
        "critical_temperature": {"start": critical_at_start,
                                 "end": critical_temperature(profiles_of(trainer, data.train))},
        "phi_mem_weight_norm": trainer.model.phi()[MEM_WEIGHT].norm().item(),
        "train_seconds": trainer.train_seconds, "eval_seconds": trainer.eval_seconds,
        "wall_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
        "environment": environment(torch.device("cpu")),
    }
    if data.test_types is not None and trainer.model.memories is not None:
        record["attention_by_type"] = attention_by_type(trainer, data.test_types)
    return record


def run_grid(datasets, models, seeds, epochs, out, scratch, log):
    """Run every cell not finished yet and not held by another process. Returns the cells this process ran."""
    ran = []
    for data in datasets:
        for seed in seeds:
            for model in models:
                path = cell_path(out, data.name, model, seed)
                if path.is_file():
                    continue
                lock = CellLock(path)
                if not lock.acquire():
                    log(f"{data.name}/{model}/seed{seed}: held by another process, skipped")
                    continue
                try:
                    if path.is_file():  # finished by another process between the check and the lock
                        continue
                    record = run_cell(data, model, seed, epochs, scratch)
                    atomic_write_json(path, record)
                    ran.append(path)
                    log(f"{data.name}/{model}/seed{seed}: MAE {record['results']['all']['mae']:.4f}, "
                        f"{record['wall_seconds']:.1f} s")
                finally:
                    lock.release()
    return ran


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def mean_sd(values):
    """{"mean", "sd" (sample, n - 1; 0 for one value), "n"} of a list of floats; None when empty."""
    if not values:
        return None
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_difference(values, baseline, lower_is_better):
    """Per-seed differences values[s] - baseline[s] over the seeds both have ({seed: float}).

    -> {"mean", "sd", "n", "t": mean / (sd / sqrt(n)) (None below 2 seeds; +-inf when sd is 0 and the
    mean is not), "better": seeds on which the model is strictly better, "measurable": whether |mean|
    exceeds the sd of the differences (the rule the docs use for "better"; None below 2 seeds)};
    None without common seeds.
    """
    seeds = sorted(set(values) & set(baseline))
    diffs = [values[s] - baseline[s] for s in seeds]
    summary = mean_sd(diffs)
    if summary is None:
        return None
    if summary["n"] < 2:
        t = None
    elif summary["sd"] == 0:
        t = 0.0 if summary["mean"] == 0 else math.copysign(math.inf, summary["mean"])
    else:
        t = summary["mean"] / (summary["sd"] / math.sqrt(summary["n"]))
    better = sum(d < 0 if lower_is_better else d > 0 for d in diffs)
    measurable = None if summary["n"] < 2 else abs(summary["mean"]) > summary["sd"]
    return {**summary, "t": t, "better": better, "measurable": measurable}


def read_cells(out):
    """Every finished cell under OUT: {(dataset, model): {seed: record}}."""
    cells = {}
    for path in sorted((Path(out) / "cells").glob("*/*/seed*.json")):
        record = json.loads(path.read_text())
        cells.setdefault((record["dataset"], record["model"]), {})[record["seed"]] = record
    return cells


def comparisons(model):
    """The models a MAMO variant is compared with: {label: model name}: its memory-free models, MAMO
    as published for a departure, and its CONTROLS (none for a memory-free model)."""
    if model not in VARIANTS:
        return {}
    return {**{ablation: ablation_name(ablation, model) for ablation in ABLATIONS},
            **({"mamo": "mamo"} if model != "mamo" else {}), **{control: control for control in CONTROLS.get(model, ())}}


def memory_by_epoch(runs):
    """Mean over seeds of each scalar memory diagnostic, per epoch (0: before training): {field: [E + 1]};
    None for a memory-free model."""
    if runs[0]["memory_at_start"] is None:
        return None
    series = [[run["memory_at_start"]] + [row["memory"] for row in run["epochs"]] for run in runs]
    return {field: [statistics.mean(records[epoch][field] for records in series) for epoch in range(len(series[0]))]
            for field, value in runs[0]["memory_at_start"].items() if isinstance(value, float)}


def type_separation(attention_by_type):
    """How differently the planted types read the memories: the largest total-variation distance
    (half the L1 distance) between two types' mean attention, 0 (identical) .. 1 (disjoint slots)."""
    means = list(attention_by_type.values())
    return max((0.5 * sum(abs(x - y) for x, y in zip(a, b)) for i, a in enumerate(means) for b in means[i + 1:]),
               default=0.0)


def summarise(cells, dataset_records):
    """The study's summary per dataset: per model and subset, mean/sd of each metric, and paired
    differences against the memory-free models; per model, the runtimes."""
    summary = {}
    for name, data_record in dataset_records.items():
        order = grid_models(VARIANTS)
        models = sorted((model for (dataset, model) in cells if dataset == name),
                        key=lambda model: (order.index(model) if model in order else len(order), model))
        per_model = {}
        for model in models:
            runs = cells[(name, model)]
            entry = {"seeds": sorted(runs), "metrics": {}, "paired": {},
                     "train_seconds": mean_sd([r["train_seconds"] for r in runs.values()]),
                     "wall_seconds": mean_sd([r["wall_seconds"] for r in runs.values()]),
                     "phi_mem_weight_norm": mean_sd([r["phi_mem_weight_norm"] for r in runs.values()]),
                     "critical_temperature": {moment: mean_sd([r["critical_temperature"][moment] for r in runs.values()])
                                              for moment in ("start", "end")},
                     "memory_by_epoch": memory_by_epoch(list(runs.values())),
                     "type_separation": mean_sd([type_separation(r["attention_by_type"]) for r in runs.values()
                                                 if "attention_by_type" in r])}
            for subset in SUBSETS:
                entry["metrics"][subset] = {metric: mean_sd([r["results"][subset][metric] for r in runs.values()
                                                             if r["results"][subset][metric] is not None])
                                            for metric in METRICS}
            for label, baseline in comparisons(model).items():
                if (name, baseline) not in cells:
                    continue
                base_runs = cells[(name, baseline)]
                entry["paired"][label] = {"against": baseline, **{subset: {metric: paired_difference(
                    {s: r["results"][subset][metric] for s, r in runs.items() if r["results"][subset][metric] is not None},
                    {s: r["results"][subset][metric] for s, r in base_runs.items()
                     if r["results"][subset][metric] is not None},
                    LOWER_IS_BETTER[metric]) for metric in METRICS} for subset in SUBSETS}}
            per_model[model] = entry
        summary[name] = per_model
    return summary


# ---------------------------------------------------------------------------------------------
# Tables and figures
# ---------------------------------------------------------------------------------------------


def mean_sd_text(stats):
    return "-" if stats is None else f"{stats['mean']:.4f} ± {stats['sd']:.4f}"


def paired_text(stats):
    if stats is None:
        return "-"
    t = "-" if stats["t"] is None else f"{stats['t']:+.1f}"
    difference = f"{stats['mean']:+.4f} ± {stats['sd']:.4f}"
    if stats.get("measurable"):
        difference = f"**{difference}**"
    return f"{difference} (t {t}, {stats['better']}/{stats['n']})"


def markdown(study):
    """The study's tables: per dataset, per subset, mean ± sd and the paired differences."""
    lines = [f"# Memory study ({study['n_epoch']} epochs, {study['threads']} torch thread(s))", ""]
    for name, per_model in study["summary"].items():
        data = study["datasets"][name]
        lines += [f"## {name} ({data['dataset']}: {data['n_train_users']} training, {data['n_test_users']} test users)",
                  ""]
        for subset in SUBSETS[-1:] + SUBSETS[:-1]:
            lines += [f"### {subset}: mean ± sd over seeds", "", "| model | seeds | MAE | RMSE | NDCG@3 |",
                      "|---|---|---|---|---|"]
            for model, entry in per_model.items():
                cells = [mean_sd_text(entry["metrics"][subset][metric]) for metric in METRICS]
                lines.append(f"| {model} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
            for reference in REFERENCES:
                row = data["references"][reference][subset]
                lines.append(f"| {reference} | - | " + " | ".join(
                    "-" if row[metric] is None else f"{row[metric]:.4f}" for metric in METRICS) + " |")
            lines += ["", f"### {subset}: paired differences, model minus the model it is compared with: "
                          "mean ± sd over seeds (t = mean / (sd / √n), seeds on which the model is better / seeds); "
                          "bold: the mean exceeds the sd, a measurable difference",
                      "", "| model | against | MAE | RMSE | NDCG@3 |", "|---|---|---|---|---|"]
            for model, entry in per_model.items():
                for label, paired in entry["paired"].items():
                    cells = [paired_text(paired[subset][metric]) for metric in METRICS]
                    lines.append(f"| {model} | {paired['against']} | " + " | ".join(cells) + " |")
            lines.append("")
        if "ridge_references" in data:
            lines += ["### ridge references (test users' query ratings)", "", "| reference | MAE | RMSE |",
                      "|---|---|---|"]
            lines += [f"| {ref} | {v['mae']:.4f} | {v['rmse']:.4f} |" for ref, v in data["ridge_references"].items()]
            lines.append("")
        lines += ["### memory diagnostics of the test users' reads (mean over seeds; epoch 0: before training)", "",
                  "| model | statistic | by epoch |", "|---|---|---|"]
        for model, entry in per_model.items():
            for field, values in (entry["memory_by_epoch"] or {}).items():
                lines.append(f"| {model} | {field} | " + ", ".join(f"{v:.3g}" for v in values) + " |")
        lines += ["", "### critical temperature rho_max(J) of the training users' profiles, and the norm of phi's "
                      "mem_layer weight after training (mean ± sd)", "",
                  "| model | rho_max(J) at start | after training | phi mem_layer weight norm |", "|---|---|---|---|"]
        for model, entry in per_model.items():
            critical, norm = entry["critical_temperature"], entry["phi_mem_weight_norm"]
            lines.append(f"| {model} | {critical['start']['mean']:.3f} ± {critical['start']['sd']:.3f} | "
                         f"{critical['end']['mean']:.3f} ± {critical['end']['sd']:.3f} | "
                         f"{norm['mean']:.2f} ± {norm['sd']:.2f} |")
        separated = {model: entry["type_separation"] for model, entry in per_model.items() if entry["type_separation"]}
        if separated:
            lines += ["", "### planted types in the attention: largest total-variation distance between two types' "
                          "mean attention of the test users (0: identical, 1: disjoint slots; mean ± sd over seeds)", "",
                      "| model | type separation |", "|---|---|"]
            lines += [f"| {model} | {stats['mean']:.3f} ± {stats['sd']:.3f} |" for model, stats in separated.items()]
        lines += ["", "### runtimes (seconds per cell, mean ± sd)", "", "| model | train | wall |", "|---|---|---|"]
        for model, entry in per_model.items():
            lines.append(f"| {model} | {entry['train_seconds']['mean']:.1f} ± {entry['train_seconds']['sd']:.1f} | "
                         f"{entry['wall_seconds']['mean']:.1f} ± {entry['wall_seconds']['sd']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def memory_figure(plt, name, per_model, cells):
    """Attention spread and task-read norm over the epochs (0: before training), per MAMO variant."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for model in (model for model in per_model if model in VARIANTS):
        runs = list(cells[(name, model)].values())
        for ax, field in zip(axes, ("attention_spread", "task_read_norm")):
            series = [[max(value, 1e-9) for value in [run["memory_at_start"][field]]
                       + [row["memory"][field] for row in run["epochs"]]] for run in runs]
            epochs = list(range(len(series[0])))
            line, = ax.plot(epochs, [statistics.mean(v[e] for v in series) for e in epochs], marker="o", label=model)
            ax.fill_between(epochs, [min(v[e] for v in series) for e in epochs],
                            [max(v[e] for v in series) for e in epochs], color=line.get_color(), alpha=0.15)
    free = cells.get((name, "no_memory"))
    if free:
        axes[1].axhline(statistics.mean(r["phi_mem_weight_norm"] for r in free.values()), color="black",
                        linestyle="--", label="no_memory's learned mem_layer weight")
    axes[0].axhline(1e-3, color="grey", linestyle=":", label="collapse threshold")
    for ax, title in zip(axes, ("attention spread over test users (floor 1e-9)", "norm of the task-memory read")):
        ax.set_yscale("log")
        ax.set_xlabel("epoch (0: before training)")
        ax.set_title(title)
    axes[0].legend(fontsize=7, loc="center right")
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"{name}: memory reads over training (mean over seeds, band: min-max)")
    return fig


def scenario_figure(plt, name, per_model):
    """Per-scenario bars of MAE, RMSE and NDCG@3 with the seed-to-seed sd as error bars."""
    models, subsets = list(per_model), list(SUBSETS)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4))
    width = 0.8 / len(models)
    for ax, metric in zip(axes, METRICS):
        for j, model in enumerate(models):
            stats = [per_model[model]["metrics"][subset][metric] for subset in subsets]
            xs = [i + (j - len(models) / 2 + 0.5) * width for i in range(len(subsets))]
            ax.bar(xs, [s["mean"] if s else 0 for s in stats], width, yerr=[s["sd"] if s else 0 for s in stats],
                   capsize=2, label=model, color=plt.cm.tab20(j % 20))
        means = [per_model[m]["metrics"][s][metric]["mean"] for m in models for s in subsets
                 if per_model[m]["metrics"][s][metric]]
        ax.set_ylim(min(means) - 0.05, max(means) + 0.05)
        ax.set_xticks(range(len(subsets)))
        ax.set_xticklabels([s.replace("_user_", " user\n").replace("_", " ") for s in subsets], fontsize=7)
        ax.set_title(metric.upper() + (" (lower is better)" if LOWER_IS_BETTER[metric] else " (higher is better)"))
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"{name}: mean ± sd over seeds per scenario")
    return fig


def write_figures(study, cells, out, log):
    """PNG figures per dataset (matplotlib, optional): OUT/<dataset>_memory_over_epochs.png and
    OUT/<dataset>_scenarios.png. Returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figures (pip install -r requirements-extra.txt)")
        return []
    written = []
    for name, per_model in study["summary"].items():
        for suffix, fig in (("memory_over_epochs", memory_figure(plt, name, per_model, cells)),
                            ("scenarios", scenario_figure(plt, name, per_model))):
            fig.tight_layout()
            written.append(Path(out) / f"{name}_{suffix}.png")
            fig.savefig(written[-1], dpi=90)
            plt.close(fig)
    return written


def check_compatible(out, datasets, n_epoch, threads):
    """SystemExit naming the difference when OUT holds cells made with other epochs, threads or data."""
    checksums = {data.name: data.checksum for data in datasets}
    for runs in read_cells(out).values():
        for record in runs.values():
            found = {"n_epoch": record["n_epoch"], "threads": record["threads"]}
            if found != {"n_epoch": n_epoch, "threads": threads} or \
                    checksums.get(record["dataset"], record["data_checksum"]) != record["data_checksum"]:
                raise SystemExit(f"error: {out} holds cells made with other settings ({record['dataset']}, "
                                 f"{found}, data checksum {record['data_checksum']}) than --epochs {n_epoch} "
                                 f"--threads {threads} on this data: use another --out")


def write_study(out, n_epoch, threads, figures, log):
    """OUT/study.json and OUT/study.md from every finished cell and dataset record (and the figures)."""
    cells = read_cells(out)
    records = {path.stem: json.loads(path.read_text()) for path in sorted((Path(out) / "datasets").glob("*.json"))}
    study = {"n_epoch": n_epoch, "threads": threads, "datasets": records,
             "summary": summarise(cells, records),
             "per_seed": {f"{d}/{m}": {seed: record["results"] for seed, record in runs.items()}
                          for (d, m), runs in cells.items()}}
    atomic_write_json(Path(out) / "study.json", study, indent=None)
    atomic_write_text(Path(out) / "study.md", markdown(study) + "\n")
    if figures:
        write_figures(study, cells, out, log)
    return study


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS),
                        help="default: ml100k and planted, and ml1m when --ml1m-raw is given")
    parser.add_argument("--ml100k-raw", type=Path, help="MovieLens-100K raw folder (u.data, u.user, u.item)")
    parser.add_argument("--ml1m-raw", type=Path, help="MovieLens-1M raw folder (ratings.dat, users.dat, "
                                                     "movies_extrainfos.dat)")
    parser.add_argument("--planted-users", type=int, default=3000, help="users generated for the planted set")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--epochs", type=int, default=config_settings["n_epoch"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cells, study.json, study.md, figures")
    parser.add_argument("--data-root", type=Path, default=Path("data/processed"), help="prepared data folders")
    parser.add_argument("--scratch", type=Path, default=Path("runs/memory-study"), help="temporary run folders")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (changes float rounding)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="skip the PNG figures")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = args.datasets or ["ml100k", "planted"] + (["ml1m"] if args.ml1m_raw else [])
    raw = {"ml100k": args.ml100k_raw, "planted": None, "ml1m": args.ml1m_raw}
    for name in names:
        if name != "planted" and (raw[name] is None or not raw[name].is_dir()):
            flag = f"--{name}-raw"
            raise SystemExit(f"error: {flag} {raw[name] or ''} is needed for the {name} dataset: a folder of its "
                             "raw files")
    torch.set_num_threads(args.threads)
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(line):
        print(f"[{time.perf_counter() - started:7.1f} s] {line}", file=sys.stderr, flush=True)

    datasets = [Dataset(name, raw[name], args.data_root, args.planted_users) for name in names]
    check_compatible(args.out, datasets, args.epochs, args.threads)
    (args.out / "datasets").mkdir(parents=True, exist_ok=True)
    for data in datasets:
        atomic_write_json(args.out / "datasets" / f"{data.name}.json", data.record())
    ran = run_grid(datasets, grid_models(args.variants), args.seeds, args.epochs, args.out, args.scratch, log)
    study = write_study(args.out, args.epochs, args.threads, args.figures, log)
    log(f"{len(ran)} cells run; {sum(len(runs) for runs in study['per_seed'].values())} in {args.out}")
    print((Path(args.out) / "study.md").read_text())


if __name__ == "__main__":
    main()
