"""Interventions: what is done at a site, activated through hooks that never leak.

This module gathers three parts under their old home: :mod:`steerlab.tracking` (position
tracking), :mod:`steerlab.dispatch` (hooks installed once per site, plans read per call) and
:mod:`steerlab.steering` (the steering value and its semantics). Code inside steerlab imports
from those; this module keeps user code's imports working.

An :class:`Intervention` describes an edit (add a steering vector, ablate a head, ...) and lists
the hooks it needs. Activating it never registers and removes hooks on the shared modules per
call: each site gets one permanent, inert dispatcher hook the first time it is used, and what the
dispatchers run is read at call time from two plans:

- :func:`activate` (``with model.steer(...)``, per-call ``steering=``): this thread or asyncio
  task only, through a :class:`contextvars.ContextVar`. Threads sharing one model never see each
  other's steering.
- :func:`install` (``model.add_steering``): every thread, until ``handle.remove()``.

Every activation also brings a :class:`PositionTracker` (per-thread state) that the backbone's
dispatcher feeds with each forward call's attention mask; it works out the *absolute* index of
every token (prompt start = 0, padding = -1), so position specs mean the same thing with or
without a KV cache.

Order: global installations first (in installation order), then this context's (outer
``with model.steer(...)`` first, inner ones next, per-call ``steering=`` last), and within a list
in list order. Reads (``model.activations``) see the result of all of them.

>>> import torch, transformers
>>> from steerlab.adapter import ModelAdapter
>>> from steerlab.vectors import SteeringVector
>>> hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2,
...     vocab_size=16))
>>> adapter = ModelAdapter(hf)
>>> steering = Steering(SteeringVector({1: torch.ones(8)}), strength=2.0)
>>> with activate(adapter, [steering]):
...     steered = hf(torch.tensor([[1, 2, 3]])).logits
>>> plain = hf(torch.tensor([[1, 2, 3]])).logits
>>> bool((steered != plain).any()), count_hooks(hf)
(True, 0)
"""

from __future__ import annotations

from steerlab.dispatch import (
    HookHandle,
    HookSpec,
    Intervention,
    ScopedStack,
    activate,
    active_trackers,
    count_hooks,
    install,
    scoped_hooks,
    strip_dispatchers,
)
from steerlab.sites import output_hidden, replace_output_hidden
from steerlab.steering import (
    SITE_ORDER,
    RowSteering,
    Steering,
    SteeringLike,
    direction_at,
    normalize_steering,
    steering_with,
)
from steerlab.tracking import PositionTracker, SequenceState, positions_without_2d_mask

__all__ = [
    "SITE_ORDER",
    "HookHandle",
    "HookSpec",
    "Intervention",
    "PositionTracker",
    "RowSteering",
    "ScopedStack",
    "SequenceState",
    "Steering",
    "SteeringLike",
    "active_trackers",
    "activate",
    "count_hooks",
    "direction_at",
    "install",
    "normalize_steering",
    "output_hidden",
    "positions_without_2d_mask",
    "replace_output_hidden",
    "scoped_hooks",
    "steering_with",
    "strip_dispatchers",
]
