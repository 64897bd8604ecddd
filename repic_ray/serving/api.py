"""The HTTP API of the captioning service (FastAPI; OpenAPI at `/docs`).

    POST   /v1/concepts                 register a concept (multipart: name, category,
                                        info, images[])
    GET    /v1/concepts                 list the caller's concepts
    GET    /v1/concepts/{name}          one concept
    GET    /v1/concepts/{name}/images/{i}  a reference image
    DELETE /v1/concepts/{name}          delete it (and images no one else uses)
    POST   /v1/captions                 caption an image (multipart: image, and either
                                        concepts="Bo,Mo" or top_k=N for retrieval;
                                        ?stream=true: server-sent events)
    POST   /v1/chat/completions         the same, OpenAI-compatible (`openai_api.py`)
    GET    /v1/models                   the served model version (OpenAI-compatible)
    POST   /v1/admin/users              create a user and its first key (admins only)
    POST   /v1/admin/users/{name}/keys  another key for a user (admins only)
    GET    /v1/me, /healthz, /readyz, / who am I, liveness, readiness (the caption
                                        engine answers), the web page

Every concept route is scoped to the user that the `X-API-Key` header (or
`Authorization: Bearer KEY`, as OpenAI clients send it) authenticates; another
user's concept is indistinguishable from a missing one (404). The models sit
behind a `Backend` (the Serve deployments' handles in production, the plain
classes in tests), so this module never imports Ray.
"""

# No `from __future__ import annotations` here: FastAPI must evaluate the route
# annotations, which name dependencies defined locally inside `build_app`.
import asyncio
import importlib.resources
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from repic_ray.serving import openai_api
from repic_ray.serving.errors import guarded
from repic_ray.serving.store import Concept, ConceptStore, StoreError, User
from repic_ray.serving.types import (
    CaptionDelta,
    CaptionOptions,
    CaptionResult,
    Match,
    ModelInfo,
    ReferenceConcept,
)
from repic_ray.serving.uploads import (
    BodyLimit,
    LimitsConfig,
    UploadError,
    check_image,
    check_name,
    check_text,
)

logger = logging.getLogger(__name__)

def default_static_dir() -> Path:
    """The web page shipped as package data of `repic_ray.serving` (`static/`)."""
    return Path(str(importlib.resources.files("repic_ray.serving") / "static"))


@dataclass
class ApiConfig:
    """Behaviour of the HTTP API."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Upload and request limits."""
    default_top_k: int = 2
    """Concepts retrieved when a caption request names none and gives no `top_k`."""
    static_dir: str = ""
    """Directory of the web page; empty means the page shipped with the package
    (`repic_ray/serving/static`, found through `importlib.resources`)."""
    caption_timeout_s: float = 120.0
    """A caption request whose retrieval and generation take longer is answered 504."""
    ready_timeout_s: float = 5.0
    """How long `/readyz` waits for the caption engine to answer."""

    def __post_init__(self) -> None:
        for name in ("caption_timeout_s", "ready_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"api.{name}: must be > 0, got {getattr(self, name)}")
        if not 1 <= self.default_top_k <= self.limits.max_concepts_per_caption:
            raise ValueError(
                f"api.default_top_k: must be in 1..limits.max_concepts_per_caption "
                f"({self.limits.max_concepts_per_caption}), got {self.default_top_k}")


class Backend(Protocol):
    """The models behind the API."""

    async def match(self, query: bytes, concepts: list[ReferenceConcept], top_k: int
                    ) -> list[Match]: ...

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options: CaptionOptions | None = None) -> CaptionResult: ...

    def caption_stream(self, query: bytes, concepts: list[ReferenceConcept],
                       options: CaptionOptions | None = None
                       ) -> AsyncIterator[CaptionDelta]: ...

    async def models(self) -> list[ModelInfo]: ...

    async def ready(self) -> None:
        """Returns once the caption engine answers; raises if it cannot."""


# -- response schemas (OpenAPI) ----------------------------------------------

class ConceptOut(BaseModel):
    name: str
    category: str
    info: str
    num_images: int
    image_urls: list[str]


class ConceptUpdate(BaseModel):
    """Fields of a concept to change; those left out keep their value."""

    name: str | None = None
    """New name (the reference images stay; captions use the new name)."""
    category: str | None = None
    info: str | None = None


