"""How model calls fail toward the client: timeouts and dead replicas as clear statuses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import HTTPException
from starlette.exceptions import HTTPException as StarletteHTTPException

from repic_ray.serving.uploads import UploadError

T = TypeVar("T")


async def guarded(timeout_s: float, call: Awaitable[T]) -> T:
    """Await a model call under the API's caption timeout (`api.caption_timeout_s`): too
    slow -> 504; a model replica that dies or fails mid-request -> 503 with Retry-After
    (nothing stored is touched); the request's own errors (4xx) pass through."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except TimeoutError:
        raise HTTPException(504, f"captioning took longer than {timeout_s} s "
                                 "(api.caption_timeout_s); try again later") from None
    except (HTTPException, UploadError, StarletteHTTPException):
        raise
    except Exception as exc:  # a model replica died or failed mid-request
        raise HTTPException(503, f"the model service failed mid-request ({type(exc).__name__})"
                                 "; nothing was stored, try again",
                            headers={"Retry-After": "5"}) from exc
