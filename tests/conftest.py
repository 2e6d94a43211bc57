"""Shared fixtures: tiny random models for every architecture, the real default model (slow)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import steerlab as sl
from steerlab.testing import TINY_ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# fixture generators under data/ import packages the tests do not need (sae-lens)
collect_ignore_glob = ["data/*"]


@pytest.fixture(params=TINY_ARCHITECTURES)
def arch_model(request: pytest.FixtureRequest) -> sl.SteeredModel:
    """A tiny random-weight model, once per supported architecture."""
    return tiny_model(request.param)


@pytest.fixture
def llama() -> sl.SteeredModel:
    """One tiny Llama-style model for tests that need only one architecture."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model() -> Iterator[Any]:
    """The real embedded default model (SmolLM2-135M-Instruct); slow tier only."""
    yield sl.load_model()


@pytest.fixture(scope="session")
def vllm_eager() -> bool:
    """Whether the vLLM tests run vLLM eagerly (``STEERLAB_VLLM_EAGER=1``, ``make
    test-vllm-eager``) instead of compiled, vLLM's default; steering must pass in both."""
    import os

    return os.environ.get("STEERLAB_VLLM_EAGER", "") == "1"


def _vllm_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this environment; run `make test-vllm` (uses .venv-vllm)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.vllm`` tests, with the reason, where vLLM is not importable."""
    reason = _vllm_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
