"""Evidence behind the defaults that depart from the released code (docs/fidelity.md).

    python bench/defaults_evidence.py --raw-dir RAW/ml-100k --data-dir data/processed/movielens-100k \
        [--dataset movielens-100k] [--seed 1] [--json FILE]

On one prepared dataset (default configuration otherwise, 3 epochs):
1. point prediction: one trained model evaluated with `argmax` and `expected`, and without the
   local update (rho = 0), next to the support mean;
2. global step: SGD with the released lambda 0.05, Adam with 0.05, Adam with 0.005.
Prints overall MAE / RMSE / NDCG@3 per variant (and the training loss per epoch for 2.).
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from mamoRec import MAMRec, load_data, reference_rows  # noqa: E402
from utils import atomic_write_json, environment  # noqa: E402


def overall(table):
    return {key: round(table["all"][key], 4) for key in ("mae", "rmse", "ndcg@3")}


def train(cfg, manifest, train_tasks, test_tasks, run_dir):
    trainer = MAMRec(cfg, manifest, train_tasks, test_tasks, run_dir, torch.device("cpu"))
    losses = [round(trainer.train_epoch(epoch), 4) for epoch in range(1, cfg["n_epoch"] + 1)]
    return trainer, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k", help="the dataset --data-dir holds or will hold")
    parser.add_argument("--data-dir", required=True, help="processed tasks folder (prepared first if missing)")
    parser.add_argument("--raw-dir", help="raw data folder, to prepare --data-dir when it is missing")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/defaults-evidence", help="scratch folder")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    started_in = environment(torch.device("cpu"))  # the code that runs: later edits must not be recorded
    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset=args.dataset, data_dir=args.data_dir, raw_dir=args.raw_dir, seed=args.seed)
    manifest, train_tasks, test_tasks = load_data(cfg)
    results = {"dataset": manifest["dataset"], "seed": args.seed,
               "support_mean": overall(reference_rows(train_tasks, test_tasks)["support_mean"])}

    trainer, _ = train(cfg, manifest, train_tasks, test_tasks, args.run_dir)
    prediction = {}
    for mode in ("argmax", "expected"):
        trainer.cfg["prediction"] = mode
        prediction[mode] = overall(trainer.evaluate())
    trainer.model.config["rho"] = 0.0
    prediction["expected, no local update (rho = 0)"] = overall(trainer.evaluate())
    results["prediction"] = prediction

    global_step = {}
    for optimizer, lr in (("sgd", 0.05), ("adam", 0.05), ("adam", 0.005)):
        variant = dict(cfg, meta_optimizer=optimizer, **{"lambda": lr})
        trainer, losses = train(variant, manifest, train_tasks, test_tasks, args.run_dir)
        global_step[f"{optimizer} lambda={lr}"] = {**overall(trainer.evaluate()), "train_loss_per_epoch": losses}
    results["global_step"] = global_step
    results["environment"] = started_in
    print(json.dumps(results, indent=2))
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
