"""MAMO on the planted-types dataset, where a profile-dependent start should pay.

    python bench/planted_types.py [--data-dir DIR] [--n-users 6040] [--seeds 1 2 3] [--epochs 3] [--json FILE]

The data (`--dataset synthetic-types`, data_prep/synthetic_types.py): four user types, read from
gender x age group, with opposite tastes. Per training seed, on one prepared copy: MAMO as
published and the memory-free ablation `no_memory` (`mamoRec.run` with the ablation), and
`no_memory_frozen`, the memory-free model whose mem_layer weight is kept at its initial value
(`freeze_mem_layer`). Also, for MAMO after training, the test users' mean attention
over the K slots per planted type: if the memories told types apart, these rows would differ.
Beside them, the ridge references of data_prep/ridge_references.py with the planted type as the
group: what a linear model of the item features reaches knowing each user's type (`per_group`),
or only its 15 support ratings (`per_user`, `per_user_in_space`), computed once per data set.
Results go to --json after every seed (seeds already there are skipped). Prints a markdown table.
"""
import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.seeds_table import METRICS, cell  # noqa: E402
from configs import config_settings  # noqa: E402
from data_prep.prepare_data import prepare  # noqa: E402
from data_prep.ridge_references import ridge_references  # noqa: E402
from data_prep.synthetic_types import task_type, user_type  # noqa: E402
from data_prep.task_io import load_processed  # noqa: E402
from mamoRec import MAMRec, load_data, run  # noqa: E402
from utils import atomic_write_json  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "planted_types.json"
METHODS = ("mamo", "no_memory", "no_memory_frozen", "support_mean", "train_mean")


def overall(table):
    return {metric: table["all"][metric] for metric in METRICS}


def train_frozen(cfg, manifest, train, test):
    """The memory-free model with its mem_layer weight kept at its initial value: its TABLE."""
    frozen_cfg = dict(cfg, feature_memory=False, task_memory=False, freeze_mem_layer=True,
                      run_dir=f"{cfg['run_dir']}/no_memory_frozen")
    trainer = MAMRec(frozen_cfg, manifest, train, test, frozen_cfg["run_dir"], torch.device("cpu"))
    return trainer.fit(cfg["n_epoch"], label="no_memory_frozen")


@torch.no_grad()
def attention_by_type(cfg, manifest, train, test):
    """MAMO's trained attention for the test users: {type: mean a_u over its users (K values)}."""
    trainer = MAMRec(cfg, manifest, train, test, cfg["run_dir"], torch.device("cpu"))
    trainer.load_checkpoint()
    model = trainer.model
    attention = model.read(model.input_loading.user_profile(test.user_codes))
    vocabularies = json.loads((Path(cfg["data_dir"]) / "vocabularies.json").read_text())["user"]
    genders = [vocabularies["gender"][code] for code in test.user_codes[:, 0].tolist()]
    ages = [int(vocabularies["age"][code]) for code in test.user_codes[:, 1].tolist()]
    types = torch.from_numpy(user_type(genders, ages))
    return {int(k): [round(v, 4) for v in attention[types == k].mean(0).tolist()] for k in types.unique()}


def one_seed(base_cfg, seed, scratch):
    cfg = dict(base_cfg, seed=seed, with_ablation=True, run_dir=str(scratch / f"seed={seed}"))
    with contextlib.redirect_stdout(sys.stderr):
        metrics = run(cfg)
        manifest, train, test = load_data(cfg)
        frozen = train_frozen(cfg, manifest, train, test)
    results = {name: overall(table) for name, table in metrics["results"].items()}
    results["no_memory_frozen"] = overall(frozen)
    return {"seed": seed, "results": results, "mamo_train_seconds": round(metrics["train_seconds"], 2),
            "mamo_attention_by_type": attention_by_type(cfg, manifest, train, test)}


def planted_type_references(data_dir):
    """Ridge references with the planted type as the group: {name: {"mae", "rmse"}}."""
    manifest, tasks = load_processed(data_dir)
    vocabularies = json.loads((Path(data_dir) / "vocabularies.json").read_text())["user"]
    return ridge_references(manifest, tasks, lambda task: task_type(task, vocabularies))


def table(study):
    records = list(study["seeds"].values())
    lines = ["| method | seeds | MAE | RMSE | NDCG@3 |", "|---|---|---|---|---|"]
    for method in METHODS:
        cells = [cell([r["results"][method][metric] for r in records]) for metric in METRICS]
        lines.append(f"| {method} | {len(records)} | " + " | ".join(cells) + " |")
    for name, scores in study["ridge_references"].items():
        lines.append(f"| ridge: {name} | - | {scores['mae']:.4f} | {scores['rmse']:.4f} | - |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/processed/synthetic-types"))
    parser.add_argument("--n-users", type=int, default=6040, help="users generated when --data-dir is new")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=config_settings["n_epoch"], help="meta-training epochs")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (read to resume)")
    parser.add_argument("--scratch", type=Path, default=Path("runs/planted-types"), help="run folders")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (changes float rounding)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    manifest = prepare("synthetic-types", None, args.data_dir, n_users=args.n_users, log=lambda m: None)
    base_cfg = copy.deepcopy(config_settings)
    base_cfg.update(dataset="synthetic-types", data_dir=str(args.data_dir), device="cpu", n_epoch=args.epochs)
    header = {"dataset": "synthetic-types", "threads": args.threads, "n_epoch": args.epochs,
              "n_users": manifest["n_users"], "data_seed": base_cfg["random_state"]}
    study = json.loads(args.json.read_text()) if args.json.is_file() else {**header, "seeds": {}}
    found = {key: study.get(key) for key in header}
    if found != header:
        sys.exit(f"error: {args.json} holds runs made with {found}, not {header}: pass another --json")
    if "ridge_references" not in study:
        study["ridge_references"] = planted_type_references(args.data_dir)
        atomic_write_json(args.json, study)
    for seed in args.seeds:
        if str(seed) not in study["seeds"]:
            study["seeds"][str(seed)] = one_seed(base_cfg, seed, args.scratch)
            atomic_write_json(args.json, study)
    print(table(study))


if __name__ == "__main__":
    main()
