"""How personal are the memory reads? `python bench/memory_diagnostics.py --data-dir DIR [--json FILE]`

Trains MAMO with the default configuration on a prepared dataset and reports, before training and
after each epoch, for the test users: the attention a_u (mean and smallest largest weight, its
spread across users), the spread of the profile-memory slots (largest distance between two
slots, relative to their norm) and the size of the personalised term tao * b_u relative to phi_u.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import config_settings  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402


@torch.no_grad()
def memory_statistics(trainer):
    model, cfg = trainer.model, trainer.cfg
    profiles = model.input_loading.user_profile(trainer.test_tasks.user_codes)
    attention = model.read(profiles)
    slots = model.memories.profile
    largest = attention.max(1).values
    bias_terms = model.memories.bias_term(attention)
    phi = model.phi()
    return {
        "attention_max_mean": round(largest.mean().item(), 4),
        "attention_max_min": round(largest.min().item(), 4),
        "attention_std_across_users": round(attention.std(0).max().item(), 6),
        "profile_slot_spread": round((torch.cdist(slots, slots).max() / slots.norm(dim=1).mean()).item(), 6),
        "bias_term_relative_size": round(max((cfg["tao"] * term).norm(dim=tuple(range(1, term.dim()))).mean().item()
                                             / phi[name].norm().item() for name, term in bias_terms.items()), 6),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a prepared dataset (data_prep output)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--run-dir", default="runs/memory-diagnostics", help="scratch folder")
    parser.add_argument("--users-per-step", type=int, help="override configs.py's users_per_step")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    cfg = copy.deepcopy(config_settings)
    cfg.update(data_dir=args.data_dir, seed=args.seed)
    if args.users_per_step:
        cfg["users_per_step"] = args.users_per_step
    manifest, train_tasks, test_tasks = load_data(cfg)
    trainer = MAMRec(cfg, manifest, train_tasks, test_tasks, args.run_dir, torch.device("cpu"))
    rows = [{"epoch": 0, **memory_statistics(trainer)}]
    for epoch in range(1, cfg["n_epoch"] + 1):
        trainer.train_epoch(epoch)
        rows.append({"epoch": epoch, **memory_statistics(trainer)})
    text = json.dumps({"dataset": manifest["dataset"], "seed": args.seed, "users_per_step": cfg["users_per_step"],
                       "epochs": rows}, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