class MatchOut(BaseModel):
    name: str
    category: str
    score: float | None = None
    box: list[float] | None = None
    """[x1, y1, x2, y2] in pixels of the uploaded image."""


class CaptionOut(BaseModel):
    caption: str
    model: str
    mode: str
    """"explicit" (named concepts) or "retrieval" (top-K nearest concepts)."""
    concepts: list[MatchOut]
    width: int
    height: int


class UserOut(BaseModel):
    name: str
    is_admin: bool


class NewUserIn(BaseModel):
    name: str
    is_admin: bool = False


class NewKeyOut(BaseModel):
    name: str
    api_key: str
    """Shown once; only its hash is stored."""


class ErrorOut(BaseModel):
    detail: str = ""
    """What was wrong with the request, in words."""


_ERRORS = {
    400: "An upload that is not a readable image",
    401: "Missing or invalid X-API-Key",
    403: "The key is not an admin's",
    404: "No such concept, image or user (another user's concept is missing too)",
    409: "The name is taken, or the user's concept limit is reached",
    413: "Too many bytes (request or file) or too many pixels",
    415: "An image format outside the accepted list",
    422: "A malformed field or a limit on names, counts or lengths",
    503: "A model replica failed mid-request (nothing is lost); try again",
    504: "Captioning took longer than the API's caption timeout",
}


class InvalidOut(BaseModel):
    detail: str | list[dict[str, Any]]
    """A limit's message, or FastAPI's list of field errors for a malformed request."""


def _errors(*codes: int) -> dict:
    """OpenAPI `responses` of the error statuses a route answers with (422 on every
    route: a field FastAPI rejects, or a limit this API checks)."""
    return {c: {"model": InvalidOut if c == 422 else ErrorOut, "description": _ERRORS[c]}
            for c in (*codes, 422)}


@dataclass
class Selection:
    """The concepts a caption request uses, in prompt order, and where they are."""

    mode: str
    """"explicit" (named or inline concepts) or "retrieval" (top-K stored concepts)."""
    references: list[ReferenceConcept]
    matches: list[MatchOut]
    """One per reference, same order: category, similarity score and box."""


async def select_concepts(store: ConceptStore, backend: Backend, config: ApiConfig,
                          user: User, query: bytes, names: list[str], top_k: int | None,
                          inline: list[ReferenceConcept] = ()) -> Selection:
    """The user's stored concepts named in `names` (or the `top_k` nearest to `query`;
    the default top-K when neither is given and nothing is `inline`), followed by the
    `inline` reference concepts of the request. Raises UploadError / HTTPException."""
    limits = config.limits
    inline = list(inline)
    names = list(dict.fromkeys(names))
    if names and top_k is not None:
        raise UploadError(422, "give either concepts or top_k, not both")
    if len(names) > limits.max_concepts_per_caption:
        raise UploadError(422, f"concepts: at most {limits.max_concepts_per_caption} "
                               f"per caption, got {len(names)}")
    for n in names:
        check_name(n, limits)
    inline_names = {c.name for c in inline}
    if names:
        clash = sorted(inline_names & set(names))
        if clash:
            raise UploadError(400, f"concept {', '.join(map(repr, clash))} is given both by "
                                   "name and as inline reference images")
        stored = await run_in_threadpool(store.list_concepts, user.id, names)
        missing = sorted(set(names) - {c.name for c in stored})
        if missing:
            raise HTTPException(404, f"no concept named {', '.join(map(repr, missing))}")
        mode, k = "explicit", len(stored)
    elif top_k is not None or not inline:
        k = config.default_top_k if top_k is None else top_k
        if not 1 <= k <= limits.max_concepts_per_caption:
            raise UploadError(422, f"top_k: must be in 1..{limits.max_concepts_per_caption}"
                                   f", got {k}")
        # An inline concept stands in for a stored one of the same name.
        stored = [c for c in await run_in_threadpool(store.list_concepts, user.id)
                  if c.name not in inline_names]
        mode = "retrieval"
    else:
        stored, mode, k = [], "explicit", 0
    if k + len(inline) > limits.max_concepts_per_caption:
        raise UploadError(422, f"at most {limits.max_concepts_per_caption} concepts per "
                               f"caption, got {k} stored + {len(inline)} inline")
    refs = await run_in_threadpool(_references, store, stored)
    candidates = refs + inline
    # One matcher call scores every candidate: it ranks the stored ones for retrieval
    # and gives every concept its box.
    ranked = await backend.match(query, candidates, len(candidates)) if candidates else []
    by_name = {r.name: r for r in candidates}
    if mode == "retrieval":
        stored_names = {r.name for r in refs}
        refs = [by_name[m.name] for m in ranked if m.name in stored_names][:k]
    else:
        # Explicit names keep the user's order.
        refs = [by_name[n] for n in names]
    found = {m.name: m for m in ranked}
    chosen = refs + inline
    matches = []
    for r in chosen:
        m = found.get(r.name)
        matches.append(MatchOut(name=r.name, category=r.category,
                                score=m.score if m else None, box=m.box if m else None))
    return Selection(mode, chosen, matches)


