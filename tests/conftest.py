"""Shared fixtures. The tests are in three folders: unit/ (one component, real files, no Ray
cluster), engine/ (the LOSO engines training tiny models) and e2e/ (the CLIs, real local Ray, MLflow
servers, processes and signals). Everything under engine/ and e2e/, and the few CLI-process tests in unit/, are
marked `slow`: `pytest -m "not slow" tests` is the quick loop (unit/), `pytest tests` runs everything."""
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains models or runs end to end (a real Ray, MLflow server or "
                                       "CLI process)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {TESTS / "e2e", TESTS / "engine"} & set(Path(str(item.fspath)).resolve().parents):
            item.add_marker(pytest.mark.slow)

from htnet.data import load_release, make_synthetic

REAL_RELEASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "htnet_composite"
TINY_STSTNET = {"model": "ststnet", "epochs": 8, "lr": 3e-3, "batch_size": 32, "inner_val_subjects": 3}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic composite: 3 subjects per source dataset."""
    return make_synthetic(tmp_path_factory.mktemp("synth"), subjects_per_dataset=3, seed=0)


@pytest.fixture(scope="session")
def synth_data(synth_root):
    return load_release(synth_root)


@pytest.fixture
def release(synth_root, tmp_path):
    """A copy of the synthetic release for a test to break (tests/release_edits.py)."""
    return Path(shutil.copytree(synth_root, tmp_path / "release"))


@pytest.fixture(scope="session")
def real_root():
    if not (REAL_RELEASE / "combined_3_class2_for_optical_flow.csv").is_file():
        pytest.skip(f"the real HTNet release is not at {REAL_RELEASE.resolve()} (it is never committed)")
    return REAL_RELEASE
