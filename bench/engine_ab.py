"""The batched engine of two versions of this code in one process:
`python bench/engine_ab.py BEFORE AFTER --data-dir D`.

BEFORE and AFTER are checkouts of this repository (e.g. `git worktree add /tmp/before <commit>`).
Both versions' code is imported side by side. BEFORE's trainer loads the prepared synthetic data in
D and takes `--warmup-steps` global steps (so that the memories have been written); AFTER builds
its model from the same state, with BEFORE's settings (and its own defaults for settings BEFORE
does not know). Then the two engines are called alternately, call by call, on the same batches:
`meta_gradients` on `--batches` training batches of users_per_step users and `predict` on up to
`--batches` test batches of eval_batch_users users (BEFORE's configs.py). Reports the medians, the
median of the per-call ratios AFTER / BEFORE and whether the two versions' results are
bit-identical (every meta-gradient, the memory writes' inputs and the predictions). Timing call by
call in one process cancels most of a shared machine's slow spells; bench/epoch_ab.py (whole epochs
in fresh processes) cannot resolve a change of a few per cent on such a machine.
Prepare D once with `python bench/speed.py --prepare-only --work-dir W` (D = W/processed).
"""
import argparse
import copy
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.epoch_ab import check_inputs, git_commit  # noqa: E402  (imports nothing of the repository's code)

#: Top-level names of the repository's code: removed from sys.modules before a checkout is imported.
CODE_PACKAGES = ("configs", "data_prep", "mamoRec", "models", "modules", "utils")


def import_checkout(path):
    """The code of checkout `path`, freshly imported: {name: module} for configs, mamoRec, models, utils.

    The modules of an earlier import stay alive through the objects that use them."""
    for name in [name for name in sys.modules if name.split(".")[0] in CODE_PACKAGES]:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        return {name: importlib.import_module(name) for name in ("configs", "mamoRec", "models", "utils")}
    finally:
        sys.path.remove(str(path))


def engine_inputs(model, batch):
    """What meta_train_step hands the engine: (profiles [B, D_u], item profiles [B, N, D_i], attention)."""
    profiles = model.input_loading.user_profile(batch.user_codes).detach()
    item_profiles = model.input_loading.item_profile(batch.item_features).detach()
    return profiles, item_profiles, model.read(profiles)


def fingerprint(meta, n_users, n_slots):
    """The tensors of a MetaGradients, the per-user values summed with fixed weights: [tensor]."""
    weights = torch.linspace(0.1, 1.0, n_users * n_slots, dtype=meta.query_loss.dtype).view(n_users, n_slots)
    tensors = [meta.query_loss, meta.profile_grads, meta.item_grads]
    tensors += [meta.phi_grads[name] for name in sorted(meta.phi_grads)]
    tensors += [meta.user_grads[name].weighted_sum(weights) for name in sorted(meta.user_grads)]
    if meta.mem_weights is not None:
        tensors += [meta.mem_weights.weighted_sum(weights), meta.mem_updates.weighted_sum(weights)]
    return [t.detach().clone() for t in tensors]


def compared_difference(label, before, after):
    """The largest difference between two versions' fingerprints; a one-line SystemExit when their
    MetaGradients do not line up (versions whose records differ cannot be compared bit for bit)."""
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        raise SystemExit(f"engine_ab.py: the two versions' {label} differ in structure "
                         f"({len(before)} against {len(after)} tensors); compare versions with the same records")
    return largest_difference(before, after)


