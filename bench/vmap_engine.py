"""Is the hand-written batched engine worth keeping? `python bench/vmap_engine.py [--json FILE]`

A batched engine written with `torch.func.vmap(grad_and_value(...))` over dense per-user theta
(first order, plain gradient descent local update with norm clipping: what the batched engine
computes) is timed against `models.BatchedEngine` on the same users: each path trains its own
copy of the same model on the same `--users` training users, `--users-per-step` per global step,
and evaluates the same test users, over `--rounds` interleaved rounds (median users per second,
speed-up as the median of per-round ratios). Agreement: from one model state, the largest
difference between the two paths' query outputs (float32) and, after one plain SGD global step in
float64, between their parameters and memories. Data: the synthetic set in the ML-1M format
(6,040 users unless `--n-users`), or `--data-dir` (a prepared dataset).
"""
import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from data_prep.prepare_data import prepare  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402
from models import MEM_WEIGHT, MetaGradients, clip_scale, make_engine, meta_train_step, support_batches  # noqa: E402
from modules.memories import DenseUserValues  # noqa: E402
from speed import evaluate_users  # noqa: E402  (bench/speed.py)
from utils import atomic_write_json, select_users  # noqa: E402


class VmapEngine:
    """All users of a batch at once with torch.func.vmap over dense per-user theta (plain gradient
    descent, first order): the same contract as models.BatchedEngine."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def user_loss(self, theta, profile, item_profiles, targets):
        """One user's loss: theta {name: tensor}, profile [D_u], item_profiles [n, D_i], targets [n]."""
        return self.model.loss(functional_call(self.model.theta_net, theta, (profile, item_profiles)), targets)

    def adapted(self, batch, profiles, item_profiles, attention):
        """Dense adapted theta {name: [B, *shape]} after the local update on the support rows."""
        cfg, support = self.config, batch.support_size
        targets = self.model.targets(batch.ratings)
        theta = {name: v.detach() for name, v in self.model.initial_theta(attention, profiles.shape[0]).items()}
        theta0 = theta
        batched_grad = vmap(grad(self.user_loss))
        for rows in support_batches(support, cfg["batch_size"], cfg["n_inner_loop"]):
            grads = batched_grad(theta, profiles, item_profiles[:, rows], targets[:, rows])
            sq_norm = sum(g.pow(2).flatten(1).sum(1) for g in grads.values())
            step_scale = -cfg["rho"] * clip_scale(sq_norm, cfg["grad_clip"])
            theta = {name: theta[name] + step_scale.view(-1, *[1] * (g.dim() - 1)) * g for name, g in grads.items()}
        return theta0, theta

    def meta_gradients(self, batch, profiles, item_profiles, attention):
        """As BatchedEngine.meta_gradients (no query-gradient clip)."""
        n_users, support = profiles.shape[0], batch.support_size
        targets = self.model.targets(batch.ratings)
        theta0, theta = self.adapted(batch, profiles, item_profiles, attention)
        query_grad_and_loss = vmap(grad_and_value(self.user_loss, argnums=(0, 1, 2)))
        (theta_grads, profile_grads, query_item_grads), losses = query_grad_and_loss(
            theta, profiles, item_profiles[:, support:], targets[:, support:])
        item_grads = torch.zeros_like(item_profiles)
        item_grads[:, support:] = query_item_grads / n_users
        task_memory = self.config["task_memory"]
        return MetaGradients(
            query_loss=losses,
            phi_grads={name: g.mean(0) for name, g in theta_grads.items()},
            profile_grads=profile_grads / n_users,
            item_grads=item_grads,
            user_grads={name: DenseUserValues(g) for name, g in theta_grads.items() if name.startswith("user.")},
            mem_weights=DenseUserValues(theta[MEM_WEIGHT]) if task_memory else None,
            mem_updates=DenseUserValues(theta[MEM_WEIGHT] - theta0[MEM_WEIGHT]) if task_memory else None,
        )

    def predict(self, batch, profiles, item_profiles, attention):
        """Query outputs [B, Q, n_y] after the local update."""
        _, theta = self.adapted(batch, profiles, item_profiles, attention)
        run = vmap(lambda t, p, i: functional_call(self.model.theta_net, t, (p, i)))
        return run(theta, profiles, item_profiles[:, batch.support_size:])


def train_seconds(model, engine, optimizer, tasks, users, users_per_step):
    started = time.perf_counter()
    for start in range(0, len(users), users_per_step):
        meta_train_step(model, engine, select_users(tasks, users[start:start + users_per_step]), optimizer)
    return time.perf_counter() - started


