"""Shared fixtures: tiny random models for every architecture, the real default model (slow)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers

import steerlab as sl
from steerlab.testing import TINY_ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# fixture generators under data/ import packages the tests do not need (sae-lens)
collect_ignore_glob = ["data/*"]

# steerlab's router and expert sites read the mixture-of-experts blocks as transformers 5 lays
# them out (`mlp.gate` returning logits, scores and indices); the floor release (4.57, `make
# test-floor`) lays them out differently, so there the MoE rows of the tests that reach into a
# block's MLP or router are skipped, not failed (residual steering on those models runs there)
_MOE_LAYOUT = int(transformers.__version__.split(".")[0]) >= 5
_MOE_ROW = re.compile(r"\[.*\b(?:qwen3_moe|mixtral|olmoe|gpt_oss)\b.*\]$")
_SUB_BLOCK_TESTS = (
    "tests/test_ablation.py::",
    "tests/test_editing.py::",
    "tests/test_sites.py::",
    "tests/test_architectures.py::",
)
_MOE_ONLY = (
    "tests/test_sites_moe.py::",
    "tests/test_architectures.py::test_wrap_of_an_unknown_moe",
    "tests/test_site_methods.py::test_expert_attribution",
    "src/steerlab/sites.py::steerlab.sites.check_experts",
    "src/steerlab/sites.py::steerlab.sites.reroute",
    "src/steerlab/sites.py::steerlab.sites.site_width",
    "src/steerlab/site_methods.py::steerlab.site_methods.expert_attribution",
)


def _skip_moe_rows(items: list[pytest.Item]) -> None:
    """Skip the mixture-of-experts rows of sub-block tests where transformers predates the MoE
    layout steerlab reads (see ``_MOE_LAYOUT``)."""
    if _MOE_LAYOUT:
        return
    version = transformers.__version__
    reason = f"MoE blocks as steerlab reads them need transformers 5 ({version})"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        moe_row = _MOE_ROW.search(item.nodeid) and item.nodeid.startswith(_SUB_BLOCK_TESTS)
        if moe_row or item.nodeid.startswith(_MOE_ONLY):
            item.add_marker(skip)


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
    """Skip ``@pytest.mark.vllm`` tests, with the reason, where vLLM is not importable, and the
    MoE rows where transformers is too old for them."""
    _skip_moe_rows(items)
    reason = _vllm_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)