def largest_difference(first, second):
    return max((a - b).abs().max().item() for a, b in zip(first, second))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--data-dir", type=Path, required=True, help="prepared synthetic data (manifest.json)")
    parser.add_argument("--batches", type=int, default=12, help="training and test batches, each (default 12)")
    parser.add_argument("--rounds", type=int, default=10, help="passes over the batches (default 10)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    check_inputs(parser, args)
    if min(args.batches, args.rounds, args.threads) < 1 or args.warmup_steps < 0:
        parser.error("--batches, --rounds and --threads must be at least 1, --warmup-steps at least 0")
    torch.set_num_threads(args.threads)

    before = import_checkout(args.before.resolve())
    cfg = copy.deepcopy(before["configs"].config_settings)
    cfg.update(dataset="synthetic", data_dir=str(args.data_dir), device="cpu")
    manifest, train, test = before["mamoRec"].load_data(cfg)
    trainer = before["mamoRec"].MAMRec(cfg, manifest, train, test, Path(tempfile.mkdtemp(prefix="mamo-engine-ab-")) /
                                       "run", torch.device("cpu"))
    select_users, size, eval_size = before["utils"].select_users, cfg["users_per_step"], cfg["eval_batch_users"]
    order, n_test = trainer.user_order(1), test.ratings.shape[0]
    if len(order) < size * (args.warmup_steps + args.batches):
        parser.error(f"--data-dir {args.data_dir} has too few training users ({len(order)}) for --warmup-steps "
                     f"{args.warmup_steps} and --batches {args.batches} of users_per_step {size}")
    train_batches = [select_users(trainer.train_tasks, order[start:start + size])
                     for start in range(0, size * (args.warmup_steps + args.batches), size)]
    for batch in train_batches[:args.warmup_steps]:
        before["models"].meta_train_step(trainer.model, trainer.engine, batch, trainer.optimizer)
    train_batches = train_batches[args.warmup_steps:]
    test_batches = [select_users(trainer.test_tasks, slice(start, min(start + eval_size, n_test)))
                    for start in range(0, min(n_test, eval_size * args.batches), eval_size)]

    after = import_checkout(args.after.resolve())
    versions = {"before": (before["models"], trainer.model)}
    # AFTER's settings: BEFORE's value of every key both know, AFTER's default for the keys it added
    after_cfg = {key: cfg.get(key, default) for key, default in after["configs"].config_settings.items()}
    model = after["models"].MAMO(manifest["features"], manifest["n_rating_classes"], manifest["rating_min"], after_cfg)
    try:
        model.load_state_dict(trainer.model.state_dict())
    except RuntimeError as error:
        parser.error(f"AFTER's model cannot take BEFORE's state (the two versions' parameters or memories differ): "
                     f"{str(error).splitlines()[0]}")
    versions["after"] = (after["models"], model)
    engines = {label: module.BatchedEngine(model) for label, (module, model) in versions.items()}

    def meta_gradients(label, batch):
        model = versions[label][1]
        return engines[label].meta_gradients(batch, *engine_inputs(model, batch))

    def predict(label, batch):
        module, model = versions[label]
        return module.predict_query(model, engines[label], batch)

    n_slots = cfg["n_k"]
    meta_difference = max(compared_difference("meta-gradients",
                                              fingerprint(meta_gradients("before", b), size, n_slots),
                                              fingerprint(meta_gradients("after", b), size, n_slots))
                          for b in train_batches)
    predict_difference = max(largest_difference([predict("before", b)], [predict("after", b)]) for b in test_batches)

    seconds = {kind: {"before": [], "after": []} for kind in ("meta_gradients", "predict")}
    for _ in range(args.rounds):
        for kind, call, batches in (("meta_gradients", meta_gradients, train_batches),
                                    ("predict", predict, test_batches)):
            for batch in batches:
                for label in ("before", "after"):
                    started = time.perf_counter()
                    call(label, batch)
                    seconds[kind][label].append(time.perf_counter() - started)
    summary = {}
    for kind, times in seconds.items():
        ratios = [a / b for a, b in zip(times["after"], times["before"])]
        summary[kind] = {"median_ms": {label: 1e3 * statistics.median(t) for label, t in times.items()},
                         "after_over_before_median": statistics.median(ratios), "calls": len(ratios)}
    summary["bit_identical"] = {"meta_gradients": meta_difference == 0.0, "predict": predict_difference == 0.0}
    summary["largest_difference"] = {"meta_gradients": meta_difference, "predict": predict_difference}
    print(json.dumps(summary, indent=2))
    if args.json:
        results = {"before": {"path": str(args.before), "commit": git_commit(args.before)},
                   "after": {"path": str(args.after), "commit": git_commit(args.after)},
                   "data_dir": str(args.data_dir), "users_per_step": size, "eval_batch_users": eval_size,
                   "batches": args.batches, "rounds": args.rounds, "warmup_steps": args.warmup_steps,
                   "environment": after["utils"].environment(torch.device("cpu")), **summary}
        after["utils"].atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
