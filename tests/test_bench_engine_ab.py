"""bench/engine_ab.py: two checkouts' engines timed call by call in one process, their results
compared bit for bit, and its refusals."""
import json
import shutil
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "engine_ab.py"
SMALL = ("--batches", "2", "--warmup-steps", "1", "--rounds", "1", "--threads", "1")


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def checkout_copy(tmp_path, edit=None):
    """A copy of this checkout's code, with `edit(models.py source) -> source` applied."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("configs.py", "models.py", "mamoRec.py", "utils.py"):
        shutil.copy(ROOT / name, copy / name)
    for package in ("modules", "data_prep"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        (copy / "models.py").write_text(edit((copy / "models.py").read_text()))
    return copy


def test_the_same_code_is_bit_identical_and_timed_call_by_call(tmp_path, synthetic_dir):
    out = tmp_path / "ab.json"
    result = run(ROOT, checkout_copy(tmp_path), "--data-dir", synthetic_dir, *SMALL, "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["bit_identical"] == {"meta_gradients": True, "predict": True}
    assert record["meta_gradients"]["calls"] == 2 and record["predict"]["calls"] == 1  # the test users fit in one batch
    assert record["environment"]["torch_threads"] == 1 and record["before"]["commit"] is not None


def test_a_change_of_rounding_is_reported(tmp_path, synthetic_dir):
    """Dividing the output gradient by n through its reciprocal changes float32 rounding, nothing else."""
    def reciprocal(source):
        assert ".sub_(output_targets).div_(n)" in source
        return source.replace(".sub_(output_targets).div_(n)", ".sub_(output_targets).mul_(1.0 / n)")

    out = tmp_path / "ab.json"
    result = run(ROOT, checkout_copy(tmp_path, reciprocal), "--data-dir", synthetic_dir, *SMALL, "--json", out)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["bit_identical"] == {"meta_gradients": False, "predict": False}
    assert 0.0 < record["largest_difference"]["meta_gradients"] < 1e-4


def test_too_few_training_users_are_refused_in_one_line(synthetic_dir):
    too_many = run(ROOT, ROOT, "--data-dir", synthetic_dir, "--batches", "4")
    assert too_many.returncode == 2 and "too few training users (111)" in too_many.stderr
