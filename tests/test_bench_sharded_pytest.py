"""bench/sharded_pytest.py: the files are dealt among the shards, every shard runs, and a failure
in any shard is the script's exit status (on tiny test files written here, not this suite)."""
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import sharded_pytest  # noqa: E402


def test_files_are_dealt_round_robin_in_name_order():
    files = ["test_e.py", "test_a.py", "test_d.py", "test_b.py", "test_c.py"]
    assert sharded_pytest.deal(files, 2) == [["test_a.py", "test_c.py", "test_e.py"], ["test_b.py", "test_d.py"]]
    assert sharded_pytest.deal(files, 8) == [[name] for name in sorted(files)]  # no empty shards
    assert sharded_pytest.deal(files, 1) == [sorted(files)]


def write_tests(folder, outcomes):
    """One test file per outcome: test_<k>.py holding a test that passes or fails."""
    folder.mkdir()
    for k, passes in enumerate(outcomes):
        (folder / f"test_{k}.py").write_text(f"def test_{k}():\n    assert {passes}\n")


def test_every_shard_runs_and_a_failing_one_sets_the_exit_status(tmp_path, capsys):
    write_tests(tmp_path / "suite", [True, True, False])
    status = sharded_pytest.main(["--shards", "2", "--tests", str(tmp_path / "suite"), "--log-dir",
                                  str(tmp_path / "logs"), "--", "-q", "-p", "no:cacheprovider"])
    assert status == 1  # pytest's status for failed tests
    logs = {path.name: path.read_text() for path in (tmp_path / "logs").iterdir()}
    assert set(logs) == {"shard0.log", "shard1.log"}
    assert "1 failed, 1 passed" in logs["shard0.log"] and "1 passed" in logs["shard1.log"]  # 0 and 2 | 1
    out = capsys.readouterr().out
    assert "== shard 0 (2 files, exit 1" in out and "1 of 2 shards passed" in out


def test_all_shards_passing_give_status_zero(tmp_path, capsys):
    write_tests(tmp_path / "suite", [True, True, True])
    assert sharded_pytest.main(["--shards", "3", "--tests", str(tmp_path / "suite"), "--log-dir",
                                str(tmp_path / "logs"), "--", "-q", "-p", "no:cacheprovider"]) == 0
    assert "3 of 3 shards passed" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--shards", "0"], "argument --shards: expected an integer >= 1, got '0'"),
    (["--tests", "no-such-folder"], "--tests no-such-folder: no test_*.py files there"),
])
def test_bad_arguments_are_refused_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        sharded_pytest.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sharded_pytest.py: error: ") and message in err and err.count("\n") == 1
