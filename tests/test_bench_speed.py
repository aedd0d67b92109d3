"""bench/speed.py end to end on a tiny synthetic dataset (the real run is a benchmark, not a
test), its refusals of bad arguments, and its linear-growth summary."""
import json
import sys

import pytest

from tests.conftest import ON_GLIBC, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import speed  # noqa: E402


def test_speed_benchmark_writes_every_measure(tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--n-users", "80", "--subset", "4", "--rounds", "2", "--scaling", "1,2", "--epochs", "2",
                "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    assert len(result["machine"]["git_commit"]) == 40 and isinstance(result["machine"]["git_dirty"], bool)
    data = result["data"]
    assert data["n_train_users"] + data["n_test_users"] == data["n_users"] > 0
    assert data["processed_mb"] > 0 and data["prepare_seconds"] > 0
    epoch, epochs = result["epoch"], result["epochs"]
    assert epoch["seconds"] == epoch["train_seconds"] + epoch["eval_seconds"]
    assert epochs["seconds"][-1] == epoch["seconds"] and len(epochs["seconds"]) == 2
    assert epochs["median_epoch"] == 2 and epochs["counted_epochs"] == [2, 2]
    assert epoch["minor_page_faults"] >= 0 and result["machine"]["heap_top_pad_bytes"] == (64 << 20 if ON_GLIBC else 0)
    assert result["compile"]["mode"] == "none" and result["compile"]["capture_seconds"] == 0.0
    assert result["compile"]["first_epoch_seconds"] > 0
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


def test_epoch_summary_is_the_median_epoch_after_the_first():
    """The first epoch (heap growth, graph capture) is left out; an even count takes the lower
    median, an actual epoch whose train and evaluation times add up to it."""
    def record(train, evaluation):
        return {"seconds": train + evaluation, "train_seconds": train, "eval_seconds": evaluation}

    epochs = [record(9.0, 1.0), record(2.0, 1.0), record(4.0, 1.0), record(1.0, 1.0), record(3.0, 0.5)]
    summary = speed.epoch_summary(epochs)  # counted: 3, 5, 2, 3.5 s -> sorted 2, 3, 3.5, 5
    assert summary["seconds"] == [10.0, 3.0, 5.0, 2.0, 3.5] and summary["eval_seconds"][-1] == 0.5
    assert summary["median_epoch"] == 2 and summary["median_seconds"] == 3.0
    assert (summary["min_seconds"], summary["max_seconds"], summary["counted_epochs"]) == (2.0, 5.0, [2, 5])
    odd = speed.epoch_summary(epochs[:4])  # counted: 3, 5, 2 s
    assert (odd["median_epoch"], odd["median_seconds"]) == (2, 3.0)
    only = speed.epoch_summary(epochs[:1])  # one epoch: counted, though it is the first
    assert (only["median_epoch"], only["median_seconds"], only["counted_epochs"]) == (1, 10.0, [1, 1])


@pytest.mark.parametrize("argv, message", [
    (["--scaling", "1,32,256,1024", "--subset", "128"], "--scaling sizes [256, 1024] exceed --subset 128"),
    (["--n-users", "0"], "argument --n-users: expected an integer >= 1, got '0'"),
    (["--n-users", "-5"], "argument --n-users: expected an integer >= 1, got '-5'"),
    (["--subset", "many"], "argument --subset: expected an integer >= 1, got 'many'"),
    (["--scaling", "1,0,32"], "argument --scaling: expected an integer >= 1, got '0'"),
    (["--scaling", "1,32,32"], "argument --scaling: sizes must be distinct"),
    (["--device", "gpu"], "--device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--compile", "cuda-graphs"], "--compile: compile='cuda-graphs' needs the batched engine on a CUDA device"),
    (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["--prepared"], "--prepared needs the --work-dir"),
])
def test_bad_arguments_are_refused_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        speed.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("speed.py: error: ") and message in err and err.count("\n") == 1


def test_step_sizes_beyond_the_users_the_data_has_are_refused(tmp_path):
    """The subset is capped by the users the data set has: a step size above that is refused
    with the numbers, not divided by zero."""
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--n-users", "60", "--subset", "100", "--scaling", "1,40", "--epochs", "1",
                    "--work-dir", str(tmp_path)])
    assert "--scaling size 40 exceeds the" in str(exit_.value) and "raise --n-users" in str(exit_.value)


def test_step_cost_counts_no_cuda_graph_capture(monkeypatch):
    """A graphed engine runs a step shape eagerly at its first call and captures it at its second
    (the slow one); a size as large as the subset makes one step per round, so one warm-up round
    would leave that capture in the counted times."""
    calls = {}

    def fake_training(trainer, users, users_per_step, device):
        seconds = 0.0
        for _ in range(len(users) // users_per_step):
            calls[users_per_step] = calls.get(users_per_step, 0) + 1
            seconds += 10.0 if calls[users_per_step] == 2 else 1.0
        return seconds

    monkeypatch.setattr(speed, "timed_training", fake_training)
    cost = speed.step_cost(None, list(range(4)), [1, 4], rounds=2, device=None)
    assert cost["seconds_per_step"] == {1: 1.0, 4: 1.0}


def test_growth_fits_a_line_with_a_fixed_part_and_flags_curvature():
    sizes = {n: {"prepare_seconds": 0.5 + 0.01 * n, "epoch_seconds": 0.01 * n * (1.3 if n == 400 else 1.0),
                 "training_peak_rss_mb": 300 + 0.2 * n, "prepare_peak_rss_mb": 0.001 * n * n,
                 "processed_mb": 0.05 * n}
             for n in (100, 200, 400)}
    growth = speed.growth(sizes)
    rss = growth["training_peak_rss_mb"]  # a large fixed part is still linear growth
    assert rss["intercept"] == pytest.approx(300) and rss["slope_per_user"] == pytest.approx(0.2)
    assert rss["largest_relative_residual"] == pytest.approx(0, abs=1e-12) and rss["linear"]
    assert rss["marginal_per_user"] == {"100-200": pytest.approx(0.2), "200-400": pytest.approx(0.2)}
    epoch = growth["epoch_seconds"]  # 1, 2, 5.2 s: the last step costs 1.6x per user
    assert epoch["marginal_per_user"] == {"100-200": pytest.approx(0.01), "200-400": pytest.approx(0.016)}
    # line -0.6 + n / 70 (least squares, by hand): 0.829 at 100 users, 6/35 below the measured 1 s
    assert epoch["slope_per_user"] == pytest.approx(1 / 70) and epoch["intercept"] == pytest.approx(-0.6)
    assert epoch["largest_relative_residual"] == pytest.approx(6 / 35)
    assert not epoch["linear"] and not growth["prepare_peak_rss_mb"]["linear"]  # 10, 40, 160: quadratic
    assert growth["prepare_seconds"]["linear"] and growth["processed_mb"]["linear"]


@pytest.mark.slow
def test_user_scaling_runs_each_size_in_fresh_processes(tmp_path):
    out = tmp_path / "scaling.json"
    speed.main(["--user-scaling", "60,90", "--epochs", "1", "--work-dir", str(tmp_path / "work"),
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["sizes"]) == {"60", "90"}
    for record in result["sizes"].values():
        assert record["prepare_seconds"] > 0 and record["epoch_seconds"] > 0
        assert record["training_peak_rss_mb"] > 50 and record["prepare_peak_rss_mb"] > 50
    assert set(result["growth"]["epoch_seconds"]["marginal_per_user"]) == {"60-90"}
