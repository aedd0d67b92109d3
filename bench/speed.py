"""Speed and memory at MovieLens-1M scale: `python bench/speed.py [--json FILE] [--device D]`.

Generates synthetic raw data in the ML-1M format (6,040 users by default), prepares it, then
measures with the default configuration:
- preparation time and output size;
- one full epoch (train every training user + evaluate every test user), with resident memory
  sampled user batch by user batch;
- the same work on a subset of users through three paths, interleaved over `--rounds` rounds
  (medians reported, ratios as the median of per-round ratios, so that a slow spell of a shared
  machine does not decide the result): the reference engine (torch.func, one user at a time),
  the sequential path (batched engine, users_per_step = 1, one test user at a time) and the
  batched path;
- training time per global step at several users_per_step, the speed-up each gives over one
  user per step and the marginal cost of one more user, which bounds that speed-up; the
  arithmetic per user (torch.profiler's flop count) and the device's peak matrix-product speed,
  which give the speed-up that even peak-speed arithmetic would allow;
- agreement: the largest difference between the query outputs of the three paths, and between
  the device's and the CPU's (a copy of the model), on the same users and model state.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from data_prep.prepare_data import prepare  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402
from models import make_engine, meta_train_step, predict_query  # noqa: E402
from utils import batch_to, resolve_device, select_users  # noqa: E402


def rss_mb():
    """Current resident set size in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_training(trainer, users, users_per_step, device, rss_samples=None):
    """Train on `users` (index tensor) in steps of users_per_step; returns seconds."""
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(users), users_per_step):
        batch = select_users(trainer.train_tasks, users[start:start + users_per_step].to(device))
        meta_train_step(trainer.model, trainer.engine, batch, trainer.optimizer)
        if rss_samples is not None:
            rss_samples.append(rss_mb())
    synchronize(device)
    return time.perf_counter() - started


def evaluate_users(model, engine, tasks, n_users, users_per_batch):
    """Query outputs [n_users, Q, n_y] of the first n_users of `tasks`, in batches."""
    return torch.cat([predict_query(model, engine, select_users(tasks, slice(s, min(s + users_per_batch, n_users))))
                      for s in range(0, n_users, users_per_batch)])


def timed_evaluation(trainer, n_users, users_per_batch, device):
    """Evaluate the first n_users test users; returns (seconds, outputs [n_users, Q, n_y])."""
    synchronize(device)
    started = time.perf_counter()
    outputs = evaluate_users(trainer.model, trainer.engine, trainer.test_tasks, n_users, users_per_batch)
    synchronize(device)
    return time.perf_counter() - started, outputs


def cpu_outputs(trainer, n_users, users_per_batch):
    """The batched path's evaluation outputs recomputed on the CPU from a copy of the model."""
    model = copy.deepcopy(trainer.model).to("cpu")
    test = batch_to(trainer.test_tasks, torch.device("cpu"))
    return evaluate_users(model, make_engine(model, "batched"), test, n_users, users_per_batch)


