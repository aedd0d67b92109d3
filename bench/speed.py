"""Speed and memory at MovieLens-1M scale: `python bench/speed.py [--json FILE] [--device D]`.

Generates synthetic raw data in the ML-1M format (6,040 users by default), prepares it, then
measures with the default configuration:
- preparation time and output size;
- full epochs (train every training user + evaluate every test user), back to back, with
  resident memory sampled user batch by user batch: every epoch's time, their median after the
  first epoch (which also grows the heap and captures CUDA graphs) and the last epoch's whole
  record; the time spent capturing CUDA graphs (`--compile`) is reported apart;
- the same work on a subset of users through three paths, interleaved over `--rounds` rounds
  (medians reported, ratios as the median of per-round ratios, so that a slow spell of a shared
  machine does not decide the result): the reference engine (torch.func, one user at a time),
  the sequential path (batched engine, users_per_step = 1, one test user at a time) and the
  batched path;
- training time per global step at several users_per_step (`--scaling`), the speed-up each gives
  over one user per step and the marginal cost of one more user, which bounds that speed-up; the
  arithmetic per user (torch.profiler's flop count) and the device's peak matrix-product speed,
  which give the speed-up that even peak-speed arithmetic would allow;
- agreement: the largest difference between the query outputs of the three paths, and between
  the device's and the CPU's (a copy of the model), on the same users and model state.

`--user-scaling 6040,24160,60400` instead measures how preparation, an epoch and peak resident
memory grow with the number of users, each size prepared and trained in fresh processes.
"""
import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from data_prep.prepare_data import prepare  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402
from models import COMPILE_MODES, make_engine, meta_train_step, predict_query, resolve_compile  # noqa: E402
from utils import atomic_write_json, batch_to, git_state, heap_top_pad, resolve_device, select_users  # noqa: E402

#: Largest distance of a --user-scaling point from the fitted line, relative to its value, still called linear.
LINEAR_TOLERANCE = 0.1


def rss_mb():
    """Current resident set size in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    """This process's peak resident set size so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def machine(device):
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "heap_top_pad_bytes": heap_top_pad["bytes"], **git_state()}


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
    return evaluate_users(model, make_engine(model, "batched", compile="none"), test, n_users, users_per_batch)


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
    """Floating-point operations of one training step per user (eager engine): torch.profiler's
    count, plus the in-place batched products (baddbmm_), which it does not count."""
    batch = select_users(trainer.train_tasks, users[:users_per_step])
    engine = make_engine(trainer.model, "batched", compile="none")
    with torch.profiler.profile(with_flops=True, record_shapes=True) as profiler:
        meta_train_step(trainer.model, engine, batch, trainer.optimizer)
    events = profiler.key_averages(group_by_input_shape=True)
    flop = sum(event.flops for event in events)
    for event in events:
        if event.key == "aten::baddbmm_":
            (n_batch, rows, inner), (_, _, cols) = event.input_shapes[1], event.input_shapes[2]
            flop += 2 * n_batch * rows * inner * cols * event.count
    return flop / len(batch.ratings)


WARMUP_ROUNDS = 2  # step_cost's uncounted rounds (see there)


def step_cost(trainer, users, batch_sizes, rounds, device):
    """Seconds per global step at each users_per_step B (median over interleaved rounds) and what
    they imply: the speed-up B * t(1) / t(B) over one user per step, the marginal cost of one more
    user between consecutive sizes, and t(1) / (the last marginal cost), the speed-up that no batch
    size can pass while a user costs at least that much. The first WARMUP_ROUNDS rounds are not
    counted: with cuda-graphs a step shape runs eagerly at its first call and is captured at its
    second, and a size as large as the subset makes one step per round."""
    per_step = {size: [] for size in batch_sizes}
    for round_ in range(WARMUP_ROUNDS + rounds):
        for size in batch_sizes:
            n_users = len(users) - len(users) % size
            seconds = timed_training(trainer, users[:n_users], size, device) * size / n_users
            if round_ >= WARMUP_ROUNDS:
                per_step[size].append(seconds)
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


