"""Refuse malformed steering at the API server, before a request reaches vLLM's workers.

vLLM calls ``validate_params`` of every logits processor plugin (entry point group
``vllm.logits_processors``) when a request arrives, in the front-end process, and turns a
``ValueError`` into an HTTP 400. This processor only validates: it never changes logits. Checks
that need the model (layer range, hidden size) run in the worker, which logs and ignores steering
that fails them rather than failing every request in the batch.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base
except ImportError:  # steerlab without vLLM: the module still imports (doctests, type checks)
    _Base = object  # type: ignore[assignment,misc]

from steerlab.errors import SteerlabError
from steerlab.vllm.spec import EXTRA_ARGS_KEY, validate

__all__ = ["SteeringValidator"]


class SteeringValidator(_Base):  # type: ignore[misc,valid-type]
    """Validates ``extra_args["steerlab"]`` of each request; leaves logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        raw = extra.get(EXTRA_ARGS_KEY)
        if raw is None:
            return
        try:
            validate(raw)
        except SteerlabError as error:
            raise ValueError(f"invalid steerlab steering: {error}") from error

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None
