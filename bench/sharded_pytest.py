"""The test suite as several pytest processes at once, for a many-core machine without pytest-xdist:
`python bench/sharded_pytest.py --shards 8 [--tests tests] [-- PYTEST_ARGS]`.

The test files (test_*.py under --tests) are dealt round-robin in name order, so files that sit
together (the slow bench tests) land in different shards. Each shard is one `python -m pytest`
process with PYTEST_ARGS and its files; its output goes to SHARD_DIR/shard<k>.log (--log-dir, by
default a temporary folder) and its last lines are printed when it ends. Exit status: 0 when every
shard passed, else the first failing shard's pytest status (2 for bad arguments). Threads per shard:
set OMP_NUM_THREADS in the environment (bench/gpu_check.sh sets 2).
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import Parser, positive_int  # noqa: E402

#: Lines of a shard's output printed when it ends.
TAIL_LINES = 6


def deal(files, n_shards):
    """Files dealt round-robin in name order into at most n_shards non-empty shards: [[path]]."""
    files = sorted(files)
    return [shard for shard in (files[k::n_shards] for k in range(n_shards)) if shard]


def main(argv=None):
    parser = Parser(prog="sharded_pytest.py", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=positive_int, default=8, help="pytest processes at once (default 8)")
    parser.add_argument("--tests", type=Path, default=Path("tests"), help="folder of test_*.py files (default tests)")
    parser.add_argument("--log-dir", type=Path, help="where the shards' logs go (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for every pytest")
    args = parser.parse_args(argv)
    files = sorted(args.tests.glob("test_*.py")) if args.tests.is_dir() else []
    if not files:
        parser.error(f"--tests {args.tests}: no test_*.py files there")
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sharded-pytest-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    running = []
    for k, shard in enumerate(deal(files, args.shards)):
        log = open(log_dir / f"shard{k}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args, *map(str, shard)],
                                   stdout=log, stderr=subprocess.STDOUT)
        running.append((k, shard, process, log))
    statuses = []
    for k, shard, process, log in running:
        status = process.wait()
        log.close()
        tail = (log_dir / f"shard{k}.log").read_text().splitlines()[-TAIL_LINES:]
        print(f"== shard {k} ({len(shard)} files, exit {status})")
        print("\n".join(tail))
        statuses.append(status)
    failing = [status for status in statuses if status != 0]
    print(f"sharded_pytest.py: {len(statuses) - len(failing)} of {len(statuses)} shards passed in "
          f"{time.perf_counter() - started:.0f} s; logs in {log_dir}")
    return failing[0] if failing else 0


if __name__ == "__main__":
    sys.exit(main())
