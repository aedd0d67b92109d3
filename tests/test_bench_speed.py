"""bench/speed.py end to end on a tiny synthetic dataset (the real run is a benchmark, not a test)."""
import json
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import speed  # noqa: E402


def test_speed_benchmark_writes_every_measure(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--n-users", "80", "--subset", "4", "--rounds", "2", "--scaling", "1,2",
                "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    data = result["data"]
    assert data["n_train_users"] + data["n_test_users"] == data["n_users"] > 0
    assert data["processed_mb"] > 0
    epoch = result["epoch"]
    assert epoch["seconds"] == epoch["train_seconds"] + epoch["eval_seconds"]
    comparison = result["sequential_vs_batched"]
    for path in ("reference", "sequential", "batched"):
        assert len(comparison[path]["train_users_per_second_rounds"]) == 2
        assert comparison[path]["users"] == 4
    assert comparison["sequential"]["users_per_step"] == 1
    assert comparison["batched"]["users_per_step"] == 32
    assert comparison["train_speedup"] > 0 and comparison["eval_speedup_over_reference"] > 0
    cost = result["step_cost"]
    assert set(cost["seconds_per_step"]) == {"1", "2"}
    assert cost["speedup_at"]["1"] == 1.0
    assert set(cost["marginal_seconds_per_user"]) == {"1-2"}
    assert cost["flop_per_user"] > 1e6 and result["machine"]["peak_gemm_gflops"] > 0
    assert 0 < cost["speedup_at_peak_speed"] < 32
    assert result["peak_rss_mb"] > 0
    assert result["evaluated_users"] == {"reference": 4, "sequential": 4, "batched": 4}
    for difference in result["agreement"].values():  # float32: the paths agree to rounding
        assert 0 <= difference < 1e-4
