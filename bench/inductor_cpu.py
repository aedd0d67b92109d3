"""Does torch.compile (inductor) speed up the batched engine on CPU? `python bench/inductor_cpu.py [--json FILE]`

Compiles the batched engine's meta-gradient computation (the local updates of a batch of users and
their query gradients: everything but the input loading, the optimiser step and the memory writes)
with torch.compile(fullgraph=True) and times training steps at users_per_step 32 with it and
without, alternating step by step (medians). Reports the compilation time (the first compiled
call) apart. This measurement is why configs.py's `compile` offers no CPU compilation.
"""
import argparse
import copy
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
from models import meta_train_step  # noqa: E402
from speed import machine, write_results  # noqa: E402  (bench/speed.py)
from utils import select_users  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-users", type=int, default=6040)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind (default 20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work-dir", help="where to put the synthetic data (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-inductor-"))
    prepare("synthetic", work / "raw", work / "processed", n_users=args.n_users, log=lambda *_: None)
    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset="synthetic", data_dir=str(work / "processed"), device="cpu", compile="none")
    manifest, train, test = load_data(cfg)
    trainer = MAMRec(cfg, manifest, train, test, work / "run", torch.device("cpu"))
    engine, order, size = trainer.engine, trainer.user_order(1), cfg["users_per_step"]
    eager = engine.meta_gradients
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    batches = iter(range(len(order) // size))

    def step(meta_gradients):
        start = next(batches) * size
        engine.meta_gradients = meta_gradients
        began = time.perf_counter()
        meta_train_step(trainer.model, engine, select_users(trainer.train_tasks, order[start:start + size]),
                        trainer.optimizer)
        return time.perf_counter() - began

    step(eager)
    compile_seconds = step(compiled)
    times = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        times["eager"].append(step(eager))
        times["compiled"].append(step(compiled))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    write_results({"machine": machine(torch.device("cpu")), "users_per_step": size,
                   "compile_seconds_first_call": compile_seconds,
                   "ms_per_step_median": {kind: 1e3 * value for kind, value in medians.items()},
                   "compiled_over_eager": medians["compiled"] / medians["eager"]}, args.json)


if __name__ == "__main__":
    main()
