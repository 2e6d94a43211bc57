"""The HTTP app's routers, one per area: :mod:`~steerlab.server.routes.models` (health and the
model), :mod:`~steerlab.server.routes.vectors` (vectors and conditions),
:mod:`~steerlab.server.routes.completions` (completions and chat) and
:mod:`~steerlab.server.routes.playground` (the browser page)."""
