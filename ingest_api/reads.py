"""Read routes: the merged view of rows (replica overlaid with what is still buffered) and states."""

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["reads"])
