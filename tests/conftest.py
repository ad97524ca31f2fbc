"""Shared test fixtures: the real data and weights in ../shared (never copied into the repo), and a
record of the training checkpoint managers a test opens and closes."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CGN_JAX_SHARED", REPO.parent / "shared")).resolve()
os.environ.setdefault("CGN_JAX_SHARED", str(SHARED))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "README.md").is_file():
        pytest.fail(f"the shared data directory {SHARED} is missing; put it beside the checkout or set CGN_JAX_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def mnist_dir(shared) -> Path:
    return shared / "data" / "mnist"


@pytest.fixture(scope="session")
def textures_dir(shared) -> Path:
    return shared / "data" / "textures"


@pytest.fixture(scope="session")
def cgn_weights(shared) -> Path:
    return shared / "weights" / "cgn_mnist"


@pytest.fixture(scope="session")
def reference(shared) -> Path:
    return shared / "reference"


@pytest.fixture
def checkpoint_managers(monkeypatch):
    """`.opened` / `.closed`: every `TrainCheckpoints` the test creates / closes, in order."""
    from cgn_jax.train.checkpointing import TrainCheckpoints

    seen = types.SimpleNamespace(opened=[], closed=[])
    real_init, real_close = TrainCheckpoints.__init__, TrainCheckpoints.close

    def init(self, *args, **kwargs):
        seen.opened.append(self)
        real_init(self, *args, **kwargs)

    def close(self):
        seen.closed.append(self)
        real_close(self)

    monkeypatch.setattr(TrainCheckpoints, "__init__", init)
    monkeypatch.setattr(TrainCheckpoints, "close", close)
    return seen
