"""The OpenAI-compatible routes in-process, called with the real `openai` client (over
FastAPI's TestClient) on a real store, the tiny retriever and the HF captioner:
prompt layout, usage, extension fields, streaming format, and every refused input."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from repic_ray.serving.api import ApiConfig, LocalBackend, build_app
from repic_ray.serving.captioner import CaptionerConfig, HFCaptioner
from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig
from repic_ray.serving.store import ConceptStore, StoreConfig
from repic_ray.serving.uploads import LimitsConfig

MODEL = "tiny-chat-v1"
LIMITS = LimitsConfig(max_upload_bytes=200_000, max_pixels=512 * 512,
                      max_images_per_concept=2, max_concepts_per_caption=2)


def png(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def backend(tiny_retriever_models) -> LocalBackend:
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0), *tiny_retriever_models)
    captioner = HFCaptioner(CaptionerConfig(max_new_tokens=8, model_version=MODEL))
    return LocalBackend(retriever, captioner)


@pytest.fixture
def env(tmp_path, backend):
    """(http client, openai client of alice, openai client of bob, alice's headers)."""
    store = ConceptStore(StoreConfig(root=str(tmp_path)))
    http = TestClient(build_app(store, backend, ApiConfig(limits=LIMITS, default_top_k=1)))
    keys = {}
    for name in ("alice", "bob"):
        store.create_user(name)
        keys[name] = store.create_api_key(name)
    res = http.post("/v1/concepts", headers={"X-API-Key": keys["alice"]},
                    data={"name": "Bo", "category": "dog"},
                    files=[("images", ("bo.png", png("red"), "image/png"))])
    assert res.status_code == 201, res.text

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http,
                             max_retries=0)

    return http, client(keys["alice"]), client(keys["bob"]), {"X-API-Key": keys["alice"]}


