"""OpenAI-compatible routes of the captioning API, for the clients and gateways that
already speak OpenAI's chat completions (the `openai` Python client, ...):

    POST /v1/chat/completions   a caption as a chat completion (or a stream of chunks)
    GET  /v1/models             the served model version

A request is one user message whose content is the RePIC prompt layout the model was
trained on (`repic_ray.prompts`): reference images, each followed by a text part
"This is <name>." (or "This is name."), then the photo to caption (the last image),
then the question (optional; the default caption question otherwise). Images are
data URLs (`data:image/png;base64,...`); the service fetches nothing, so an http(s)
URL is refused. Two extension fields bring in the caller's stored concepts, as on
`/v1/captions`: `concepts: ["Bo", "Mia"]` (their references come before the inline
ones) or `top_k: N` (retrieval among the stored concepts). A request with neither and
no inline references retrieves the default top-K. The response adds `mode` and
`concepts` (name, category, score, box in query pixels) to the chat completion; a
stream sends them with its first chunk.

Decoding is greedy unless `temperature` > 0 (then `top_p` and `seed` apply);
`max_tokens` / `max_completion_tokens` may only shorten the captioner's limit.
Parameters this service cannot honour (`n` > 1, tools, logprobs, penalties, ...) are
refused with a 400 naming them rather than ignored. Errors have OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`.
"""

# No `from __future__ import annotations`: FastAPI evaluates the route annotations,
# which name the `Caller` dependency passed to `add_routes`.
import base64
import binascii
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from repic_ray.serving.errors import guarded
from repic_ray.serving.types import CaptionOptions, ModelInfo, ReferenceConcept
from repic_ray.serving.uploads import LimitsConfig, UploadError, check_image, check_name

logger = logging.getLogger(__name__)

ROUTES = ("/v1/chat/completions", "/v1/models")

INLINE_CATEGORY = "object"
"""Category of an inline reference concept (the request gives none); the detector
looks for it in the photo."""

_LABEL = re.compile(r"\s*This is\s+<?([^<>\s]+?)>?\s*\.?\s*", re.IGNORECASE)
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[^;,]*)*)(;base64)?,(.*)",
                       re.DOTALL)

# Parameters accepted at the value that changes nothing; any other value is refused.
_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "stop": [],
    "tools": [], "functions": [], "response_format": {"type": "text"},
    "parallel_tool_calls": False, "store": False, "metadata": {},
}
# Accepted and meaningless here: an end-user id, a latency tier.
_IGNORED = {"user", "service_tier"}


