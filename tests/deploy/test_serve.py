"""The captioning service on a real Ray Serve deployment (real vLLM async engine,
tiny models), over real HTTP on loopback; and the web page in headless Chromium.

One Ray cluster for the module (`ray.init(address="local", num_cpus=2)`), Serve
bound to 127.0.0.1 on a free port, shut down at the end (never `ray stop`)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from deploy.cli import read_serve_yaml
from repic_ray.config import from_dict
from repic_ray.ports import free_port
from repic_ray.serving.config import ServeConfig
from repic_ray.serving.store import ConceptStore, StoreConfig

REPO = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO / "deploy" / "serve.yaml"


def png(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_serve_yaml_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    args, deployments, http = read_serve_yaml(str(SERVE_YAML))
    cfg = from_dict(ServeConfig, args)
    assert cfg.engine == "vllm" and cfg.captioner.checkpoint == "tiny:qwen2.5-vl"
    assert set(deployments) == {"Api", "Retriever", "Captioner"}
    assert all("autoscaling_config" in d for d in deployments.values())
    assert http["host"] == "127.0.0.1"
    # The import_path of the YAML builds the application from its args.
    from ray.serve import Application

    from deploy.serve_app import app_builder

    assert isinstance(app_builder(args), Application)
    with pytest.raises(ValueError, match="engine"):
        app_builder({**args, "engine": "tensorrt"})


def _config(root: Path, engine: str = "vllm") -> ServeConfig:
    return from_dict(ServeConfig, {
        "engine": engine,
        "store": {"root": str(root)},
        "captioner": {"checkpoint": "tiny:qwen2.5-vl", "max_new_tokens": 12,
                      "max_model_len": 2048, "model_version": f"tiny-{engine}"},
        "retriever": {"box_threshold": 0.0},
        "api": {"default_top_k": 1},
    })


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base_url, store_root, admin_headers, deploy(config)) of a live Serve app."""
    import ray
    from ray import serve

    from deploy.serve_app import application

    root = tmp_path_factory.mktemp("serve-store")
    port = free_port()
    ray.init(address="local", include_dashboard=False, num_cpus=2,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(cfg: ServeConfig) -> None:
        serve.run(application(cfg), name="repic", route_prefix="/")

    deploy(_config(root))
    store = ConceptStore(StoreConfig(root=str(root)))
    store.create_user("root", is_admin=True)
    admin = {"X-API-Key": store.create_api_key("root")}
    store.close()
    try:
        yield f"http://127.0.0.1:{port}", root, admin, deploy
    finally:
        serve.shutdown()
        ray.shutdown()


def _user(base: str, admin: dict, name: str) -> dict:
    res = httpx.post(f"{base}/v1/admin/users", json={"name": name}, headers=admin)
    assert res.status_code == 201, res.text
    return {"X-API-Key": res.json()["api_key"]}


def _add(base: str, headers: dict, name: str, colour: str, category: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/concepts", headers=headers,
                      data={"name": name, "category": category},
                      files=[("images", (f"{name}.png", png(colour), "image/png"))])


@pytest.mark.slow
def test_http_concepts_captions_and_isolation(service):
    base, _, admin, _ = service
    alice, bob = _user(base, admin, "alice"), _user(base, admin, "bob")
    assert httpx.get(f"{base}/v1/concepts").status_code == 401
    assert _add(base, alice, "Bo", "red", "dog").status_code == 201
    assert _add(base, alice, "Mo", "blue", "cat").status_code == 201
    q = {"image": ("q.png", png("blue"), "image/png")}
    res = httpx.post(f"{base}/v1/captions", headers=alice, data={"concepts": "Bo,Mo"},
                     files=q, timeout=120)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["model"] == "tiny-vllm" and body["mode"] == "explicit"
    assert [c["name"] for c in body["concepts"]] == ["Bo", "Mo"]
    assert all(len(c["box"]) == 4 for c in body["concepts"])
    assert isinstance(body["caption"], str)
    # Retrieval through the Retriever deployment: the blue query equals Mo's reference.
    res = httpx.post(f"{base}/v1/captions", headers=alice, data={"top_k": "1"},
                     files=q, timeout=120)
    assert [c["name"] for c in res.json()["concepts"]] == ["Mo"]
    # Bob sees, reads, uses and deletes nothing of alice's.
    assert httpx.get(f"{base}/v1/concepts", headers=bob).json() == []
    assert httpx.get(f"{base}/v1/concepts/Bo/images/0", headers=bob).status_code == 404
    assert httpx.post(f"{base}/v1/captions", headers=bob, data={"concepts": "Bo"},
                      files=q, timeout=120).status_code == 404
    assert httpx.delete(f"{base}/v1/concepts/Bo", headers=bob).status_code == 404
    # A corrupt upload is a 400 and the replica keeps serving.
    bad = httpx.post(f"{base}/v1/captions", headers=alice,
                     files={"image": ("bad.png", png("red")[:70], "image/png")})
    assert bad.status_code == 400
    assert httpx.get(f"{base}/v1/concepts", headers=alice).status_code == 200
    assert "/v1/concepts" in httpx.get(f"{base}/openapi.json").json()["paths"]


FRESH_NAMES = ("Pixel", "Biscuit", "Momo", "Juniper", "Waffles", "Clover", "Sprout", "Nugget",
               "Pebble", "Marzipan")


@pytest.mark.slow
def test_retrieval_mode_finds_a_new_users_concepts_under_their_names(service, tmp_path):
    """A world drawn with a seed no model was trained on, its 10 concepts registered
    through the API under names of the user's own; retrieval mode (detector crops +
    CLIP, top_k = the number of concepts in the image) picks the right concepts for 20
    query images."""
    from repic_ray.data.formats import load_database, load_samples
    from repic_ray.data.synthetic import generate_world

    base, _, admin, _ = service
    erin = _user(base, admin, "fiona")
    world = generate_world(tmp_path / "world", seed=90_001, num_concepts=10, num_train=0,
                           num_sft=0, num_sft_aux=0, num_eval_per_k=10, max_concepts_per_image=2)
    fresh = {}
    for concept, name in zip(load_database(world.database), FRESH_NAMES):
        fresh[concept.name] = name
        image = Path(concept.images[0])
        res = httpx.post(f"{base}/v1/concepts", headers=erin,
                         data={"name": name, "category": concept.category},
                         files=[("images", (image.name, image.read_bytes(), "image/png"))])
        assert res.status_code == 201, res.text
    right = slots = 0
    for k in (1, 2):
        for sample in load_samples(world.eval[k]):
            query = Path(sample.query_image)
            res = httpx.post(f"{base}/v1/captions", headers=erin, data={"top_k": str(k)},
                             files={"image": (query.name, query.read_bytes(), "image/png")},
                             timeout=120)
            assert res.status_code == 200, res.text
            assert res.json()["mode"] == "retrieval"
            chosen = {c["name"] for c in res.json()["concepts"]}
            right += len(chosen & {fresh[n] for n in sample.concepts})
            slots += k
    assert slots == 30 and right / slots >= 0.9, f"{right}/{slots} right"


@pytest.mark.slow
def test_concurrent_captions_are_batched_without_errors(service):
    base, _, admin, _ = service
    carol = _user(base, admin, "carol")
    assert _add(base, carol, "Bo", "red", "dog").status_code == 201

    async def one(client: httpx.AsyncClient, colour: str) -> httpx.Response:
        return await client.post(f"{base}/v1/captions", headers=carol,
                                 data={"concepts": "Bo"},
                                 files={"image": ("q.png", png(colour), "image/png")})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[one(client, c) for c in
                                          ["red", "green", "blue", "yellow"] * 2])

    results = asyncio.run(burst())
    assert [r.status_code for r in results] == [200] * 8
    # Greedy decoding: the same query gives the same caption however it was batched.
    captions = [r.json()["caption"] for r in results]
    assert captions[:4] == captions[4:]


