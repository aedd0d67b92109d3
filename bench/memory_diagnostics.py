"""The memory diagnostics a run recorded, per epoch: `python bench/memory_diagnostics.py RUN [--method M]`.

Every run records them after each epoch for its models with memories (modules/diagnostics.py
defines each statistic); this prints RUN/metrics.json's as a markdown table, one row per epoch.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.diagnostics import diagnostic_columns, diagnostic_values  # noqa: E402


def diagnostics_table(metrics, method="mamo"):
    """Markdown: epoch and every diagnostic of `method` (4 significant digits), from a metrics.json dict."""
    rows = [(row["epoch"], row.get("memory", {}).get(method)) for row in metrics["epochs"]]
    recorded = [record for _, record in rows if record is not None]
    if not recorded:
        raise SystemExit(f"error: no memory diagnostics for {method} in this run (a model without memories, "
                         "or a run made before they were recorded)")
    columns = diagnostic_columns(len(recorded[0]["slot_usage"]))
    lines = ["| epoch | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for epoch, record in rows:
        values = diagnostic_values(record, len(recorded[0]["slot_usage"]))
        lines.append(f"| {epoch} | " + " | ".join("-" if v == "" else f"{v:.4g}" for v in values) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holding metrics.json)")
    parser.add_argument("--method", default="mamo", help="the trained model whose reads to show (default mamo)")
    args = parser.parse_args(argv)
    path = args.run_dir / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing, expected a finished run folder")
    print(diagnostics_table(json.loads(path.read_text()), args.method))


if __name__ == "__main__":
    main()
