"""What the per-epoch memory diagnostics cost: `python bench/diagnostics_cost.py [--epochs 3] [--json FILE]`.

On synthetic data at MovieLens-1M scale (6,040 generated users, prepared into --data-dir if
missing), trains MAMO with the default configuration and, after each epoch, times the epoch's
training, its evaluation of the test users and the memory diagnostics of those users (the median
of --repeats timings, interleaved with the evaluation). Reports the diagnostics' share of an epoch
(training + evaluation) per epoch and its median.
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from data_prep.prepare_data import ensure_prepared  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402
from utils import atomic_write_json, environment  # noqa: E402


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/processed/synthetic"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timings of the evaluation and diagnostics per epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_prepared("synthetic", None, args.data_dir, n_users=6040, log=lambda line: None)
    cfg = dict(copy.deepcopy(config_settings), dataset="synthetic", data_dir=str(args.data_dir), device="cpu")
    manifest, train, test = load_data(cfg)
    trainer = MAMRec(cfg, manifest, train, test, "runs/diagnostics-cost", torch.device("cpu"))
    rows = []
    for epoch in range(1, args.epochs + 1):
        train_seconds = timed(lambda: trainer.train_epoch(epoch))
        evaluation, diagnostics = [], []
        for _ in range(args.repeats):
            evaluation.append(timed(trainer.evaluate))
            diagnostics.append(timed(trainer.memory_record))
        epoch_seconds = train_seconds + statistics.median(evaluation)
        rows.append({"epoch": epoch, "train_seconds": train_seconds, "eval_seconds": statistics.median(evaluation),
                     "diagnostics_seconds": statistics.median(diagnostics),
                     "share_of_epoch": statistics.median(diagnostics) / epoch_seconds})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"n_train_users": train.ratings.shape[0], "n_test_users": test.ratings.shape[0], "threads": args.threads,
              "epochs": rows, "median_share_of_epoch": statistics.median(r["share_of_epoch"] for r in rows),
              "environment": environment(torch.device("cpu"))}
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
