"""Do two runs' metrics agree? `python bench/metrics_agreement.py RUN_A RUN_B --tolerance T [--subset all] [--json FILE]`

RUN_A and RUN_B are run folders of mamoRec.py (or their metrics.json). For every method the two
runs share, compares MAE, RMSE and NDCG@3 of the chosen scenario subsets; exits 1 when the largest
absolute difference exceeds the tolerance. Used by bench/gpu_check.sh to compare a CUDA run with
a CPU run of the same settings (float32 rounding differs between devices and grows over training)
and a CUDA-graph run with an eager one (same kernels: equal).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import SUBSETS, atomic_write_json  # noqa: E402

METRICS = ("mae", "rmse", "ndcg@3")


def read_results(path):
    """results {method: {subset: {metric: value}}} of a run folder or a metrics.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8"))["results"]


def differences(first, second, subsets):
    """{method: largest |difference| over `subsets` x METRICS} for the methods in both results;
    a metric that is None (no rating in a subset) in both runs is skipped."""
    shared = sorted(set(first) & set(second))
    if not shared:
        raise ValueError(f"the runs share no method (first: {sorted(first)}, second: {sorted(second)})")
    result = {}
    for method in shared:
        values = [(first[method][subset][metric], second[method][subset][metric])
                  for subset in subsets for metric in METRICS]
        if any((a is None) != (b is None) for a, b in values):
            raise ValueError(f"{method}: a metric is missing in one run only")
        result[method] = max((abs(a - b) for a, b in values if a is not None), default=0.0)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, required=True, help="largest allowed |difference|")
    parser.add_argument("--subset", choices=("all-subsets", *SUBSETS), default="all-subsets",
                        help="scenario subset to compare (default: every subset)")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args(argv)
    subsets = SUBSETS if args.subset == "all-subsets" else (args.subset,)
    largest = differences(read_results(args.first), read_results(args.second), subsets)
    record = {"first": args.first, "second": args.second, "subsets": list(subsets), "tolerance": args.tolerance,
              "max_abs_difference": largest, "agree": all(d <= args.tolerance for d in largest.values())}
    print(json.dumps(record, indent=2))
    if args.json:
        atomic_write_json(args.json, record)
    return 0 if record["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
