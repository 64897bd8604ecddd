"""The HTTP API in-process (FastAPI TestClient) over a real store, the real
retriever (tiny Grounding DINO + CLIP) and the real HF captioner (tiny Qwen2.5-VL):
auth, admin, isolation between users, limits, captions, restarts."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from repic_ray.serving.api import ApiConfig, LocalBackend, build_app
from repic_ray.serving.captioner import CaptionerConfig, HFCaptioner
from repic_ray.serving.retriever import ConceptRetriever, RetrieverConfig
from repic_ray.serving.store import ConceptStore, StoreConfig
from repic_ray.serving.uploads import LimitsConfig


def png(colour: str, size: tuple[int, int] = (56, 56), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def backend(tiny_retriever_models) -> LocalBackend:
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0), *tiny_retriever_models)
    captioner = HFCaptioner(CaptionerConfig(max_new_tokens=8, model_version="tiny-test-v1"))
    return LocalBackend(retriever, captioner)


LIMITS = LimitsConfig(max_upload_bytes=200_000, max_pixels=512 * 512, max_concepts_per_user=3,
                      max_images_per_concept=2, max_concepts_per_caption=2)


def make_client(root, backend) -> tuple[TestClient, ConceptStore]:
    store = ConceptStore(StoreConfig(root=str(root)))
    app = build_app(store, backend, ApiConfig(limits=LIMITS, default_top_k=1))
    return TestClient(app), store


@pytest.fixture
def env(tmp_path, backend):
    client, store = make_client(tmp_path, backend)
    store.create_user("root", is_admin=True)
    admin = {"X-API-Key": store.create_api_key("root")}
    keys = {}
    for name in ("alice", "bob"):
        res = client.post("/v1/admin/users", json={"name": name}, headers=admin)
        assert res.status_code == 201, res.text
        keys[name] = {"X-API-Key": res.json()["api_key"]}
    return client, keys, admin


def add(client, headers, name, colour="red", category="dog", n=1):
    files = [("images", (f"{name}{i}.png", png(colour), "image/png")) for i in range(n)]
    return client.post("/v1/concepts", data={"name": name, "category": category,
                                             "info": f"{name} info"},
                       files=files, headers=headers)


def test_auth_and_admin(env):
    client, keys, admin = env
    assert client.get("/v1/concepts").status_code == 401
    assert client.get("/v1/concepts", headers={"X-API-Key": "rk_wrong"}).status_code == 401
    assert client.get("/v1/me", headers=keys["alice"]).json() == {"name": "alice",
                                                                  "is_admin": False}
    # Only admins create users and keys.
    assert client.post("/v1/admin/users", json={"name": "eve"},
                       headers=keys["alice"]).status_code == 403
    assert client.post("/v1/admin/users", json={"name": "alice"},
                       headers=admin).status_code == 409
    second = client.post("/v1/admin/users/alice/keys", headers=admin).json()["api_key"]
    assert client.get("/v1/me", headers={"X-API-Key": second}).json()["name"] == "alice"
    assert client.post("/v1/admin/users/nobody/keys", headers=admin).status_code == 404
    schema = client.get("/openapi.json").json()
    assert "/v1/captions" in schema["paths"]
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_concept_crud(env):
    client, keys, _ = env
    alice = keys["alice"]
    res = add(client, alice, "Bo", n=2)
    assert res.status_code == 201, res.text
    assert res.json()["num_images"] == 2
    assert add(client, alice, "Bo").status_code == 409
    assert [c["name"] for c in client.get("/v1/concepts", headers=alice).json()] == ["Bo"]
    got = client.get("/v1/concepts/Bo", headers=alice).json()
    assert (got["category"], got["info"]) == ("dog", "Bo info")
    img = client.get(got["image_urls"][1], headers=alice)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == png("red")
    assert client.get("/v1/concepts/Bo/images/2", headers=alice).status_code == 404
    assert client.delete("/v1/concepts/Bo", headers=alice).status_code == 204
    assert client.get("/v1/concepts/Bo", headers=alice).status_code == 404
    assert client.delete("/v1/concepts/Bo", headers=alice).status_code == 404


def test_concept_rename_keeps_the_images(env):
    client, keys, _ = env
    alice, bob = keys["alice"], keys["bob"]
    assert add(client, alice, "Bo", n=2).status_code == 201
    assert add(client, alice, "Mia", colour="blue").status_code == 201
    res = client.patch("/v1/concepts/Bo", json={"name": "Biscuit"}, headers=alice)
    assert res.status_code == 200, res.text
    assert (res.json()["name"], res.json()["num_images"], res.json()["category"]) == (
        "Biscuit", 2, "dog")
    assert client.get("/v1/concepts/Bo", headers=alice).status_code == 404
    assert client.get("/v1/concepts/Biscuit/images/1", headers=alice).content == png("red")
    # Category / info alone; the name stays.
    res = client.patch("/v1/concepts/Biscuit", json={"category": "corgi"}, headers=alice)
    assert (res.json()["name"], res.json()["category"], res.json()["info"]) == (
        "Biscuit", "corgi", "Bo info")
    # Taken name, missing concept, bad name, another user's concept: clear errors, no change.
    assert client.patch("/v1/concepts/Biscuit", json={"name": "Mia"},
                        headers=alice).status_code == 409
    assert client.patch("/v1/concepts/Nobody", json={"name": "X"},
                        headers=alice).status_code == 404
    assert client.patch("/v1/concepts/Biscuit", json={"name": "9 bad"},
                        headers=alice).status_code == 422
    assert client.patch("/v1/concepts/Biscuit", json={"name": "Stolen"},
                        headers=bob).status_code == 404
    assert sorted(c["name"] for c in client.get("/v1/concepts", headers=alice).json()) == [
        "Biscuit", "Mia"]


def test_users_cannot_reach_each_others_concepts(env):
    client, keys, _ = env
    alice, bob = keys["alice"], keys["bob"]
    assert add(client, alice, "Bo", colour="red").status_code == 201
    # List, read, read image, use (explicit and retrieval), delete: all fail for bob.
    assert client.get("/v1/concepts", headers=bob).json() == []
    assert client.get("/v1/concepts/Bo", headers=bob).status_code == 404
    assert client.get("/v1/concepts/Bo/images/0", headers=bob).status_code == 404
    res = client.post("/v1/captions", data={"concepts": "Bo"}, headers=bob,
                      files={"image": ("q.png", png("red"), "image/png")})
    assert res.status_code == 404
    res = client.post("/v1/captions", data={"top_k": "2"}, headers=bob,
                      files={"image": ("q.png", png("red"), "image/png")})
    assert res.status_code == 200 and res.json()["concepts"] == []
    assert client.delete("/v1/concepts/Bo", headers=bob).status_code == 404
    assert client.get("/v1/concepts/Bo", headers=alice).status_code == 200


def test_limits_give_clear_4xx(env):
    client, keys, _ = env
    alice = keys["alice"]

    def post(name="Ok", files=None):
        files = files or [("images", ("a.png", png("red"), "image/png"))]
        return client.post("/v1/concepts", data={"name": name}, files=files, headers=alice)

    res = post(name="1bad name")
    assert res.status_code == 422 and "must match" in res.json()["detail"]
    big = png("red", (600, 600))  # 360000 px > 512*512
    res = post(files=[("images", ("big.png", big, "image/png"))])
    assert res.status_code == 413 and "pixels" in res.json()["detail"]
    noisy = io.BytesIO()
    Image.frombytes("RGB", (300, 300), bytes(range(256)) * 1055).save(noisy, "BMP")
    res = post(files=[("images", ("x.bmp", noisy.getvalue(), "image/bmp"))])
    assert res.status_code == 413 and "bytes" in res.json()["detail"]
    res = post(files=[("images", ("a.gif", png("red", fmt="GIF"), "image/gif"))])
    assert res.status_code == 415 and "GIF" in res.json()["detail"]
    res = post(files=[("images", ("t.png", png("red")[:60], "image/png"))])
    assert res.status_code == 400 and "t.png" in res.json()["detail"]
    res = post(files=[("images", ("junk.png", b"not an image at all", "image/png"))])
    assert res.status_code == 400
    res = post(files=[("images", (f"{i}.png", png("red"), "image/png")) for i in range(3)])
    assert res.status_code == 422 and "images" in res.json()["detail"]
    for name in ("A", "B", "C"):
        assert post(name=name).status_code == 201
    res = post(name="D")
    assert res.status_code == 409 and "limit" in res.json()["detail"]
    q = {"image": ("q.png", png("red"), "image/png")}
    res = client.post("/v1/captions", data={"concepts": "A,B,C"}, files=q, headers=alice)
    assert res.status_code == 422 and "at most 2" in res.json()["detail"]
    res = client.post("/v1/captions", data={"top_k": "3"}, files=q, headers=alice)
    assert res.status_code == 422
    res = client.post("/v1/captions", headers=alice,
                      files={"image": ("q.png", png("red")[:80], "image/png")})
    assert res.status_code == 400
    # The replica is still healthy after the corrupt uploads.
    assert client.post("/v1/captions", files=q, headers=alice).status_code == 200


def test_caption_explicit_and_retrieval(env):
    client, keys, _ = env
    alice = keys["alice"]
    assert add(client, alice, "Bo", colour="red", category="dog").status_code == 201
    assert add(client, alice, "Mo", colour="blue", category="cat").status_code == 201
    query = {"image": ("q.png", png("blue", (96, 80)), "image/png")}
    res = client.post("/v1/captions", data={"concepts": "Bo,Mo"}, files=query, headers=alice)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["mode"] == "explicit" and body["model"] == "tiny-test-v1"
    assert [c["name"] for c in body["concepts"]] == ["Bo", "Mo"]
    assert isinstance(body["caption"], str) and (body["width"], body["height"]) == (96, 80)
    for c in body["concepts"]:
        x1, y1, x2, y2 = c["box"]
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 80
    # Retrieval: the blue query is identical in content to Mo's reference, so CLIP
    # scores Mo's whole-image crop at cosine 1 and Mo ranks first.
    query = {"image": ("q.png", png("blue"), "image/png")}
    res = client.post("/v1/captions", data={"top_k": "1"}, files=query, headers=alice)
    body = res.json()
    assert body["mode"] == "retrieval"
    assert [(c["name"], c["category"]) for c in body["concepts"]] == [("Mo", "cat")]
    assert body["concepts"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_state_survives_app_restart(tmp_path, backend):
    client, store = make_client(tmp_path, backend)
    store.create_user("alice")
    key = {"X-API-Key": store.create_api_key("alice")}
    assert add(client, key, "Bo").status_code == 201
    store.close()
    client, _ = make_client(tmp_path, backend)  # a new store and app on the same root
    assert [c["name"] for c in client.get("/v1/concepts", headers=key).json()] == ["Bo"]
    assert client.get("/v1/concepts/Bo/images/0", headers=key).content == png("red")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one empty IDAT: ~60 bytes that a
    naive decoder would inflate into width*height*3 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_413_before_decoding(env):
    client, keys, _ = env
    # 30000 x 30000 = 9e8 pixels: over twice PIL's MAX_IMAGE_PIXELS, so PIL refuses to
    # even open it; the answer is still "too many pixels", not "unreadable".
    bomb = _png_header_only(30000, 30000)
    res = client.post("/v1/concepts", data={"name": "Bomb"}, headers=keys["alice"],
                      files=[("images", ("bomb.png", bomb, "image/png"))])
    assert res.status_code == 413 and "pixels" in res.json()["detail"], res.text
    res = client.post("/v1/captions", headers=keys["alice"],
                      files={"image": ("bomb.png", bomb, "image/png")})
    assert res.status_code == 413, res.text
    # Over this API's limit (512*512) but under PIL's: refused from the header as well.
    res = client.post("/v1/captions", headers=keys["alice"],
                      files={"image": ("wide.png", _png_header_only(4000, 4000), "image/png")})
    assert res.status_code == 413 and "16000000 pixels" in res.json()["detail"], res.text


def test_readiness_and_caption_timeout(tmp_path, backend):
    store = ConceptStore(StoreConfig(root=str(tmp_path)))
    store.create_user("u")
    key = {"X-API-Key": store.create_api_key("u")}
    # A caption budget no real generation meets: a clear 504, and the API keeps serving.
    client = TestClient(build_app(store, backend, ApiConfig(limits=LIMITS, default_top_k=1,
                                                            caption_timeout_s=0.001)))
    assert client.get("/readyz").json() == {"ready": True}
    res = client.post("/v1/captions", headers=key,
                      files={"image": ("q.png", png("red"), "image/png")})
    assert res.status_code == 504 and "caption_timeout_s" in res.json()["detail"], res.text
    assert client.get("/v1/me", headers=key).status_code == 200


def test_request_body_limit_is_enforced_while_streaming(tmp_path, backend):
    import asyncio

    store = ConceptStore(StoreConfig(root=str(tmp_path)))
    store.create_user("u")
    key = store.create_api_key("u").encode()
    limits = LimitsConfig(max_upload_bytes=200_000, max_images_per_concept=1,
                          max_request_bytes=300_000)
    app = build_app(store, backend, ApiConfig(limits=limits, default_top_k=1))
    # Declared too large: refused before a byte of the body is read.
    client = TestClient(app)
    res = client.post("/v1/captions", headers={"X-API-Key": key.decode(),
                                               "Content-Length": "50000000"}, content=b"")
    assert res.status_code == 413 and "50000000 bytes" in res.json()["detail"], res.text

    # No Content-Length (chunked): the ASGI app pulls 64 KiB chunks of an endless but
    # well-formed multipart upload; it must answer 413 after the first chunk past the
    # limit, not read on.
    boundary = b"b0undary"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="images"; '
            b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        chunk = head + b"x" * (65536 - len(head)) if pulled == 1 else b"x" * 65536
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/concepts", "raw_path": b"/v1/concepts",
             "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("c", 1),
             "headers": [(b"x-api-key", key),
                         (b"content-type", b"multipart/form-data; boundary=" + boundary)]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    assert sent[0]["status"] == 413
    assert pulled == 300_000 // 65536 + 1  # 5 chunks: the 5th crosses 300000 bytes


def test_a_model_failing_mid_request_is_a_clear_503_and_loses_nothing(tmp_path, tiny_retriever_models):
    retriever = ConceptRetriever(RetrieverConfig(box_threshold=0.0), *tiny_retriever_models)
    captioner = HFCaptioner(CaptionerConfig(max_new_tokens=2, model_version="tiny-503"))
    client, store = make_client(tmp_path, LocalBackend(retriever, captioner))
    store.create_user("u")
    key = {"X-API-Key": store.create_api_key("u")}
    assert add(client, key, "Bo").status_code == 201
    q = {"image": ("q.png", png("red"), "image/png")}
    model, captioner.model = captioner.model, None  # the engine is gone (a replica shutting down)
    res = client.post("/v1/captions", data={"concepts": "Bo"}, files=q, headers=key)
    assert res.status_code == 503 and "try again" in res.json()["detail"], res.text
    assert res.headers["retry-after"] == "5"
    captioner.model = model  # back: the retry succeeds and the concept is intact
    res = client.post("/v1/captions", data={"concepts": "Bo"}, files=q, headers=key)
    assert res.status_code == 200 and res.json()["concepts"][0]["name"] == "Bo"
