"""Shared fixtures: a tiny feature schema, random task batches and a small config."""
import copy
import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch

from configs import config_settings
from utils import TaskBatch

ROOT = Path(__file__).resolve().parents[1]
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
