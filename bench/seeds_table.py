"""Mean ± std over runs: `python bench/seeds_table.py RUN_DIR [RUN_DIR ...]` -> a markdown table.

Reads each RUN_DIR/metrics.json and prints, per subset (overall and the four scenarios) and
method, MAE, RMSE and NDCG@3 as mean ± sample standard deviation over the runs.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import SUBSETS  # noqa: E402

METRICS = ("mae", "rmse", "ndcg@3")


def cell(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(run_dirs):
    runs = [json.loads((Path(d) / "metrics.json").read_text())["results"] for d in run_dirs]
    methods = list(runs[0])
    lines = ["| subset | method | MAE | RMSE | NDCG@3 | ratings / users |", "|---|---|---|---|---|---|"]
    for subset in ("all",) + tuple(s for s in SUBSETS if s != "all"):
        for method in methods:
            rows = [run[method][subset] for run in runs]
            cells = [cell([row[m] for row in rows]) for m in METRICS]
            lines.append(f"| {subset} | {method} | " + " | ".join(cells)
                         + f" | {rows[0]['n_ratings']} / {rows[0]['n_users']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.json")
    main(parser.parse_args().run_dirs)