def peak_gemm_gflops(device, size=512, repeats=50):
    """This device's float32 matrix-product speed on a large square product (best of 3): the
    ceiling for the per-user arithmetic."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best / 1e9


def flop_per_user(trainer, users, users_per_step):
    """Floating-point operations of one training step per user (torch.profiler's count)."""
    batch = select_users(trainer.train_tasks, users[:users_per_step])
    with torch.profiler.profile(with_flops=True) as profiler:
        meta_train_step(trainer.model, trainer.engine, batch, trainer.optimizer)
    return sum(event.flops for event in profiler.key_averages()) / len(batch.ratings)


def step_cost(trainer, users, batch_sizes, rounds, device):
    """Seconds per global step at each users_per_step B (median over interleaved rounds) and what
    they imply: the speed-up B * t(1) / t(B) over one user per step, the marginal cost of one more
    user between consecutive sizes, and t(1) / (the last marginal cost), the speed-up that no batch
    size can pass while a user costs at least that much."""
    trainer.engine = make_engine(trainer.model, "batched")
    per_step = {size: [] for size in batch_sizes}
    for _ in range(rounds):
        for size in batch_sizes:
            n_users = len(users) - len(users) % size
            per_step[size].append(timed_training(trainer, users[:n_users], size, device) * size / n_users)
    seconds = {size: statistics.median(times) for size, times in per_step.items()}
    sizes = sorted(seconds)
    marginal = {f"{a}-{b}": (seconds[b] - seconds[a]) / (b - a) for a, b in zip(sizes, sizes[1:])}
    one_user = seconds[min(sizes)] / min(sizes)
    last_marginal = list(marginal.values())[-1] if marginal else 0.0
    return {"seconds_per_step": seconds,
            "speedup_at": {size: size * one_user / seconds[size] for size in sizes},
            "marginal_seconds_per_user": marginal,
            "speedup_limit": one_user / last_marginal if last_marginal > 0 else None}


def ideal_speedup(step, users_per_step, gflops):
    """The batched / sequential ratio if every per-user operation ran at the device's peak matrix
    speed and the one-user step cost stayed fixed: B * t(1) / (t(1) + B * flop / peak)."""
    one_user = step["seconds_per_step"][1]
    per_user = step["flop_per_user"] / (gflops * 1e9)
    return users_per_step * one_user / (one_user + users_per_step * per_user)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=int, default=6040)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subset", type=int, default=384, help="users for the sequential-vs-batched comparison")
    parser.add_argument("--users-per-step", type=int, help="override configs.py's users_per_step")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the path comparison")
    parser.add_argument("--scaling", default="1,8,32,128", help="users_per_step values for the step cost")
    parser.add_argument("--work-dir", help="where to put the synthetic data (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-bench-"))
    data_dir = work / "processed"

    started = time.perf_counter()
    prepare("synthetic", work / "raw", data_dir, n_users=args.n_users, log=lambda *_: None)
    prepare_seconds = time.perf_counter() - started
    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset="synthetic", data_dir=str(data_dir), device=str(device))
    if args.users_per_step:
        cfg["users_per_step"] = args.users_per_step
    manifest, train, test = load_data(cfg)
    results = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "device": str(device),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
               "data": {"n_users": manifest["n_users"], "n_train_users": manifest["n_train_users"],
                        "n_test_users": manifest["n_test_users"], "n_items": manifest["n_items"],
                        "n_raw_ratings": manifest.get("n_raw_ratings"),
                        "prepare_seconds": prepare_seconds, "processed_mb": folder_mb(data_dir)},
               "config": {k: cfg[k] for k in ("users_per_step", "eval_batch_users", "embedding_dim", "n_k",
                                              "batch_size", "n_inner_loop")}}

    trainer = MAMRec(cfg, manifest, train, test, work / "run", device)
    n_train, n_test = train.ratings.shape[0], test.ratings.shape[0]
    rss = [rss_mb()]
    train_seconds = timed_training(trainer, trainer.user_order(1), cfg["users_per_step"], device, rss)
    eval_seconds, _ = timed_evaluation(trainer, n_test, cfg["eval_batch_users"], device)
    results["epoch"] = {"seconds": train_seconds + eval_seconds, "train_seconds": train_seconds,
                        "eval_seconds": eval_seconds, "train_users_per_second": n_train / train_seconds,
                        "eval_users_per_second": n_test / eval_seconds,
                        "rss_mb_after_first_step": rss[1], "rss_mb_at_10_percent": rss[len(rss) // 10],
                        "rss_mb_at_end": rss[-1]}

    subset = min(args.subset, n_train, n_test)
    users = trainer.user_order(2)[:subset]
    paths = {"reference": ("reference", 1, 1), "sequential": ("batched", 1, 1),
             "batched": ("batched", cfg["users_per_step"], cfg["eval_batch_users"])}
    rates = {label: {"train": [], "eval": []} for label in paths}
    for _ in range(args.rounds):  # the paths of one kind back to back: this machine's speed drifts
        for label, (engine, step, _) in paths.items():
            trainer.engine = make_engine(trainer.model, engine)
            rates[label]["train"].append(subset / timed_training(trainer, users, step, device))
        outputs = {}  # evaluation changes nothing: the three paths score the same model
        for label, (engine, _, eval_batch) in paths.items():
            trainer.engine = make_engine(trainer.model, engine)
            seconds, outputs[label] = timed_evaluation(trainer, subset, eval_batch, device)
            rates[label]["eval"].append(subset / seconds)
    results["evaluated_users"] = {label: len(output) for label, output in outputs.items()}
    results["agreement"] = {  # max |difference| of the query logits, last round
        "batched_vs_reference": (outputs["batched"] - outputs["reference"]).abs().max().item(),
        "sequential_vs_reference": (outputs["sequential"] - outputs["reference"]).abs().max().item(),
        "device_vs_cpu": (outputs["batched"].cpu() - cpu_outputs(trainer, subset, cfg["eval_batch_users"])).abs().max().item(),
    }
    comparison = {label: {"engine": engine, "users_per_step": step, "users": subset, "rounds": args.rounds,
                          "train_users_per_second": statistics.median(rates[label]["train"]),
                          "eval_users_per_second": statistics.median(rates[label]["eval"]),
                          "train_users_per_second_rounds": rates[label]["train"],
                          "eval_users_per_second_rounds": rates[label]["eval"]}
                  for label, (engine, step, _) in paths.items()}

    def speedup(fast, slow, kind):
        """Median over rounds of the per-round ratio (each round times both paths back to back)."""
        return statistics.median(f / s for f, s in zip(rates[fast][kind], rates[slow][kind]))

    for kind in ("train", "eval"):
        comparison[f"{kind}_speedup"] = speedup("batched", "sequential", kind)
        comparison[f"{kind}_speedup_over_reference"] = speedup("batched", "reference", kind)
    results["sequential_vs_batched"] = comparison
    step = step_cost(trainer, users, [int(b) for b in args.scaling.split(",")], args.rounds, device)
    step["flop_per_user"] = flop_per_user(trainer, users, cfg["users_per_step"])
    results["machine"]["peak_gemm_gflops"] = peak_gemm_gflops(device)
    if 1 in step["seconds_per_step"]:
        step["speedup_at_peak_speed"] = ideal_speedup(step, cfg["users_per_step"], results["machine"]["peak_gemm_gflops"])
    results["step_cost"] = step
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