def sse(data: dict | str, event: str = "") -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


def _concept_out(c: Concept) -> ConceptOut:
    return ConceptOut(
        name=c.name, category=c.category, info=c.info, num_images=len(c.image_sha256),
        image_urls=[f"/v1/concepts/{c.name}/images/{i}" for i in range(len(c.image_sha256))],
    )


def build_app(store: ConceptStore, backend: Backend, config: ApiConfig | None = None) -> FastAPI:
    """The FastAPI application over `store` and `backend`."""
    config = config or ApiConfig()
    limits = config.limits
    app = FastAPI(
        title="repic-ray personalized captioner",
        description="Register personal concepts with reference photos, then caption "
                    "photos that mention them by name (RePIC-style prompting).",
        version="1",
    )
    app.add_middleware(BodyLimit, max_bytes=limits.request_bytes())
    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                                  description="A key from `repic serve add-user`.")
    bearer = HTTPBearer(auto_error=False, description="The same key, as OpenAI clients "
                                                      "send it: `Authorization: Bearer KEY`.")

    # The OpenAI-compatible routes answer errors in OpenAI's shape
    # ({"error": {"message", "type", "param", "code"}}), the others in FastAPI's.
    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError) -> JSONResponse:
        if openai_api.is_openai_route(request):
            return openai_api.error_response(exc.status, str(exc), getattr(exc, "param", None))
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if openai_api.is_openai_route(request):
            return openai_api.error_response(exc.status_code, str(exc.detail),
                                             headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if openai_api.is_openai_route(request):
            return openai_api.validation_error_response(exc)
        return await request_validation_exception_handler(request, exc)

    def current_user(
        key: Annotated[str | None, Depends(api_key_header)],
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> User:
        user = store.authenticate(key or (token.credentials if token else ""))
        if user is None:
            raise HTTPException(401, "missing or invalid API key (X-API-Key header or "
                                     "Authorization: Bearer)",
                                headers={"WWW-Authenticate": "APIKey"})
        return user

    def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
        if not user.is_admin:
            raise HTTPException(403, "admin key required")
        return user

    Caller = Annotated[User, Depends(current_user)]

    async def read_upload(upload: UploadFile) -> bytes:
        # Read one byte past the limit: enough to know it is too large, no more.
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise UploadError(413, f"{upload.filename or 'upload'}: larger than the limit "
                                   f"of {limits.max_upload_bytes} bytes")
        return data

    # -- misc --------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        """Liveness of the API process alone."""
        return {"ok": True}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the caption engine answers, else 503 with the reason."""
        try:
            await asyncio.wait_for(backend.ready(), config.ready_timeout_s)
        except TimeoutError:
            return JSONResponse({"ready": False, "detail": "the captioner is not ready "
                                 f"(no answer within {config.ready_timeout_s} s)"}, 503)
        except Exception as exc:  # noqa: BLE001 - any failure is the engine's reason (e.g. vLLM's start-up error)
            return JSONResponse({"ready": False, "detail": f"captioner: {exc}"}, 503)
        return JSONResponse({"ready": True})

    @app.get("/v1/me", response_model=UserOut, responses=_errors(401))
    def me(user: Caller) -> UserOut:
        return UserOut(name=user.name, is_admin=user.is_admin)

    # -- admin -------------------------------------------------------------

    @app.post("/v1/admin/users", response_model=NewKeyOut, status_code=201,
              responses=_errors(401, 403, 409, 413))
    def create_user(body: NewUserIn, _: Annotated[User, Depends(admin_user)]) -> NewKeyOut:
        try:
            store.create_user(body.name, is_admin=body.is_admin)
        except StoreError as exc:
            raise HTTPException(409, str(exc)) from None
        return NewKeyOut(name=body.name, api_key=store.create_api_key(body.name))

    @app.post("/v1/admin/users/{name}/keys", response_model=NewKeyOut, status_code=201,
              responses=_errors(401, 403, 404, 413))
    def create_key(name: str, _: Annotated[User, Depends(admin_user)]) -> NewKeyOut:
        try:
            return NewKeyOut(name=name, api_key=store.create_api_key(name))
        except StoreError as exc:
            raise HTTPException(404, str(exc)) from None

    # -- concepts ----------------------------------------------------------

    @app.post("/v1/concepts", response_model=ConceptOut, status_code=201,
              responses=_errors(400, 401, 409, 413, 415))
    async def create_concept(
        user: Caller,
        name: Annotated[str, Form(description="Concept name, e.g. Bo")],
        images: Annotated[list[UploadFile], File(description="Reference photos")],
        category: Annotated[str, Form(description="e.g. dog")] = "object",
        info: Annotated[str, Form(description="Short description")] = "",
    ) -> ConceptOut:
        check_name(name, limits)
        check_text("category", category, limits.max_category_chars)
        check_text("info", info, limits.max_info_chars)
        if not 1 <= len(images) <= limits.max_images_per_concept:
            raise UploadError(422, f"images: between 1 and {limits.max_images_per_concept} "
                                   f"reference images, got {len(images)}")
        blobs = []
        for upload in images:
            data = await read_upload(upload)
            await run_in_threadpool(check_image, data, upload.filename or "", limits)
            blobs.append(data)
        try:
            concept = await run_in_threadpool(
                partial(store.add_concept, user.id, name, category, info, blobs,
                        max_concepts=limits.max_concepts_per_user))
        except StoreError as exc:
            raise HTTPException(409, str(exc)) from None
        return _concept_out(concept)

    @app.get("/v1/concepts", response_model=list[ConceptOut], responses=_errors(401))
    def list_concepts(user: Caller) -> list[ConceptOut]:
        return [_concept_out(c) for c in store.list_concepts(user.id)]

    def owned(user: User, name: str) -> Concept:
        concept = store.get_concept(user.id, name)
        if concept is None:
            raise HTTPException(404, f"no concept named {name!r}")
        return concept

    @app.get("/v1/concepts/{name}", response_model=ConceptOut, responses=_errors(401, 404))
    def get_concept(name: str, user: Caller) -> ConceptOut:
        return _concept_out(owned(user, name))

    @app.get("/v1/concepts/{name}/images/{index}",
             responses={200: {"content": {"image/*": {}}}, **_errors(401, 404)})
    def get_concept_image(name: str, index: int, user: Caller) -> Response:
        concept = owned(user, name)
        if not 0 <= index < len(concept.image_sha256):
            raise HTTPException(404, f"concept {name!r} has no image {index}")
        data = store.images.get(concept.image_sha256[index])
        return Response(content=data, media_type=_media_type(data),
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.patch("/v1/concepts/{name}", response_model=ConceptOut,
               responses=_errors(401, 404, 409, 422))
    def update_concept(name: str, update: ConceptUpdate, user: Caller) -> ConceptOut:
        if update.name is not None:
            check_name(update.name, limits)
        if update.category is not None:
            check_text("category", update.category, limits.max_category_chars)
        if update.info is not None:
            check_text("info", update.info, limits.max_info_chars)
        try:
            concept = store.update_concept(user.id, name, new_name=update.name,
                                           category=update.category, info=update.info)
        except StoreError as exc:
            raise HTTPException(409, str(exc)) from None
        if concept is None:
            raise HTTPException(404, f"no concept named {name!r}")
        return _concept_out(concept)

    @app.delete("/v1/concepts/{name}", status_code=204, responses=_errors(401, 404))
    def delete_concept(name: str, user: Caller) -> Response:
        if not store.delete_concept(user.id, name):
            raise HTTPException(404, f"no concept named {name!r}")
        return Response(status_code=204)

    # -- captions ----------------------------------------------------------

    @app.post("/v1/captions", response_model=CaptionOut,
              responses={**_errors(400, 401, 404, 413, 415, 503, 504),
                         200: {"content": {"text/event-stream": {}}}})
    async def caption(
        user: Caller,
        image: Annotated[UploadFile, File(description="The photo to caption")],
        concepts: Annotated[str, Form(
            description="Comma-separated concept names to use; empty: retrieve top_k")] = "",
        top_k: Annotated[int | None, Form(description="Concepts to retrieve")] = None,
        stream: Annotated[bool, Query(description=(
            "Server-sent events: `concepts` (matches and boxes), `delta` (caption text "
            "as it is generated), then `done` (the whole response)"))] = False,
    ) -> CaptionOut | StreamingResponse:
        data = await read_upload(image)
        query = await run_in_threadpool(check_image, data, image.filename or "", limits)
        names = [n.strip() for n in concepts.split(",") if n.strip()]
        sel, result = await guarded(config.caption_timeout_s, _select_and_caption(user, data, names, top_k, not stream))

        def out(result: CaptionResult) -> CaptionOut:
            return CaptionOut(caption=result.caption, model=result.model, mode=sel.mode,
                              width=query.width, height=query.height, concepts=sel.matches)

        if not stream:
            return out(result)

        async def events() -> AsyncIterator[str]:
            yield sse({"mode": sel.mode, "concepts": [m.model_dump() for m in sel.matches],
                       "width": query.width, "height": query.height}, "concepts")
            try:
                async for delta in backend.caption_stream(data, sel.references):
                    if delta.text:
                        yield sse({"text": delta.text}, "delta")
                    if delta.result is not None:
                        yield sse(out(delta.result).model_dump(), "done")
            except Exception as exc:  # the 200 is sent: report it in the stream
                logger.exception("streamed caption failed")
                yield sse({"detail": f"caption failed: {exc}"}, "error")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _select_and_caption(user: User, data: bytes, names: list[str], top_k: int | None,
                                  generate: bool) -> tuple[Selection, CaptionResult | None]:
        sel = await select_concepts(store, backend, config, user, data, names, top_k)
        return sel, (await backend.caption(data, sel.references) if generate else None)

    openai_api.add_routes(app, store, backend, config, Caller)

    # -- web page ----------------------------------------------------------

    static = Path(config.static_dir) if config.static_dir else default_static_dir()
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(static / "index.html")

    return app


def _references(store: ConceptStore, concepts: list[Concept]) -> list[ReferenceConcept]:
    return [
        ReferenceConcept(name=c.name, category=c.category, info=c.info,
                         images=[store.images.get(h) for h in c.image_sha256],
                         image_sha256=list(c.image_sha256))
        for c in concepts
    ]


def _media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class LocalBackend:
    """A `Backend` over in-process model objects (tests, the benchmark baseline, a
    single-process server). Model calls run in a worker thread so the event loop
    keeps serving."""

    def __init__(self, retriever, captioner):
        self.retriever = retriever
        self.captioner = captioner
        self._lock = asyncio.Lock()

    async def match(self, query: bytes, concepts: list[ReferenceConcept], top_k: int
                    ) -> list[Match]:
        return await run_in_threadpool(self.retriever.match, query, concepts, top_k)

    async def caption(self, query: bytes, concepts: list[ReferenceConcept],
                      options: CaptionOptions | None = None) -> CaptionResult:
        if asyncio.iscoroutinefunction(self.captioner.caption):
            return await self.captioner.caption(query, concepts, options)
        # One generate at a time: HF models are not safe to call from several threads.
        async with self._lock:
            return await run_in_threadpool(self.captioner.caption, query, concepts, options)

    async def ready(self) -> None:
        return None

    async def caption_stream(self, query: bytes, concepts: list[ReferenceConcept],
                             options: CaptionOptions | None = None
                             ) -> AsyncIterator[CaptionDelta]:
        stream = getattr(self.captioner, "caption_stream", None)
        if stream is not None:
            async for delta in stream(query, concepts, options):
                yield delta
            return
        # transformers generate: the whole caption as one piece.
        result = await self.caption(query, concepts, options)
        yield CaptionDelta(result.caption, result)

    async def models(self) -> list[ModelInfo]:
        return [self.captioner.model_info()]
