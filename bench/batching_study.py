"""Does quality depend on users_per_step? Runs MAMO over rules x users per step x seeds.

    python bench/batching_study.py --dataset movielens-100k --raw-dir /path/ml-100k --data-dir DIR \
        [--rules none sqrt linear sde] [--users-per-step 1 8 32 128] [--seeds 1 2 3] [--json FILE]

Each run is `mamoRec.run` of MAMO alone (no ablation rows) with the default configuration except
`seed`, `users_per_step` and `meta_step_scaling` (the rule that sets the global step's settings from users_per_step, meta_step.py).
Results go to --json after every run; runs already in that file are skipped, so an interrupted
study continues where it stopped. Runs one at a time. Prints a markdown table: mean ± sd over
seeds of the overall MAE / RMSE / NDCG@3 and the median training time, per rule and step size.
"""
import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.seeds_table import METRICS, cell  # noqa: E402
from configs import config_settings  # noqa: E402
from mamoRec import run  # noqa: E402
from modules.meta_step import SCALINGS, meta_step_settings  # noqa: E402
from utils import atomic_write_json, environment  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "batching_study_ml100k.json"


def run_key(rule, users_per_step, seed):
    return f"{rule}/users_per_step={users_per_step}/seed={seed}"


def overall(table):
    return {metric: table["all"][metric] for metric in METRICS}


def one_run(base_cfg, rule, users_per_step, seed, scratch):
    """Train and evaluate one configuration; returns its record for the results file."""
    cfg = dict(base_cfg, seed=seed, users_per_step=users_per_step, meta_step_scaling=rule, ablation=False,
               run_dir=str(scratch / rule / f"users_per_step={users_per_step}" / f"seed={seed}"))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        metrics = run(cfg)
    return {
        "rule": rule, "users_per_step": users_per_step, "seed": seed,
        "meta_step": meta_step_settings(cfg["meta_optimizer"], cfg["lambda"], users_per_step, rule),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "train_seconds": round(metrics["train_seconds"]["mamo"], 2),
        "train_loss_per_epoch": [round(row["train_loss"]["mamo"], 5) for row in metrics["epochs"]],
        **overall(metrics["results"]["mamo"]),
        "references": {name: overall(metrics["results"][name]) for name in ("train_mean", "support_mean")},
    }


def rounded(settings):
    """Optimiser settings with 3 significant digits (betas as a tuple), for the table."""
    return {name: tuple(float(f"{v:.6g}") for v in value) if isinstance(value, (list, tuple)) else float(f"{value:.3g}")
            for name, value in settings.items()}


def table(records, rules, step_sizes):
    """Markdown: one row per (rule, users_per_step) with mean ± sd over the seeds present."""
    lines = ["| rule | users/step | meta step | seeds | MAE | RMSE | NDCG@3 | train s (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for rule in rules:
        for users_per_step in step_sizes:
            rows = [r for r in records if r["rule"] == rule and r["users_per_step"] == users_per_step]
            if rows:
                cells = [cell([r[metric] for r in rows]) for metric in METRICS]
                step = ", ".join(f"{name} {value}" for name, value in rounded(rows[0]["meta_step"]).items())
                lines.append(f"| {rule} | {users_per_step} | {step} | {len(rows)} | "
                             + " | ".join(cells) + f" | {statistics.median(r['train_seconds'] for r in rows):.1f} |")
    support_mean = records[0]["references"]["support_mean"] if records else None
    if support_mean:
        lines.append("| support mean | - | - | - | " + " | ".join(f"{support_mean[m]:.4f}" for m in METRICS) + " | - |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--raw-dir", help="raw files, used when --data-dir is not prepared yet")
    parser.add_argument("--data-dir", required=True, help="prepared dataset (made from --raw-dir if missing)")
    parser.add_argument("--rules", nargs="+", default=list(SCALINGS))
    parser.add_argument("--users-per-step", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file (read to resume)")
    parser.add_argument("--scratch", type=Path, default=Path("runs/batching-study"), help="run folders")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine; the thread count "
                             "changes float rounding, so compare runs made with the same count)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_cfg = copy.deepcopy(config_settings)
    base_cfg.update(dataset=args.dataset, data_dir=args.data_dir, device="cpu",
                    raw_dir=args.raw_dir or base_cfg["raw_dir"].format(dataset=args.dataset))
    study = (json.loads(args.json.read_text()) if args.json.is_file()
             else {"dataset": args.dataset, "threads": args.threads, "runs": {}})
    if study["threads"] != args.threads:
        sys.exit(f"error: {args.json} holds runs made with --threads {study['threads']}, not {args.threads}")
    for rule in args.rules:
        for users_per_step in args.users_per_step:
            for seed in args.seeds:
                key = run_key(rule, users_per_step, seed)
                if key in study["runs"]:
                    continue
                study["runs"][key] = {**one_run(base_cfg, rule, users_per_step, seed, args.scratch),
                                      "environment": environment(torch.device("cpu"))}  # what produced it
                atomic_write_json(args.json, study)
                print(f"{key}: {json.dumps(study['runs'][key])}", file=sys.stderr)
    print(table(list(study["runs"].values()), args.rules, args.users_per_step))


if __name__ == "__main__":
    main()
