"""``/health`` and ``/v1/models``: what the server serves and its limits."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from steerlab.server.deps import ServerSettings, authorize, check_model, engine_of, settings_of
from steerlab.server.engine import Engine

__all__ = ["model_card", "router"]

router = APIRouter()


def model_card(engine: Engine) -> dict[str, Any]:
    """The ``/v1/models`` entry of ``engine``'s model."""
    return {
        "id": engine.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "steerlab",
        "n_layers": engine.n_layers,
    }


@router.get("/health")
async def health(
    engine: Annotated[Engine, Depends(engine_of)],
    settings: Annotated[ServerSettings, Depends(settings_of)],
) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": engine.model_id,
        "limits": settings.limits(),
    }


@router.get("/v1/models", dependencies=[Depends(authorize)])
async def models(engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(engine)]}


@router.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
async def model(name: str, engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    check_model(engine, name)
    return model_card(engine)
