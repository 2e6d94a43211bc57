"""``steerlab serve``: an OpenAI-compatible HTTP server with per-request steering.

Three layers, each replaceable on its own:

* :mod:`steerlab.server.engine` -- the engine interface (:class:`Engine`), which re-exports its
  parts: the typed :class:`GenerationRequest` and :class:`TokenEvent` values
  (:mod:`steerlab.server.requests`), the :class:`RequestStream` of events and the stop-string
  matcher (:mod:`steerlab.server.stream`), the registries of named vectors and conditions
  (:mod:`steerlab.server.registry`) and the torch engine (:mod:`steerlab.server.torch_engine`),
  which batches all active requests into one forward pass per decoding step;
* :mod:`steerlab.server.protocol` -- pydantic models of OpenAI's request/response schema plus the
  ``steering`` and ``readout`` fields;
* :mod:`steerlab.server.app` -- the FastAPI application (:func:`create_app`), assembled from one
  router per area (:mod:`steerlab.server.routes`) that reach the engine and the options through
  dependencies (:mod:`steerlab.server.deps`).

The package needs the ``server`` extra (``pip install 'steerlab[server]'``); importing
:mod:`steerlab.server.engine` alone needs only torch.
"""

from __future__ import annotations

__all__: list[str] = []