def test_models_and_bearer_auth(env):
    http, alice, _, headers = env
    assert [m.id for m in alice.models.list()] == [MODEL]
    bearer = {"Authorization": "Bearer " + headers["X-API-Key"]}
    assert http.get("/v1/me", headers=bearer).json()["name"] == "alice"
    assert http.get("/v1/me", headers={"Authorization": "Bearer rk_wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url="http://testserver/v1", api_key="rk_wrong", http_client=http,
                      max_retries=0).models.list()


def test_stored_and_inline_concepts_use_the_trained_prompt(env):
    http, alice, _, headers = env
    query = png("red", (84, 56))
    # The reference plain /v1/captions: stored Bo, default question.
    plain = http.post("/v1/captions", headers=headers, data={"concepts": "Bo"},
                      files={"image": ("q.png", query, "image/png")}).json()
    stored = alice.chat.completions.create(
        model=MODEL, messages=user(image_part(query)), temperature=0,
        extra_body={"concepts": ["Bo"]})
    assert stored.object == "chat.completion" and stored.model == MODEL
    choice = stored.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == plain["caption"]  # the same prompt, the same caption
    usage = stored.usage
    # Counted by the engine: the chat template, two vision blocks, the question.
    assert usage.prompt_tokens > 20 and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    extra = stored.model_extra
    assert extra["mode"] == "explicit"
    assert [c["name"] for c in extra["concepts"]] == ["Bo"]
    assert len(extra["concepts"][0]["box"]) == 4

    # The same reference image given inline, named in the trained "This is <Bo>." form.
    inline = alice.chat.completions.create(
        model=MODEL, temperature=0,
        messages=user(image_part(png("red")), text_part("This is <Bo>."), image_part(query)))
    assert inline.choices[0].message.content == plain["caption"]
    assert [c["name"] for c in inline.model_extra["concepts"]] == ["Bo"]
    assert inline.usage.prompt_tokens == usage.prompt_tokens

    # Stored Bo plus inline Mia, with a question: both concepts, stored first.
    both = alice.chat.completions.create(
        model=MODEL, temperature=0, max_completion_tokens=3, extra_body={"concepts": ["Bo"]},
        messages=user(image_part(png("blue")), text_part("This is Mia."), image_part(query),
                      text_part("Who is in this photo?")))
    assert [c["name"] for c in both.model_extra["concepts"]] == ["Bo", "Mia"]
    assert both.model_extra["concepts"][1]["category"] == "object"
    assert both.usage.prompt_tokens > usage.prompt_tokens
    assert both.usage.completion_tokens <= 3
    assert both.choices[0].finish_reason == (
        "length" if both.usage.completion_tokens == 3 else "stop")


def test_seeded_sampling_repeats(env):
    _, alice, _, _ = env
    kwargs = {"model": MODEL, "messages": user(image_part(png("red"))), "temperature": 1.0,
              "seed": 7, "extra_body": {"concepts": ["Bo"]}}
    first, again = (alice.chat.completions.create(**kwargs) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content


def test_retrieval_and_isolation(env):
    _, alice, bob, _ = env
    res = alice.chat.completions.create(
        model=MODEL, messages=user(image_part(png("red"))), extra_body={"top_k": 1})
    assert res.model_extra["mode"] == "retrieval"
    assert [c["name"] for c in res.model_extra["concepts"]] == ["Bo"]
    # Bob cannot use alice's concept: indistinguishable from a missing one.
    with pytest.raises(openai.NotFoundError, match="no concept named 'Bo'") as err:
        bob.chat.completions.create(model=MODEL, messages=user(image_part(png("red"))),
                                    extra_body={"concepts": ["Bo"]})
    assert err.value.body["type"] == "not_found_error"
    # With nothing to retrieve, bob gets a caption with no concepts.
    res = bob.chat.completions.create(model=MODEL, messages=user(image_part(png("red"))))
    assert res.model_extra["concepts"] == [] and res.choices[0].message.content is not None


def _sse(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines.get("event", ""), lines["data"]))
    return out


def test_streams(env):
    http, alice, _, headers = env
    query = png("red", (84, 56))
    messages = user(image_part(query))
    full = alice.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         extra_body={"concepts": ["Bo"]})
    chunks = list(alice.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"concepts": ["Bo"]}))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c["name"] for c in chunks[0].model_extra["concepts"]] == ["Bo"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    # The raw stream ends with [DONE].
    with http.stream("POST", "/v1/chat/completions", headers=headers, json={
            "model": MODEL, "messages": messages, "stream": True}) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        assert _sse(res.read().decode())[-1] == ("", "[DONE]")

    # /v1/captions?stream=true: concepts, the caption in pieces, the whole response.
    res = http.post("/v1/captions?stream=true", headers=headers, data={"concepts": "Bo"},
                    files={"image": ("q.png", query, "image/png")})
    events = _sse(res.text)
    assert events[0][0] == "concepts" and events[-1][0] == "done"
    assert json.loads(events[0][1])["concepts"][0]["name"] == "Bo"
    done = json.loads(events[-1][1])
    assert "".join(json.loads(d)["text"] for e, d in events if e == "delta") == done["caption"]
    assert done["caption"] == full.choices[0].message.content and done["width"] == 84


@pytest.mark.parametrize("kwargs, error, match", [
    ({"messages": [{"role": "user", "content": "caption my photo"}]},
     openai.BadRequestError, "no image"),
    ({"messages": user(text_part("caption"))}, openai.BadRequestError, "no image"),
    ({"messages": user({"type": "image_url",
                        "image_url": {"url": "https://example.com/a.png"}})},
     openai.BadRequestError, "remote image URLs are not fetched"),
    ({"messages": user({"type": "image_url", "image_url": {"url": "data:image/png,abc"}})},
     openai.BadRequestError, "not a base64 data URL"),
    ({"messages": user({"type": "image_url",
                        "image_url": {"url": "data:image/png;base64,@@@"}})},
     openai.BadRequestError, "malformed base64"),
    ({"messages": user(image_part(b"not an image"))}, openai.BadRequestError,
     "not a readable image"),
    ({"messages": user(*[image_part(png("red")), text_part("This is Bo.")] * 5,
                       image_part(png("red")))},
     openai.BadRequestError, "at most 5 images"),
    ({"messages": user(image_part(png("red")), image_part(png("blue")))},
     openai.BadRequestError, "must be followed by a text part 'This is <name>.'"),
    ({"messages": [{"role": "system", "content": "Be brief."},
                   *user(image_part(png("red")))]},
     openai.BadRequestError, "roles \\['system', 'user'\\]"),
    ({"messages": [{"role": "assistant", "content": [image_part(png("red"))]}]},
     openai.BadRequestError, "'assistant' is not supported"),
    ({"messages": user(image_part(png("red"))), "n": 2},
     openai.BadRequestError, "only one choice"),
    ({"messages": user(image_part(png("red"))), "logprobs": True},
     openai.BadRequestError, "logprobs: this parameter is not supported"),
    ({"messages": user(image_part(png("red"))), "max_tokens": 500},
     openai.BadRequestError, "max_tokens: must be in 1..8"),
    ({"messages": user(image_part(png("red"))), "temperature": 3},
     openai.BadRequestError, "temperature"),
    ({"messages": user(image_part(png("red"))), "extra_body": {"concepts": ["Bo"],
                                                               "top_k": 1}},
     openai.UnprocessableEntityError, "either concepts or top_k"),
    ({"messages": user(image_part(png("red"))), "model": "gpt-4o"},
     openai.NotFoundError, "'gpt-4o' is not served here"),
])
def test_bad_requests_get_clear_openai_errors(env, kwargs, error, match):
    _, alice, _, _ = env
    kwargs = {"model": MODEL, **kwargs}
    with pytest.raises(error, match=match) as err:
        alice.chat.completions.create(**kwargs)
    assert set(err.value.body) == {"message", "type", "param", "code"}


def test_malformed_body_is_a_400_in_openai_shape(env):
    http, _, _, headers = env
    res = http.post("/v1/chat/completions", headers=headers, json={"model": MODEL})
    assert res.status_code == 400
    assert res.json()["error"]["param"] == "messages"
    # The other routes keep FastAPI's error shape.
    assert "detail" in http.post("/v1/captions", headers=headers).json()
