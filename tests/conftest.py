"""Shared fixtures: one smoke world and one pretrained smoke base model per test session.

The base model is cached in `smoke_dirs["cache"]` (keyed by world fingerprint and model config), so a
subprocess run of sftguard.py with `--preset smoke --cache_dir <that folder>` reuses it instead of
pretraining again, whichever test needs it first pays the ~20 s once."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data_prep  # noqa: E402
import sftguard  # noqa: E402


# Tests that use one of these fixtures (a full smoke run, shared by a module) are slow: `pytest -m "not slow"` skips
# them; other slow tests carry @pytest.mark.slow themselves.
SLOW_FIXTURES = {"smoke_all", "sweep", "reference", "saved_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smoke_dirs(tmp_path_factory):
    """Folders shared by the whole session: the smoke world's data (built here: an explicit --data must exist) and the
    model/SliCK cache."""
    root = tmp_path_factory.mktemp("smoke")
    data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS["smoke"], "preset": "smoke", "out": str(root / "data")}))
    return {"data": root / "data", "cache": root / "cache"}


@pytest.fixture(scope="session")
def smoke_base(smoke_dirs):
    """The smoke world and its pretrained base model (in process). Shared: deep-copy the model before
    changing it."""
    cfg = sftguard.parse_config(["--preset", "smoke", "--data", str(smoke_dirs["data"]),
                                 "--cache_dir", str(smoke_dirs["cache"]), "--device", "cpu"])
    facts, world = sftguard.load_facts(smoke_dirs["data"])
    model, tokenizer, path = sftguard.load_base_model(cfg, smoke_dirs["data"], world, torch.device("cpu"))
    model.eval()
    return SimpleNamespace(cfg=cfg, facts=facts, world=world, model=model, tokenizer=tokenizer, path=path)


def run_sftguard(*args, timeout=300):
    """`python sftguard.py ARGS` in a subprocess (the way users run it); returns the CompletedProcess."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(REPO / "sftguard.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="session")
def sftguard_cli():
    return run_sftguard
