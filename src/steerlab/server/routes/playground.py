"""The playground: a browser page over the API (its files ship as package data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["STATIC_DIR", "router"]

STATIC_DIR = Path(__file__).parent.parent / "static"
"""The playground's files (shipped as package data)."""

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> Any:
    return FileResponse(STATIC_DIR / "index.html")
