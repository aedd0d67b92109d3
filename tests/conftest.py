"""Shared fixtures: a tiny feature schema, random task batches and a small config."""
import copy
import functools
import http.server
import io
import platform
import shutil
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from configs import config_settings
from utils import TaskBatch

ROOT = Path(__file__).resolve().parents[1]
ON_GLIBC = platform.libc_ver()[0] == "glibc"
GLIBC = pytest.mark.skipif(not ON_GLIBC, reason="needs glibc's malloc")
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY_FEATURES = {
    "user": [{"name": "gender", "kind": "categorical", "size": 2},
             {"name": "age", "kind": "categorical", "size": 7}],
    "item": [{"name": "year", "kind": "categorical", "size": 5},
             {"name": "genre", "kind": "multi_hot", "size": 6}],
}


def small_config(**overrides):
    """The default config shrunk for fast tests (d = 8, 6 support + 3 query ratings)."""
    cfg = copy.deepcopy(config_settings)
    cfg.update(embedding_dim=8, support_size=6, query_size=3, batch_size=2, n_inner_loop=2,
               rho=0.1, users_per_step=4, grad_clip=5.0)
    cfg.update(overrides)
    return cfg


def random_batch(n_users, support_size=6, query_size=3, seed=0, features=TINY_FEATURES, n_classes=5):
    """Random tasks over `features`: multi-hot fields get up to 3 active indices, padded with `size`."""
    gen = torch.Generator().manual_seed(seed)
    n = support_size + query_size
    user_codes = torch.stack([torch.randint(f["size"], (n_users,), generator=gen) for f in features["user"]], 1)
    item_features = {}
    for f in features["item"]:
        if f["kind"] == "categorical":
            item_features[f["name"]] = torch.randint(f["size"], (n_users, n), generator=gen)
        else:
            idx = torch.randint(f["size"], (n_users, n, 3), generator=gen)
            keep = torch.rand(n_users, n, 3, generator=gen) < 0.6
            keep[..., 0] = True
            item_features[f["name"]] = torch.where(keep, idx, torch.full_like(idx, f["size"]))
    return TaskBatch(
        user_codes=user_codes,
        item_features=item_features,
        ratings=torch.randint(1, n_classes + 1, (n_users, n), generator=gen),
        scenarios=torch.randint(0, 4, (n_users, n), generator=gen),
        support_size=support_size,
    )


def run_config(**overrides):
    """`small_config` for runs on the `synthetic_dir` data: 15 support + 5 query ratings, 2 epochs, CPU."""
    settings = dict(dataset="synthetic", support_size=15, query_size=5, batch_size=5, n_epoch=2, users_per_step=16,
                    device="cpu")
    return small_config(**{**settings, **overrides})


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A prepared synthetic dataset of 150 users (15 + 5 ratings each), shared: do not modify it."""
    from data_prep.prepare_data import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare("synthetic", None, out, n_users=150, log=lambda *_: None)
    return out


@dataclass
class FinishedRun:
    """A run made by the command line, with what it printed."""
    run_dir: Path
    data_checksum: str
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, synthetic_dir):
    """`python mamoRec.py --data-dir DATA --seed 5` with `run_config()` as configs.py: 2 epochs, the
    ablations, the default run folder (under a fresh working folder). DATA, a copy of synthetic_dir,
    is deleted afterwards, so everything that works from the run folder works without the data.
    Shared: copy the run folder before changing anything in it."""
    import mamoRec
    from data_prep.task_io import data_checksum

    work = tmp_path_factory.mktemp("finished")
    data = work / "data"
    shutil.copytree(synthetic_dir, data)
    checksum = data_checksum(data)
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.setattr(mamoRec, "config_settings", run_config())
        patch.chdir(work)
        exit_code = mamoRec.main(["--data-dir", str(data), "--seed", "5"])
    shutil.rmtree(data)
    (run_dir,) = (work / "runs" / "synthetic").iterdir()
    return FinishedRun(run_dir, checksum, exit_code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path / 'site'`` on 127.0.0.1; yields (site folder, base URL)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