class Parser(argparse.ArgumentParser):
    """Refuses bad arguments with one line (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def size_list(text):
    """'1,32,256' -> [1, 32, 256]: distinct integers >= 1."""
    sizes = [positive_int(part) for part in text.split(",")]
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"sizes must be distinct, got {text!r}")
    return sizes


def parse_args(argv):
    parser = Parser(prog="speed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=positive_int, default=6040, help="synthetic users (default 6040)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--compile", default="auto", choices=COMPILE_MODES,
                        help="how the batched engine runs (configs.py 'compile'; default auto)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--subset", type=positive_int, default=384,
                        help="users for the path comparison and the step cost (default 384)")
    parser.add_argument("--users-per-step", type=positive_int, help="override configs.py's users_per_step")
    parser.add_argument("--epochs", type=positive_int, default=2,
                        help="epochs timed back to back; the median after the first is reported (default 2)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of the comparisons")
    parser.add_argument("--scaling", type=size_list, default=[1, 32, 256],
                        help="users_per_step values for the step cost, each at most --subset (default 1,32,256)")
    parser.add_argument("--epoch-only", action="store_true", help="only prepare and time the epochs")
    parser.add_argument("--prepared", action="store_true", help="use the data already prepared in --work-dir")
    parser.add_argument("--prepare-only", action="store_true", help="only prepare the data in --work-dir")
    parser.add_argument("--user-scaling", type=size_list,
                        help="numbers of users, e.g. 6040,24160,60400: time and memory of each in fresh processes")
    parser.add_argument("--work-dir", help="where to put the synthetic data (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    too_big = [size for size in args.scaling if size > args.subset]
    if too_big and not (args.epoch_only or args.prepare_only or args.user_scaling):
        parser.error(f"--scaling sizes {too_big} exceed --subset {args.subset}: each step size needs at least "
                     "that many users")
    if args.prepared and not args.work_dir:
        parser.error("--prepared needs the --work-dir holding the prepared data")
    if args.user_scaling and (args.epoch_only or args.prepare_only):
        parser.error("--user-scaling runs --prepare-only and --epoch-only itself; give it alone")
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    try:
        args.compile_mode = resolve_compile(args.compile, "batched", args.device)
    except ValueError as error:
        parser.error(f"--compile: {error}")
    return args


def prepare_timed(work, n_users):
    """Prepare the synthetic set in work/processed -> its data record (seconds, size, this process's peak RSS)."""
    started = time.perf_counter()
    prepare("synthetic", work / "raw", work / "processed", n_users=n_users, log=lambda *_: None)
    return {"prepare_seconds": time.perf_counter() - started, "processed_mb": folder_mb(work / "processed"),
            "prepare_peak_rss_mb": peak_rss_mb()}


def timed_epochs(trainer, cfg, n_epochs, device):
    """Train and evaluate every user n_epochs times -> [per-epoch record]; resident memory sampled
    per step, and the process's minor page faults (pages the system had to hand out again)."""
    n_train, n_test = trainer.train_tasks.ratings.shape[0], trainer.test_tasks.ratings.shape[0]
    epochs = []
    for epoch in range(1, n_epochs + 1):
        rss = [rss_mb()]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        train_seconds = timed_training(trainer, trainer.user_order(epoch), cfg["users_per_step"], device, rss)
        eval_seconds, _ = timed_evaluation(trainer, n_test, cfg["eval_batch_users"], device)
        epochs.append({"seconds": train_seconds + eval_seconds, "train_seconds": train_seconds,
                       "eval_seconds": eval_seconds, "train_users_per_second": n_train / train_seconds,
                       "eval_users_per_second": n_test / eval_seconds,
                       "rss_mb_after_first_step": rss[1], "rss_mb_at_10_percent": rss[len(rss) // 10],
                       "rss_mb_at_end": rss[-1],
                       "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
    return epochs


def epoch_summary(epochs):
    """Every epoch's times and the median epoch after the first (of the only one if --epochs 1):
    [per-epoch record] -> {"seconds": [...], "train_seconds": [...], "eval_seconds": [...],
    "median_epoch" (1-based: the lower median of an even count, so that train + eval add up),
    "median_seconds", "min_seconds", "max_seconds", "counted_epochs": [first, last] (1-based)}."""
    first = 1 if len(epochs) > 1 else 0
    counted = sorted(range(first, len(epochs)), key=lambda i: epochs[i]["seconds"])
    summary = {key: [epoch[key] for epoch in epochs] for key in ("seconds", "train_seconds", "eval_seconds")}
    middle = counted[(len(counted) - 1) // 2]
    summary.update(median_epoch=middle + 1, median_seconds=epochs[middle]["seconds"],
                   min_seconds=epochs[counted[0]]["seconds"], max_seconds=epochs[counted[-1]]["seconds"],
                   counted_epochs=[first + 1, len(epochs)])
    return summary


def write_results(results, path):
    print(json.dumps(results, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, results)


def user_scaling(args):
    """Prepare and train each size in fresh processes -> per-size records and whether cost grows linearly."""
    script, work_root = Path(__file__).resolve(), Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-scaling-"))
    common = ["--device", str(args.device), "--compile", args.compile, "--epochs", str(args.epochs)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    sizes = {}
    for n_users in args.user_scaling:
        work = work_root / f"users{n_users}"
        runs = {}
        for mode in ("--prepare-only", "--epoch-only"):
            out = work / f"{mode[2:]}.json"
            extra = ["--prepared"] if mode == "--epoch-only" else []
            subprocess.run([sys.executable, str(script), mode, *extra, "--n-users", str(n_users), "--work-dir",
                            str(work), "--json", str(out), *common], check=True, stdout=subprocess.DEVNULL)
            runs[mode] = json.loads(out.read_text())
        summary = runs["--epoch-only"]["epochs"]
        epoch = {key: summary[key][summary["median_epoch"] - 1] for key in ("seconds", "train_seconds", "eval_seconds")}
        sizes[n_users] = {**runs["--prepare-only"]["data"], "epoch_seconds": epoch["seconds"],
                          "train_seconds": epoch["train_seconds"], "eval_seconds": epoch["eval_seconds"],
                          "training_peak_rss_mb": runs["--epoch-only"]["peak_rss_mb"]}
    results = {"machine": machine(args.device), "compile": args.compile_mode, "sizes": sizes,
               "growth": growth(sizes)}
    write_results(results, args.json)


def growth(sizes):
    """How each measure grows with the number of users: the least-squares line a + b * users, the
    marginal cost per user between consecutive sizes, and whether the points lie on the line
    (largest residual at most LINEAR_TOLERANCE of the measured value: linear growth; a fixed part
    such as the interpreter's memory goes into a)."""
    users = sorted(sizes)
    measures = ("prepare_seconds", "epoch_seconds", "training_peak_rss_mb", "prepare_peak_rss_mb", "processed_mb")
    result = {}
    for measure in measures:
        values = [sizes[n][measure] for n in users]
        intercept, slope = least_squares(users, values)
        residual = max(abs(v - (intercept + slope * n)) / v for n, v in zip(users, values))
        result[measure] = {"intercept": intercept, "slope_per_user": slope,
                           "marginal_per_user": {f"{a}-{b}": (vb - va) / (b - a) for (a, va), (b, vb)
                                                 in zip(zip(users, values), zip(users[1:], values[1:]))},
                           "largest_relative_residual": residual, "linear": residual <= LINEAR_TOLERANCE}
    return result


def least_squares(xs, ys):
    """(intercept, slope) of the least-squares line through the points; slope 0 for one point."""
    if len(xs) < 2:
        return ys[0], 0.0
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    return mean_y - slope * mean_x, slope


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.user_scaling:
        return user_scaling(args)
    device = args.device
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-bench-"))
    data = {} if args.prepared else prepare_timed(work, args.n_users)
    if args.prepare_only:
        return write_results({"machine": machine(device), "data": data}, args.json)
    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset="synthetic", data_dir=str(work / "processed"), device=str(device), compile=args.compile)
    if args.users_per_step:
        cfg["users_per_step"] = args.users_per_step
    manifest, train, test = load_data(cfg)
    data.update({"n_users": manifest["n_users"], "n_train_users": manifest["n_train_users"],
                 "n_test_users": manifest["n_test_users"], "n_items": manifest["n_items"],
                 "n_raw_ratings": manifest.get("n_raw_ratings")})
    trainer = MAMRec(cfg, manifest, train, test, work / "run", device)  # sets the heap pad the machine record shows
    results = {"machine": machine(device), "data": data,
               "config": {k: cfg[k] for k in ("users_per_step", "eval_batch_users", "embedding_dim", "n_k",
                                              "batch_size", "n_inner_loop")}}
    epochs = timed_epochs(trainer, cfg, args.epochs, device)
    results["epoch"], results["epochs"] = epochs[-1], epoch_summary(epochs)
    results["compile"] = {"mode": args.compile_mode, "first_epoch_seconds": epochs[0]["seconds"],
                          "capture_seconds": getattr(trainer.engine, "capture_seconds", 0.0)}
    if args.epoch_only:
        results["peak_rss_mb"] = peak_rss_mb()
        return write_results(results, args.json)

    n_train, n_test = train.ratings.shape[0], test.ratings.shape[0]
    subset = min(args.subset, n_train, n_test)
    if max(args.scaling) > subset:
        sys.exit(f"speed.py: error: --scaling size {max(args.scaling)} exceeds the {subset} users available "
                 f"({n_train} training, {n_test} test); lower --scaling or raise --n-users")
    users = trainer.user_order(args.epochs + 1)[:subset]
    compile_of = {"reference": "none", "batched": args.compile}
    paths = {"reference": ("reference", 1, 1), "sequential": ("batched", 1, 1),
             "batched": ("batched", cfg["users_per_step"], cfg["eval_batch_users"])}
    rates = {label: {"train": [], "eval": []} for label in paths}
    for _ in range(args.rounds):  # the paths of one kind back to back: this machine's speed drifts
        for label, (engine, step, _) in paths.items():
            trainer.engine = make_engine(trainer.model, engine, compile_of[engine])
            rates[label]["train"].append(subset / timed_training(trainer, users, step, device))
        outputs = {}  # evaluation changes nothing: the three paths score the same model
        for label, (engine, _, eval_batch) in paths.items():
            trainer.engine = make_engine(trainer.model, engine, compile_of[engine])
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
    trainer.engine = make_engine(trainer.model, "batched", args.compile)
    step = step_cost(trainer, users, args.scaling, args.rounds, device)
    step["flop_per_user"] = flop_per_user(trainer, users, cfg["users_per_step"])
    results["machine"]["peak_gemm_gflops"] = peak_gemm_gflops(device)
    if 1 in step["seconds_per_step"]:
        step["speedup_at_peak_speed"] = ideal_speedup(step, cfg["users_per_step"], results["machine"]["peak_gemm_gflops"])
    results["step_cost"] = step
    results["peak_rss_mb"] = peak_rss_mb()
    write_results(results, args.json)


if __name__ == "__main__":
    main()
