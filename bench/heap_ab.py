"""The heap pad (`utils.keep_freed_heap`) off and on, epoch by epoch in one process:
`python bench/heap_ab.py --data-dir D [--pairs 10] [--json FILE]`.

Two trainers are built alike on the prepared synthetic data in D. In each pair of epochs one
trains an epoch with glibc's default pad (128 kB of freed memory kept at the top of the heap) and
the other the same epoch with the pad the trainers use (64 MB), in alternating order; each epoch
is timed (training and evaluation) with its minor page faults. Reports the per-pair ratio of
times (padded / default), on how many pairs the pad was faster, the medians, and whether the two
trainers end bit-identical (the pad must change no number). With `--one-trainer` a single
trainer alternates the pads epoch by epoch after an uncounted first epoch, as a real run holds one
trainer (a second trainer's tensors change where the heap's top is: at 60,400 users they left the
default heap with few page faults); no bit-identity check then. Needs glibc (Linux).
Prepare D once with `python bench/speed.py --prepare-only --work-dir W` (D = W/processed).
"""
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import Parser, positive_int, timed_epochs  # noqa: E402
from configs import config_settings  # noqa: E402
from mamoRec import MAMRec, load_data  # noqa: E402
from utils import HEAP_TOP_PAD_BYTES, M_TOP_PAD, atomic_write_json, environment, libc_mallopt  # noqa: E402

GLIBC_DEFAULT_TOP_PAD = 128 << 10  # glibc's DEFAULT_TOP_PAD (131,072 bytes)
PADS = {"default": GLIBC_DEFAULT_TOP_PAD, "padded": HEAP_TOP_PAD_BYTES}


def parse_args(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="prepared synthetic data (manifest.json)")
    parser.add_argument("--pairs", type=positive_int, default=10, help="pairs of epochs (default 10)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--one-trainer", action="store_true", help="one trainer alternates the pads (no identity check)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not (args.data_dir / "manifest.json").is_file():
        parser.error(f"--data-dir {args.data_dir} holds no prepared data (manifest.json)")
    return args


def same_state(first, second):
    """Whether two models' parameters and buffers (the memories) are bit-identical."""
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def main(argv=None):
    args = parse_args(argv)
    mallopt = libc_mallopt()
    if mallopt is None:
        sys.exit("heap_ab.py: error: this C library has no mallopt (glibc is needed)")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = copy.deepcopy(config_settings)
    cfg.update(dataset="synthetic", data_dir=str(args.data_dir), device="cpu")
    manifest, train, test = load_data(cfg)
    work = Path(tempfile.mkdtemp(prefix="mamo-heap-ab-"))
    built = ["default"] if args.one_trainer else list(PADS)
    trainers = {label: MAMRec(cfg, manifest, train, test, work / label, device) for label in built}
    if args.one_trainer:  # both arms on one trainer, after a first epoch (it grows the heap) not counted
        trainers["padded"] = trainers["default"]
        timed_epochs(trainers["default"], cfg, 1, device)
    pairs = []
    for pair in range(args.pairs):
        order = list(PADS) if pair % 2 == 0 else list(reversed(PADS))
        record = {}
        for label in order:
            if mallopt(M_TOP_PAD, PADS[label]) != 1:
                sys.exit(f"heap_ab.py: error: mallopt(M_TOP_PAD, {PADS[label]}) was refused")
            epoch = timed_epochs(trainers[label], cfg, 1, device)[-1]
            record[label] = {"seconds": epoch["seconds"], "minor_page_faults": epoch["minor_page_faults"]}
        record["ratio"] = record["padded"]["seconds"] / record["default"]["seconds"]
        pairs.append(record)
        print(f"pair {pair + 1}: default {record['default']['seconds']:.2f} s, padded "
              f"{record['padded']['seconds']:.2f} s, ratio {record['ratio']:.3f}", file=sys.stderr)
    mallopt(M_TOP_PAD, HEAP_TOP_PAD_BYTES)  # as the trainers leave it
    ratios = [p["ratio"] for p in pairs]
    summary = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
               "padded_faster_in": sum(r < 1 for r in ratios), "pairs_total": len(pairs),
               "median_seconds": {label: statistics.median(p[label]["seconds"] for p in pairs) for label in PADS},
               "median_minor_page_faults": {label: statistics.median(p[label]["minor_page_faults"] for p in pairs)
                                            for label in PADS},
               "bit_identical": None if args.one_trainer else same_state(trainers["default"].model,
                                                                         trainers["padded"].model)}
    print(summary)
    if args.json:
        atomic_write_json(args.json, {"data_dir": str(args.data_dir), "threads": args.threads, "pads_bytes": PADS,
                                      "trainers": 1 if args.one_trainer else 2,
                                      "environment": environment(device), "pairs": pairs, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
