"""Epoch time of two versions of this code, side by side: `python bench/epoch_ab.py BEFORE AFTER --data-dir D`.

BEFORE and AFTER are checkouts of this repository (e.g. `git worktree add /tmp/before <commit>`).
Each round trains every training user and evaluates every test user of the prepared data in D
(`--epochs` epochs in one fresh process per checkout), BEFORE then AFTER, with the default
configuration of each checkout. Rounds alternate so that a slow spell of a shared machine slows
both; the report gives every epoch, the medians and the per-round ratio AFTER / BEFORE.
The timing loop is written here rather than taken from bench/speed.py: an older checkout may not
have the functions this one's speed.py offers, and each worker must run only its own checkout's code.
Prepare D once with `python bench/speed.py --prepare-only --work-dir W` (D = W/processed).
"""
import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def time_epochs(checkout, data_dir, n_epochs, threads):
    """Run in a worker process: import `checkout`'s code, train and evaluate n_epochs epochs -> [record]."""
    sys.path.insert(0, str(checkout))
    import torch
    torch.set_num_threads(threads)
    from configs import config_settings
    from mamoRec import MAMRec, load_data
    from models import meta_train_step, predict_query
    from utils import select_users

    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset="synthetic", data_dir=str(data_dir), device="cpu")
    manifest, train, test = load_data(cfg)
    trainer = MAMRec(cfg, manifest, train, test, Path(tempfile.mkdtemp(prefix="mamo-ab-")) / "run",
                     torch.device("cpu"))
    n_test, step, eval_batch = test.ratings.shape[0], cfg["users_per_step"], cfg["eval_batch_users"]
    records = []
    for epoch in range(1, n_epochs + 1):
        users = trainer.user_order(epoch)
        started = time.perf_counter()
        for start in range(0, len(users), step):
            batch = select_users(trainer.train_tasks, users[start:start + step])
            meta_train_step(trainer.model, trainer.engine, batch, trainer.optimizer)
        trained = time.perf_counter()
        for start in range(0, n_test, eval_batch):
            predict_query(trainer.model, trainer.engine,
                          select_users(trainer.test_tasks, slice(start, min(start + eval_batch, n_test))))
        done = time.perf_counter()
        records.append({"seconds": done - started, "train_seconds": trained - started, "eval_seconds": done - trained})
    return records


def git_commit(checkout):
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or None


def check_inputs(parser, args):
    """Refuse, in one line, a BEFORE or AFTER that is no checkout of this repository and a
    --data-dir without prepared data."""
    for name, path in (("BEFORE", args.before), ("AFTER", args.after)):
        if not (path / "mamoRec.py").is_file():
            parser.error(f"{name} {path} is not a checkout of this repository (no mamoRec.py)")
    if not (args.data_dir / "manifest.json").is_file():
        parser.error(f"--data-dir {args.data_dir} holds no prepared data (manifest.json)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True, help="prepared synthetic data (manifest.json)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per process (the first one included)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one checkout's epochs, printed as JSON for the parent
        print(json.dumps(time_epochs(args.after, args.data_dir, args.epochs, args.threads)))
        return 0
    check_inputs(parser, args)
    if min(args.rounds, args.epochs, args.threads) < 1:
        parser.error("--rounds, --epochs and --threads must be at least 1")
    rounds = []
    for _ in range(args.rounds):
        rounds.append({})
        for label, checkout in (("before", args.before), ("after", args.after)):
            worker = [sys.executable, __file__, "--worker", str(args.before), str(checkout.resolve()),
                      "--data-dir", str(args.data_dir), "--epochs", str(args.epochs), "--threads", str(args.threads)]
            output = subprocess.run(worker, check=True, capture_output=True, text=True).stdout
            rounds[-1][label] = json.loads(output.splitlines()[-1])
    medians = {label: statistics.median(e["seconds"] for r in rounds for e in r[label]) for label in ("before", "after")}
    ratios = [statistics.median(e["seconds"] for e in r["after"]) / statistics.median(e["seconds"] for e in r["before"])
              for r in rounds]
    import torch  # the parent imports this checkout's modules only now: a worker imports its own checkout's
    from utils import atomic_write_json, environment
    torch.set_num_threads(args.threads)
    results = {"before": {"path": str(args.before), "commit": git_commit(args.before)},
               "after": {"path": str(args.after), "commit": git_commit(args.after)},
               "data_dir": str(args.data_dir), "threads": args.threads, "environment": environment(torch.device("cpu")),
               "rounds": rounds, "median_epoch_seconds": medians, "after_over_before_per_round": ratios}
    print(json.dumps({"median_epoch_seconds": medians, "after_over_before_per_round": ratios}, indent=2))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
