"""``/v1/vectors`` and ``/v1/conditions``: list, upload and delete what requests may name."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from steerlab.errors import InvalidInputError
from steerlab.server.deps import HTTPError, ServerSettings, authorize, engine_of, settings_of
from steerlab.server.engine import Engine
from steerlab.server.protocol import VectorUpload, validation_message

__all__ = ["describe_condition", "describe_vector", "router"]

router = APIRouter(dependencies=[Depends(authorize)])


def describe_vector(name: str, vector: Any) -> dict[str, Any]:
    """The ``/v1/vectors`` entry of a registered vector.

    >>> import torch, steerlab as sl
    >>> describe_vector("calm", sl.SteeringVector({3: torch.ones(4)}))["layers"]
    [3]
    """
    meta = dict(vector.metadata)
    scalars = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
    return {
        "id": name,
        "object": "vector",
        "layers": list(vector.layers),
        "d_model": vector.d_model,
        "method": meta.get("method"),
        "model": meta.get("model_name"),
        "norms": {str(k): round(v, 6) for k, v in vector.norms().items()},
        "recommended_strength": meta.get("recommended_strength"),
        "metadata": scalars,
    }


def describe_condition(name: str, condition: Any) -> dict[str, Any]:
    """The ``/v1/conditions`` entry of a registered condition.

    >>> import torch, steerlab as sl
    >>> describe_condition("cats", sl.Condition(torch.ones(4), layer=2, threshold=0.5))["scope"]
    'prompt'
    """
    meta = dict(condition.metadata)
    return {
        "id": name,
        "object": "condition",
        "layer": condition.layer,
        "threshold": condition.threshold,
        "comparison": condition.comparison,
        "scope": condition.scope,
        "d_model": int(condition.direction.shape[0]),
        "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))},
    }


@router.get("/v1/vectors")
async def vectors(engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [describe_vector(name, vec) for name, vec in engine.vectors.items()],
    }


@router.get("/v1/conditions")
async def conditions(engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [describe_condition(name, c) for name, c in engine.conditions.items()],
    }


async def _read_upload(request: Request, max_upload_bytes: int) -> tuple[str, bytes]:
    """The name and file bytes of an upload: multipart form data (``file``, ``name``) or JSON
    (``name``, base64 ``data``)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidInputError("multipart upload needs a 'file' field with the vector")
        data = await upload.read(max_upload_bytes + 1)
        name_field = form.get("name")
        if isinstance(name_field, str) and name_field:
            return name_field, data
        return Path(upload.filename or "").stem, data
    raw = await request.body()
    try:
        body = await run_in_threadpool(VectorUpload.model_validate_json, raw)
    except ValidationError as err:
        raise InvalidInputError(
            f"send multipart form data (file, name) or JSON {{'name', 'data': base64}}: "
            f"{validation_message(err.errors())[0]}"
        ) from None
    try:
        data = await run_in_threadpool(base64.b64decode, body.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("'data' is not valid base64") from None
    return body.name, data


@router.post("/v1/vectors")
async def upload_vector(
    request: Request,
    engine: Annotated[Engine, Depends(engine_of)],
    settings: Annotated[ServerSettings, Depends(settings_of)],
) -> dict[str, Any]:
    max_upload_bytes, max_vectors = settings.max_upload_bytes, settings.max_vectors
    name, data = await _read_upload(request, max_upload_bytes)
    if len(data) > max_upload_bytes:
        raise InvalidInputError(
            f"vector files are limited to {max_upload_bytes} bytes (--max-upload-bytes)"
        )
    async with settings.upload_lock:
        if len(engine.vectors) >= max_vectors:
            raise HTTPError(
                409,
                f"this server holds {len(engine.vectors)} vectors, its cap of {max_vectors} "
                f"(--max-vectors); delete one (DELETE /v1/vectors/NAME) to make room",
                kind="invalid_request_error",
                code="too_many_vectors",
            )
        # loading checks the file (format, checksum, fit to the model): off the event loop
        await run_in_threadpool(engine.vectors.register_bytes, name, data)
    return describe_vector(name, engine.vectors.get(name))


@router.delete("/v1/vectors/{name}")
async def delete_vector(name: str, engine: Annotated[Engine, Depends(engine_of)]) -> dict[str, Any]:
    # requests already admitted hold the vector itself, not its name: they are unaffected
    if engine.vectors.remove(name) is None:
        raise HTTPError(
            404,
            f"no vector named {name!r} is registered",
            kind="not_found_error",
            code="vector_not_found",
        )
    return {"id": name, "object": "vector", "deleted": True}
