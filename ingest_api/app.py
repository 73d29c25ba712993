"""The ingest endpoint the observatory's scripts write to."""

from typing import Annotated

import redis
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ingest_api.deps import get_redis
from opsync.health import redis_durability

app = FastAPI(
    title="opsync ingest API",
    version="1",
    description="Buffers observatory operations records durably at the site and answers at once.",
)


class Health(BaseModel):
    status: str
    detail: str | None = None


@app.get("/healthz", response_model=Health, tags=["health"])
def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
def readyz(client: Annotated[redis.Redis, Depends(get_redis)]):
    """Readiness: the buffer is reachable and durable, so a 202 from this API means "on disk"."""
    result = redis_durability(client)
    if not result.ok:
        return JSONResponse(Health(status="unavailable", detail=result.detail).model_dump(), status_code=503)
    return Health(status="ok", detail=result.detail)