class RequestError(UploadError):
    """A refused request, naming the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


class ChatRequest(BaseModel):
    """The chat completion request; unknown fields are kept and checked (`_NEUTRAL`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    concepts: list[str] | None = None
    """Extension: names of the caller's stored concepts to show the model."""
    top_k: int | None = None
    """Extension: retrieve this many of the caller's stored concepts."""


@dataclass
class Prompt:
    """A parsed user message."""

    query: bytes
    """The photo to caption (the last image)."""
    width: int
    height: int
    inline: list[ReferenceConcept]
    """Inline reference concepts, in order of first appearance."""
    question: str
    """The text that is not a reference's name; empty for the default question."""


# -- errors -------------------------------------------------------------------

def is_openai_route(request: Request) -> bool:
    return request.url.path in ROUTES


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 409: "conflict_error",
                413: "invalid_request_error", 415: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorOut(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    error: OpenAIErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "A malformed or unsupported request (the message names the field)",
    401: "Missing or invalid API key (X-API-Key or Authorization: Bearer)",
    404: "No such model, or no concept of this user with that name",
    413: "Too many bytes or pixels in an image",
    415: "An image format outside the accepted list",
    503: "A model replica failed mid-request (nothing is lost); try again",
    504: "Captioning took longer than the API's caption timeout",
}


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses` for these error statuses, in OpenAI's error shape."""
    return {c: {"model": OpenAIErrorOut, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "param": param, "code": None,
                      "type": _ERROR_TYPES.get(status, "server_error" if status >= 500
                                               else "invalid_request_error")}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param),
                        headers=headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """A malformed body is a 400 naming the first bad field, as OpenAI answers it."""
    err = (exc.errors() or [{}])[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid")
    return error_response(400, message, param)


# -- the request --------------------------------------------------------------

def check_parameters(body: ChatRequest) -> None:
    """Refuse what this service cannot honour instead of ignoring it."""
    if body.n not in (None, 1):
        raise RequestError(400, f"n: only one choice per request is supported, got {body.n}",
                           "n")
    for key, value in (body.model_extra or {}).items():
        if value is None or key in _IGNORED or (key in _NEUTRAL and value == _NEUTRAL[key]):
            continue
        raise RequestError(400, f"{key}: this parameter is not supported by the captioner",
                           key)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise RequestError(400, "give max_tokens or max_completion_tokens, not both",
                           "max_completion_tokens")


def caption_options(body: ChatRequest, question: str, model: ModelInfo) -> CaptionOptions:
    options = CaptionOptions(
        question=question,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed)
    try:
        return options.checked(model.max_tokens)
    except ValueError as exc:
        raise RequestError(400, str(exc), str(exc).split(":")[0]) from None


def decode_data_url(url: str, where: str, limits: LimitsConfig) -> bytes:
    """The bytes of a base64 data URL; RequestError for anything else."""
    if re.match(r"https?://", url, re.IGNORECASE):
        raise RequestError(400, f"{where}: remote image URLs are not fetched; send the "
                                "image inline as a data URL (data:image/png;base64,...)",
                           where)
    m = _DATA_URL.fullmatch(url.strip())
    if m is None or not m.group(3):
        raise RequestError(400, f"{where}: not a base64 data URL "
                                "(expected data:image/png;base64,...)", where)
    payload = m.group(4)
    # Refuse an oversized payload before decoding it (4 base64 chars per 3 bytes).
    if len(payload) > (limits.max_upload_bytes + 2) // 3 * 4 + 4:
        raise RequestError(413, f"{where}: larger than the limit of "
                                f"{limits.max_upload_bytes} bytes", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: malformed base64 in the data URL", where) from None


def parse_messages(messages: list[dict[str, Any]], limits: LimitsConfig) -> Prompt:
    """The photo, inline references and question of the one user message."""
    layout = ("one user message: reference images each followed by 'This is <name>.', "
              "then the photo to caption, then an optional question")
    if len(messages) != 1:
        roles = [m.get("role") for m in messages]
        raise RequestError(400, f"messages: expected {layout}; got {len(messages)} "
                                f"messages with roles {roles}", "messages")
    message = messages[0]
    if message.get("role") != "user":
        raise RequestError(400, f"messages[0].role: {message.get('role')!r} is not "
                                f"supported; expected {layout}", "messages[0].role")
    content = message.get("content")
    if isinstance(content, str) or not content:
        raise RequestError(400, "messages[0].content: no image; give the photo to caption "
                                "as an image_url part with a data URL", "messages[0].content")
    if not isinstance(content, list):
        raise RequestError(400, "messages[0].content: must be a string or a list of parts",
                           "messages[0].content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(("text", part["text"]))
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise RequestError(400, f"messages[0].content[{j}].image_url: needs a url",
                                   f"messages[0].content[{j}].image_url")
            parts.append(("image", url))
        else:
            raise RequestError(400, f"messages[0].content[{j}]: unsupported part type "
                                    f"{kind!r} (text and image_url are supported)",
                               f"messages[0].content[{j}]")
    images = [j for j, (kind, _) in enumerate(parts) if kind == "image"]
    if not images:
        raise RequestError(400, "messages[0].content: no image; give the photo to caption "
                                "as an image_url part with a data URL", "messages[0].content")
    max_images = limits.max_concepts_per_caption * limits.max_images_per_concept + 1
    if len(images) > max_images:
        raise RequestError(400, f"messages[0].content: at most {max_images} images (the "
                                f"photo and {max_images - 1} references), got {len(images)}",
                           "messages[0].content")
    blobs: dict[int, bytes] = {}
    for j in images:
        where = f"messages[0].content[{j}].image_url"
        blobs[j] = decode_data_url(parts[j][1], where, limits)
        decoded = check_image(blobs[j], where, limits)  # the last one is the photo's
    query_at = images[-1]
    labels: dict[int, str] = {}
    for j in images[:-1]:
        m = _LABEL.fullmatch(parts[j + 1][1]) if parts[j + 1][0] == "text" else None
        if m is None:
            raise RequestError(400, f"messages[0].content[{j}]: a reference image must be "
                                    "followed by a text part 'This is <name>.' (only the "
                                    "last image is the photo to caption)",
                               f"messages[0].content[{j + 1}]")
        labels[j + 1] = check_name(m.group(1), limits)
    inline: dict[str, ReferenceConcept] = {}
    for j in images[:-1]:
        name = labels[j + 1]
        ref = inline.setdefault(name, ReferenceConcept(name=name, category=INLINE_CATEGORY,
                                                       info="", images=[]))
        ref.images.append(blobs[j])
        ref.image_sha256.append(sha256(blobs[j]).hexdigest())
        if len(ref.images) > limits.max_images_per_concept:
            raise UploadError(422, f"{name}: at most {limits.max_images_per_concept} "
                                   "reference images per concept")
    question = " ".join(text.strip() for j, (kind, text) in enumerate(parts)
                        if kind == "text" and j not in labels and text.strip())
    return Prompt(blobs[query_at], decoded.width, decoded.height, list(inline.values()),
                  question)


# -- responses ----------------------------------------------------------------

def _usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def add_routes(app: FastAPI, store, backend, config, Caller) -> None:
    """Add the OpenAI-compatible routes to `app` (`build_app` calls this); `Caller`
    is the annotated dependency that authenticates the user."""
    from repic_ray.serving.api import select_concepts, sse

    limits = config.limits
    served: list[ModelInfo] = []

    async def models() -> list[ModelInfo]:
        if not served:  # the captioner does not change while this app lives
            served[:] = await backend.models()
        return served

    @app.get("/v1/models", responses=error_responses(401))
    async def list_models(_: Caller) -> dict:
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": m.created, "owned_by": "repic-ray"}
            for m in await models()]}

    @app.post("/v1/chat/completions", responses={
        200: {"content": {"application/json": {}, "text/event-stream": {}}},
        **error_responses(400, 401, 404, 413, 415, 503, 504)})
    async def chat_completions(body: ChatRequest, user: Caller):
        check_parameters(body)
        available = await models()
        model = next((m for m in available if body.model in (None, m.id)), None)
        if model is None:
            raise HTTPException(404, f"model {body.model!r} is not served here (served: "
                                     f"{', '.join(m.id for m in available)})")
        prompt = await run_in_threadpool(parse_messages, body.messages, limits)
        options = caption_options(body, prompt.question, model)
        sel = await guarded(config.caption_timeout_s, select_concepts(
            store, backend, config, user, prompt.query, body.concepts or [], body.top_k,
            prompt.inline))
        extension = {"mode": sel.mode, "concepts": [m.model_dump() for m in sel.matches]}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model.id, "system_fingerprint": None}
        if not body.stream:
            result = await guarded(config.caption_timeout_s,
                                   backend.caption(prompt.query, sel.references, options))
            return {**head, "object": "chat.completion", "model": result.model,
                    "choices": [{"index": 0, "finish_reason": result.finish_reason,
                                 "logprobs": None,
                                 "message": {"role": "assistant", "content": result.caption,
                                             "refusal": None}}],
                    "usage": _usage(result), **extension}
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            return sse({**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None,
                 "finish_reason": finish_reason}], **extra})

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, **extension)
            try:
                async for delta in backend.caption_stream(prompt.query, sel.references,
                                                           options):
                    if delta.text:
                        yield chunk({"content": delta.text})
                    if delta.result is not None:
                        yield chunk({}, delta.result.finish_reason)
                        if include_usage:
                            yield sse({**head, "object": "chat.completion.chunk",
                                       "choices": [], "usage": _usage(delta.result)})
            except Exception as exc:  # the 200 is sent: report it in the stream
                logger.exception("streamed chat completion failed")
                yield sse(error_body(500, f"caption failed: {exc}"))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