def evaluate(model, engine, tasks, n_users, users_per_batch):
    """(seconds, query outputs [n_users, Q, n_y]) for the first n_users of `tasks`."""
    started = time.perf_counter()
    outputs = evaluate_users(model, engine, tasks, n_users, users_per_batch)
    return time.perf_counter() - started, outputs


def max_state_difference(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    return max((state_a[name] - state_b[name]).abs().max().item() for name in state_a)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a prepared dataset (default: synthetic data prepared in --work-dir)")
    parser.add_argument("--n-users", type=int, default=6040, help="users of the synthetic data")
    parser.add_argument("--work-dir", help="where to prepare the synthetic data (default: a temporary folder)")
    parser.add_argument("--users", type=int, default=384, help="training and test users timed per round")
    parser.add_argument("--users-per-step", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    cfg = copy.deepcopy(config_settings)
    data_dir = args.data_dir
    if data_dir is None:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="mamo-vmap-"))
        data_dir = str(work / "processed")
        prepare("synthetic", work / "raw", data_dir, n_users=args.n_users, log=lambda *_: None)
    cfg.update(dataset="synthetic", data_dir=data_dir, device="cpu", users_per_step=args.users_per_step)
    manifest, train, test = load_data(cfg)
    trainer = MAMRec(cfg, manifest, train, test, tempfile.mkdtemp(prefix="mamo-vmap-run-"), torch.device("cpu"))
    n_users = min(args.users, train.ratings.shape[0], test.ratings.shape[0])
    users = trainer.user_order(1)[:n_users]
    engines = {"batched": make_engine, "vmap": lambda model, _: VmapEngine(model)}

    # agreement, from one model state: query outputs in float32; one global step in float64, where
    # no pre-activation lies within rounding of the activation's kink (in float32 one such unit
    # changes its user's gradient by up to 90 %, in either engine)
    copies = {label: copy.deepcopy(trainer.model) for label in engines}
    outputs = {label: evaluate(model, engines[label](model, "batched"), trainer.test_tasks, 64, 64)[1]
               for label, model in copies.items()}
    for label, model in copies.items():  # plain SGD: Adam's first step would amplify rounding in tiny gradients
        model.double()
        optimizer = torch.optim.SGD(model.meta_parameters(), lr=cfg["lambda"])
        train_seconds(model, engines[label](model, "batched"), optimizer, trainer.train_tasks,
                      users[:args.users_per_step], args.users_per_step)
    agreement = {"query_outputs_max_abs_difference_float32": (outputs["batched"] - outputs["vmap"]).abs().max().item(),
                 "state_after_one_step_max_abs_difference_float64": max_state_difference(copies["batched"],
                                                                                         copies["vmap"])}

    # timing: each path trains its own copy on the same users, rounds interleaved
    states = {label: copy.deepcopy(trainer.model) for label in engines}
    optimizers = {label: torch.optim.Adam(model.meta_parameters(), lr=cfg["lambda"]) for label, model in states.items()}
    rates = {label: {"train": [], "eval": []} for label in engines}
    for _ in range(args.rounds):
        for label, model in states.items():
            engine = engines[label](model, "batched")
            seconds = train_seconds(model, engine, optimizers[label], trainer.train_tasks, users, args.users_per_step)
            rates[label]["train"].append(n_users / seconds)
            seconds, _ = evaluate(model, engine, trainer.test_tasks, n_users, cfg["eval_batch_users"])
            rates[label]["eval"].append(n_users / seconds)
    results = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"},
        "data": {"dataset": manifest["dataset"], "n_users": manifest["n_users"],
                 "user_dim": trainer.model.input_loading.user_dim, "item_dim": trainer.model.input_loading.item_dim},
        "users": n_users, "users_per_step": args.users_per_step, "eval_batch_users": cfg["eval_batch_users"],
        "rounds": args.rounds, "agreement": agreement,
    }
    for label in engines:
        for kind in ("train", "eval"):
            results.setdefault(label, {})[f"{kind}_users_per_second"] = statistics.median(rates[label][kind])
            results[label][f"{kind}_users_per_second_rounds"] = rates[label][kind]
    for kind in ("train", "eval"):
        results[f"{kind}_speedup_batched_over_vmap"] = statistics.median(
            b / v for b, v in zip(rates["batched"][kind], rates["vmap"][kind]))
    print(json.dumps(results, indent=2))
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