@pytest.mark.slow
def test_captioner_replica_killed_mid_request(service):
    """Requests in flight when the Captioner replica dies get 200 (retried) or a clear
    503, never a dropped connection or 500; nothing stored is lost, and the service is
    ready and captioning again once Serve has replaced the replica."""
    import threading
    import time

    import ray

    base, _, admin, _ = service
    dave = _user(base, admin, "dave")
    assert _add(base, dave, "Bo", "red", "dog").status_code == 201
    assert httpx.get(f"{base}/readyz", timeout=60).status_code == 200
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "Captioner" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    q = {"image": ("q.png", png("red"), "image/png")}
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(f"{base}/v1/captions", headers=dave, data={"concepts": "Bo"},
                                  files=q, timeout=300))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    for t in threads:
        t.join()
    assert len(results) == 4
    for res in results:
        assert res.status_code in (200, 503), res.text
        if res.status_code == 503:
            assert "try again" in res.json()["detail"]
    assert [c["name"] for c in httpx.get(f"{base}/v1/concepts", headers=dave).json()] == ["Bo"]
    deadline = time.monotonic() + 400
    while httpx.get(f"{base}/readyz", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "the Captioner replica was not replaced"
        time.sleep(2)
    res = httpx.post(f"{base}/v1/captions", headers=dave, data={"concepts": "Bo"}, files=q, timeout=300)
    assert res.status_code == 200, res.text


@pytest.mark.slow
def test_web_page_register_and_caption(service, tmp_path, chromium):
    base, _, admin, _ = service
    from playwright.sync_api import sync_playwright

    key = _user(base, admin, "dana")["X-API-Key"]
    ref, query = tmp_path / "bo.png", tmp_path / "query.png"
    ref.write_bytes(png("purple"))
    query.write_bytes(png("purple", (120, 90)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(base + "/")
        page.fill("#api-key", key)
        page.click("#save-key")
        page.wait_for_selector("#whoami:has-text('dana')")
        page.fill("#concept-name", "Bo")
        page.fill("#concept-category", "dog")
        page.set_input_files("#concept-images", str(ref))
        page.click("#register")
        page.wait_for_selector("#concept-list li[data-name='Bo']")
        page.set_input_files("#caption-image", str(query))
        page.fill("#caption-topk", "1")
        page.click("#caption-btn")
        page.wait_for_selector("#status:has-text('done')", timeout=120_000)
        assert page.text_content("#error") == ""
        assert "tiny-vllm" in page.text_content("#caption-model")
        boxes = page.eval_on_selector("#canvas", "c => JSON.parse(c.dataset.boxes)")
        assert [b["name"] for b in boxes] == ["Bo"]
        size = page.eval_on_selector("#canvas", "c => [c.width, c.height]")
        assert size == [120, 90]
        # Bad input surfaces as a readable error, not a crash.
        page.fill("#concept-name", "9 bad")
        page.click("#register")
        page.wait_for_selector("#error:has-text('422')")
        browser.close()


def _data_url(data: bytes) -> dict:
    import base64

    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


@pytest.mark.slow
def test_openai_client_and_streaming(service):
    """The `openai` client against the Serve app (vLLM engine; this test must run before
    the redeploy to HF below): stored and inline concepts, a stream through the
    Captioner's streaming handle, isolation, a refused input; /v1/captions?stream=true."""
    import json

    import openai

    base, _, admin, _ = service
    keys = {n: _user(base, admin, n)["X-API-Key"] for n in ("fay", "gus")}
    assert _add(base, {"X-API-Key": keys["fay"]}, "Bo", "red", "dog").status_code == 201
    fay, gus = (openai.OpenAI(base_url=f"{base}/v1", api_key=keys[n], max_retries=0,
                              timeout=120) for n in ("fay", "gus"))
    assert [m.id for m in fay.models.list()] == ["tiny-vllm"]
    query = png("red", (84, 56))
    stored = fay.chat.completions.create(model="tiny-vllm", messages=[
        {"role": "user", "content": [_data_url(query)]}], temperature=0,
        extra_body={"concepts": ["Bo"]})
    caption = stored.choices[0].message.content
    assert caption and stored.usage.completion_tokens >= 1
    assert stored.usage.total_tokens == (stored.usage.prompt_tokens
                                         + stored.usage.completion_tokens)
    assert [c["name"] for c in stored.model_extra["concepts"]] == ["Bo"]
    # Greedy: the streamed pieces join to the same caption.
    chunks = list(fay.chat.completions.create(model="tiny-vllm", messages=[
        {"role": "user", "content": [_data_url(query)]}], temperature=0, stream=True,
        extra_body={"concepts": ["Bo"]}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == caption
    assert chunks[-1].choices[0].finish_reason == stored.choices[0].finish_reason
    # The same reference given inline: the same prompt, the same caption.
    inline = gus.chat.completions.create(model="tiny-vllm", temperature=0, messages=[
        {"role": "user", "content": [_data_url(png("red")), {"type": "text",
                                     "text": "This is Bo."}, _data_url(query)]}])
    assert inline.choices[0].message.content == caption
    assert inline.usage.prompt_tokens == stored.usage.prompt_tokens
    # gus cannot name fay's concept; a remote URL is refused with OpenAI's error body.
    with pytest.raises(openai.NotFoundError, match="no concept named 'Bo'"):
        gus.chat.completions.create(model="tiny-vllm", extra_body={"concepts": ["Bo"]},
                                    messages=[{"role": "user", "content": [_data_url(query)]}])
    with pytest.raises(openai.BadRequestError, match="remote image URLs") as err:
        fay.chat.completions.create(model="tiny-vllm", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}])
    assert err.value.body["type"] == "invalid_request_error"

    # /v1/captions?stream=true: concepts first, caption pieces, the whole response.
    events = []
    with httpx.stream("POST", f"{base}/v1/captions?stream=true",
                      headers={"X-API-Key": keys["fay"]}, data={"concepts": "Bo"},
                      files={"image": ("q.png", query, "image/png")}, timeout=120) as res:
        assert res.status_code == 200
        for line in res.iter_lines():
            if line.startswith("event: "):
                events.append([line[7:]])
            elif line.startswith("data: "):
                events[-1].append(json.loads(line[6:]))
    kinds = [e for e, _ in events]
    assert kinds[0] == "concepts" and kinds[-1] == "done" and kinds.count("delta") > 1
    assert "".join(d["text"] for e, d in events if e == "delta") == caption
    assert events[-1][1]["caption"] == caption


@pytest.mark.slow
def test_data_survives_redeploying_the_app(service):
    from ray import serve

    base, root, admin, deploy = service
    erin = _user(base, admin, "erin")
    assert _add(base, erin, "Bo", "red", "dog").status_code == 201
    serve.delete("repic")
    assert httpx.get(f"{base}/healthz").status_code == 404
    # A fresh application (the HF engine, to keep the test short) on the same store.
    deploy(_config(root, engine="hf"))
    assert [c["name"] for c in httpx.get(f"{base}/v1/concepts", headers=erin).json()] == ["Bo"]
    res = httpx.post(f"{base}/v1/captions", headers=erin, data={"concepts": "Bo"},
                     files={"image": ("q.png", png("red"), "image/png")}, timeout=120)
    assert res.status_code == 200 and res.json()["model"] == "tiny-hf"
