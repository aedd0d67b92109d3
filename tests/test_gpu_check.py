"""bench/gpu_check.sh refuses bad arguments and a non-empty output folder before doing anything
(its full dry run, `bench/gpu_check.sh OUT --dry-run`, runs this test suite itself, so it is not run here)."""
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("extra, message", [
    ([], "usage: bench/gpu_check.sh OUT_DIR [--dry-run]"),
    (["OUT", "--fast"], "unknown option --fast"),
    (["OUT", "--dry-run", "more"], "usage:"),
])
def test_bad_arguments_are_refused(extra, message, tmp_path):
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in extra]
    result = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_left_alone(tmp_path):
    (tmp_path / "earlier.json").write_text("{}")
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--dry-run"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.json"]
