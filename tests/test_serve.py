"""`vitlab serve`: every endpoint, every kind of bad input (each a one-line 4xx, and the server serves the next
request), micro-batching of concurrent requests, inference off the event loop, a failing model, the API key (a
non-ASCII one too), the Host check against DNS rebinding, slow clients on real sockets, and an OpenAPI schema
that documents every error the server answers with."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from conftest import tiny_model

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from vitlab.predict import TorchClassifier, load_classifier, predict_files
from vitlab.serve import MicroBatcher, ServeConfig, create_app, load_app
from vitlab.serve.batching import QueueFull
from vitlab.serve.guard import Guard, host_name
from vitlab.serve.server import build_server


def png(size=(28, 28), mode="L", seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    c = 1 if mode == "L" else 3
    pixels = torch.randint(0, 256, (size[1], size[0], c), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width=60_000, height=60_000) -> bytes:
    """A valid PNG header declaring width x height pixels, with a few bytes of data: a decompression bomb's shape
    (decoding it would need 3.6 GB) in a 100-byte file."""
    data = bytearray(png((1, 1)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def upload(data: bytes, name="x.png", ctype="image/png") -> dict:
    return {"files": {"file": (name, data, ctype)}}


def assert_one_line_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    return detail


def local_client(app, **kwargs) -> TestClient:
    """A client that names the server as a browser on this machine does (``Host: 127.0.0.1:8000``)."""
    return TestClient(app, base_url="http://127.0.0.1:8000", **kwargs)


@pytest.fixture(scope="module")
def client(digits_checkpoint):
    with local_client(load_app(str(digits_checkpoint))) as c:
        yield c


def test_health_model_page_and_docs(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["name"] == "vit_tiny_patch7_28" and info["runtime"] == "torch"
    assert info["classes"] == [str(i) for i in range(10)] and info["input_size"] == [1, 28, 28]
    assert info["explain"] is True and len(info["mean"]) == 1
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # no external assets: nothing is loaded from another origin
    assert "<script src" not in page.text and "<link" not in page.text and "://" not in page.text
    assert 'id="file"' in page.text and 'id="overlay"' in page.text and 'id="predictions"' in page.text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/health"} <= set(paths)


def test_predict_matches_the_cli_prediction(client, digits_checkpoint, tmp_path) -> None:
    data = png(seed=1)
    (tmp_path / "a.png").write_bytes(data)
    r = client.post("/v1/predict?top_k=3", **upload(data))
    assert r.status_code == 200, r.text
    top = r.json()["top"]
    assert len(top) == 3 and r.json()["model"] == "vit_tiny_patch7_28"
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    expected = predict_files(digits_checkpoint, [str(tmp_path / "a.png")], top_k=3)[0]["top"]
    assert [t["class"] for t in top] == [t["class"] for t in expected]
    assert probs == pytest.approx([t["probability"] for t in expected], abs=1e-5)
    # more classes asked for than there are: all of them; any image size and mode is resized and converted
    r = client.post("/v1/predict?top_k=50", **upload(png((300, 200), mode="RGB"), name="photo.png"))
    assert r.status_code == 200 and len(r.json()["top"]) == 10
    assert sum(t["probability"] for t in r.json()["top"]) == pytest.approx(1, abs=1e-4)
    # a JPEG sent as application/octet-stream (curl's default for an unknown extension)
    buf = io.BytesIO()
    Image.open(io.BytesIO(png((64, 64), "RGB"))).save(buf, format="JPEG")
    assert client.post("/v1/predict", **upload(buf.getvalue(), "x.bin", "application/octet-stream")).status_code == 200


def test_explain_returns_the_rollout_overlay(client) -> None:
    r = client.post("/v1/explain", **upload(png(seed=2)))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(r.content))
    assert overlay.size == (224, 224) and overlay.mode == "RGB"  # 28 x 28 enlarged 8x to be seen
    assert r.headers["x-vitlab-class"] in [str(i) for i in range(10)]
    assert 0 < float(r.headers["x-vitlab-probability"]) <= 1
    # the heat map varies with the relevance: not one flat colour
    assert len(overlay.getcolors(maxcolors=1 << 16)) > 10


@pytest.mark.parametrize(
    ("name", "reason"),
    [("resnet18_28", "no attention"), ("cvt_7_28", "square")],
)
def test_a_model_without_global_attention_answers_explain_with_422(name, reason) -> None:
    model = tiny_model(name).eval()
    model.pretrained_cfg = {}
    with local_client(create_app(TorchClassifier(model))) as c:
        info = c.get("/v1/model").json()
        assert info["explain"] is False and reason in info["explain_note"]
        detail = assert_one_line_error(c.post("/v1/explain", **upload(png())), 422)
        assert reason in detail
        assert c.post("/v1/predict", **upload(png())).status_code == 200


BAD_UPLOADS = {
    # name: (request kwargs, status, words in the message)
    "not an image": (upload(b"%PDF-1.4 this is not a picture"), 415, "not an image"),
    "truncated PNG": (upload(png((64, 64))[:120]), 400, "truncated"),
    "decompression bomb": (upload(bomb_png()), 413, "megapixels"),
    "over the pixel limit": (upload(bomb_png(9000, 9000)), 413, "81.0 megapixels"),
    "empty file": (upload(b""), 400, "empty"),
    "text part": (upload(png(), "x.txt", "text/plain"), 415, "text/plain"),
    "JSON body": ({"content": b'{"image": "x"}', "headers": {"content-type": "application/json"}}, 415, "multipart"),
    "raw image body": ({"content": png(), "headers": {"content-type": "image/png"}}, 415, "multipart"),
    "no content type": ({"content": png()}, 415, "missing"),
    "empty body": ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "empty"),
    "no file field": ({"files": {"image": ("x.png", png(), "image/png")}}, 400, "'file'"),
    "broken multipart": ({"content": b"--x\r\nnonsense", "headers": {"content-type": "multipart/form-data"}}, 400, ""),
    "bad top_k": ({**upload(png()), "params": {"top_k": 0}}, 422, "top_k"),
}


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/explain"])
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_input_is_a_one_line_4xx_and_the_server_keeps_serving(client, case, endpoint) -> None:
    kwargs, status, words = BAD_UPLOADS[case]
    if case == "bad top_k" and endpoint == "/v1/explain":
        return  # explain has no top_k
    detail = assert_one_line_error(client.post(endpoint, **kwargs), status)
    assert words in detail
    assert client.post("/v1/predict", **upload(png())).status_code == 200


def test_uploads_over_the_size_limit_are_refused_before_they_are_read(digits_checkpoint) -> None:
    app = load_app(str(digits_checkpoint), config=ServeConfig(max_upload_bytes=2000))
    with local_client(app) as c:
        big = png((128, 128))  # ~16 kB of noise
        detail = assert_one_line_error(c.post("/v1/predict", **upload(big)), 413)
        assert "2000" in detail

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(20):
                yield b"-" * 500

        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=-"})
        assert_one_line_error(r, 413)
        assert c.post("/v1/predict", **upload(png())).status_code == 200
        # the image's pixel limit is separate from the byte limit
    app = load_app(str(digits_checkpoint), config=ServeConfig(max_pixels=50 * 50))
    with local_client(app) as c:
        assert "megapixels" in assert_one_line_error(c.post("/v1/predict", **upload(png((51, 50)))), 413)
        assert c.post("/v1/predict", **upload(png((50, 50)))).status_code == 200


def test_the_guard_holds_at_most_the_limit_of_an_endless_body() -> None:
    """Memory stays bounded: an endless body is read only up to the limit, then refused."""
    reads, sent = 0, []

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the app saw an oversized body")

    headers = [(b"content-type", b"multipart/form-data")]
    scope = {"type": "http", "path": "/v1/predict", "method": "POST", "headers": headers}
    asyncio.run(Guard(app, api_key=None, max_bytes=10_000, allowed_hosts=("*",))(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == 11


class _Counting:
    """A classifier wrapper that records every model call's batch size (and can be slow, or fail)."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self.inner, self.delay, self.batches, self.fail_next = inner, delay, [], False
        for k in ("model_name", "class_names", "input_size", "mean", "std"):
            setattr(self, k, getattr(inner, k))

    def logits(self, x):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated failure inside the model")
        time.sleep(self.delay)
        self.batches.append(len(x))
        return self.inner.logits(x)


@pytest.mark.parametrize("max_batch", [8, 1])
def test_concurrent_requests_are_micro_batched(digits_checkpoint, max_batch) -> None:
    inner = load_classifier(digits_checkpoint)
    counting = _Counting(inner)
    app = create_app(counting, config=ServeConfig(max_batch=max_batch, max_wait_ms=300))
    images = [png(seed=s) for s in range(8)]
    with local_client(app) as c:
        counting.batches.clear()  # the warm-up call
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda d: c.post("/v1/predict?top_k=10", **upload(d)).json(), images))
        stats = c.get("/v1/model").json()["batching"]
    assert sum(counting.batches) == 8 and stats["inputs"] == 8
    if max_batch == 1:
        assert counting.batches == [1] * 8
    else:
        assert len(counting.batches) < 8 and max(counting.batches) > 1, counting.batches
        assert stats["largest_batch"] == max(counting.batches)
    # each request gets its own image's answer, whatever batch it rode in
    for data, result in zip(images, results):
        x = torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(data))))[None, None]
        from vitlab.predict import preprocess

        probs = inner.logits(preprocess(x, inner)).softmax(-1)[0]
        got = {t["class"]: t["probability"] for t in result["top"]}
        assert [got[str(i)] for i in range(10)] == pytest.approx(probs.tolist(), abs=1e-5)


def test_inference_runs_off_the_event_loop(digits_checkpoint) -> None:
    slow = _Counting(load_classifier(digits_checkpoint), delay=1.5)
    with local_client(create_app(slow)) as c:
        t = threading.Thread(target=lambda: c.post("/v1/predict", **upload(png())))
        t.start()
        time.sleep(0.3)  # the model call has started
        start = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert time.perf_counter() - start < 0.8  # answered while the model computes
        t.join()


def test_a_model_that_raises_is_a_500_that_is_logged_and_the_next_request_is_served(digits_checkpoint, caplog) -> None:
    failing = _Counting(load_classifier(digits_checkpoint))
    with local_client(create_app(failing)) as c:
        failing.fail_next = True
        with caplog.at_level(logging.ERROR, logger="vitlab.serve"):
            detail = assert_one_line_error(c.post("/v1/predict", **upload(png())), 500)
        assert "simulated failure" in detail
        assert any("simulated failure" in (r.exc_text or "") for r in caplog.records)
        assert c.post("/v1/predict", **upload(png())).status_code == 200
        assert c.get("/v1/model").json()["batching"]["errors"] == 1


def test_a_full_queue_is_refused() -> None:
    async def main():
        gate = threading.Event()
        batcher = MicroBatcher(lambda x: (gate.wait(5), x)[1], max_batch=1, max_queue=1)
        first = asyncio.ensure_future(batcher.submit(torch.zeros(1)))  # taken by the collector, blocks the model
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(batcher.submit(torch.zeros(1)))  # waits in the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(torch.zeros(1))
        gate.set()
        await asyncio.gather(first, second)
        await batcher.aclose()

    asyncio.run(main())


def test_api_key(digits_checkpoint) -> None:
    with local_client(load_app(str(digits_checkpoint), config=ServeConfig(api_key="s3cret"))) as c:
        for path in ("/v1/model",):
            assert "API key" in assert_one_line_error(c.get(path), 401)
            assert c.get(path).headers["www-authenticate"] == "Bearer"
        assert_one_line_error(c.post("/v1/predict", **upload(png())), 401)
        assert_one_line_error(c.post("/v1/explain", **upload(png())), 401)
        assert "wrong" in assert_one_line_error(c.get("/v1/model", headers={"Authorization": "Bearer nope"}), 403)
        assert_one_line_error(c.post("/v1/predict", headers={"X-API-Key": "nope"}, **upload(png())), 403)
        # the key is checked before the body is read: an unauthenticated client cannot make the server parse
        assert_one_line_error(c.post("/v1/predict", content=b"x" * 100, headers={"content-type": "text/plain"}), 401)
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/v1/predict", headers={"X-API-Key": "s3cret"}, **upload(png())).status_code == 200
        assert c.post("/v1/explain", headers={"authorization": "bearer s3cret"}, **upload(png())).status_code == 200
        assert c.get("/health").status_code == 200  # liveness probes need no key
        # pages a browser navigates to ask for the key as an HTTP Basic password (any user name)
        for path in ("/", "/docs", "/openapi.json"):
            r = c.get(path)
            assert_one_line_error(r, 401)
            assert r.headers["www-authenticate"].startswith("Basic")
            assert c.get(path, auth=("anyone", "nope")).status_code == 401  # so that the browser asks again
            assert c.get(path, auth=("anyone", "s3cret")).status_code == 200
        assert c.post("/v1/predict", auth=("", "s3cret"), **upload(png())).status_code == 200  # what the page sends
        schema = c.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
        assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])


def test_serve_cli_reads_the_key_from_the_environment_and_binds_to_loopback(monkeypatch, digits_checkpoint) -> None:
    from click.testing import CliRunner

    import vitlab.serve
    from vitlab.cli import cli

    seen = {}
    monkeypatch.setattr(vitlab.serve, "run_server", lambda checkpoint, **kw: seen.update(kw, checkpoint=checkpoint))
    r = CliRunner().invoke(cli, ["serve", str(digits_checkpoint)], env={"VITLAB_API_KEY": "from-env"})
    assert r.exit_code == 0, r.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["runtime"] == "torch"
    assert seen["config"].api_key == "from-env"
    r = CliRunner().invoke(cli, ["serve", str(digits_checkpoint), "--api-key", "flag", "--max-batch", "4"], env={})
    assert seen["config"].api_key == "flag" and seen["config"].max_batch == 4
    assert json.dumps(seen["config"].max_upload_bytes) == str(10 * 2**20)


# --- the Host check (DNS rebinding) -------------------------------------------------------------------------------
def tiny_app(name: str = "vit_tiny_patch4_28", **config) -> object:
    model = tiny_model(name).eval()
    model.pretrained_cfg = {}
    return create_app(TorchClassifier(model), config=ServeConfig(**config))


def test_host_names_are_read_without_their_port() -> None:
    assert host_name("LocalHost:8000") == "localhost" and host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1" and host_name("localhost.") == "localhost"
    assert host_name("evil.example:80") == "evil.example"


def test_a_keyless_server_answers_only_to_its_loopback_names() -> None:
    """A page on evil.example re-pointed at 127.0.0.1 sends Host: evil.example; a keyless server refuses it."""
    with TestClient(tiny_app(), base_url="http://evil.example:8000") as c:
        for path in ("/health", "/v1/model", "/", "/docs", "/openapi.json"):
            assert "evil.example" in assert_one_line_error(c.get(path), 421)
        assert_one_line_error(c.post("/v1/predict", **upload(png())), 421)
        assert_one_line_error(c.post("/v1/explain", **upload(png())), 421)
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"):
            assert c.get("/v1/model", headers={"Host": host}).status_code == 200, host
        assert c.post("/v1/predict", headers={"Host": "localhost:8000"}, **upload(png())).status_code == 200
    # named hosts: those and no others (loopback names included only when listed)
    with TestClient(tiny_app(allowed_hosts=("vitlab.lan", "*.example.org")), base_url="http://vitlab.lan:80") as c:
        assert c.get("/v1/model").status_code == 200
        assert c.get("/v1/model", headers={"Host": "gpu.example.org:8000"}).status_code == 200
        assert_one_line_error(c.get("/v1/model", headers={"Host": "example.org.evil.example"}), 421)
        assert_one_line_error(c.get("/v1/model", headers={"Host": "localhost:8000"}), 421)
    # with an API key any Host may ask (a rebinding page cannot know the key), and the key is still checked
    with TestClient(tiny_app(api_key="k"), base_url="http://evil.example:8000") as c:
        assert_one_line_error(c.get("/v1/model"), 401)
        assert c.get("/v1/model", headers={"X-API-Key": "k"}).status_code == 200


def test_run_server_answers_to_any_name_only_when_told_or_bound_beyond_loopback(monkeypatch, digits_checkpoint) -> None:
    import vitlab.serve.server

    seen = []

    class FakeServer:
        def __init__(self, app, **kw):
            seen.append((app.state.config, kw))

        def run(self):
            pass

    monkeypatch.setattr(vitlab.serve.server, "build_server", FakeServer)
    from vitlab.serve import run_server

    run_server(str(digits_checkpoint), port=8123, max_connections=7)
    run_server(str(digits_checkpoint), host="0.0.0.0", config=ServeConfig(head_timeout_s=3))
    run_server(str(digits_checkpoint), host="0.0.0.0", config=ServeConfig(allowed_hosts=("gpu.lan",)))
    (loop_cfg, loop_kw), (any_cfg, any_kw), (named_cfg, _) = seen
    assert loop_cfg.allowed_hosts is None and loop_kw["port"] == 8123 and loop_kw["max_connections"] == 7
    assert any_cfg.allowed_hosts == ("*",) and any_kw["head_timeout_s"] == 3
    assert named_cfg.allowed_hosts == ("gpu.lan",)


def test_serve_cli_passes_allowed_hosts_and_the_body_timeout(monkeypatch, digits_checkpoint) -> None:
    from click.testing import CliRunner

    import vitlab.serve
    from vitlab.cli import cli

    seen = {}
    monkeypatch.setattr(vitlab.serve, "run_server", lambda checkpoint, **kw: seen.update(kw))
    args = ["serve", str(digits_checkpoint), "--allowed-host", "a.lan", "--allowed-host", "b.lan"]
    r = CliRunner().invoke(cli, [*args, "--body-timeout", "5"], env={})
    assert r.exit_code == 0, r.output
    assert seen["config"].allowed_hosts == ("a.lan", "b.lan") and seen["config"].body_timeout_s == 5
    r = CliRunner().invoke(cli, ["serve", str(digits_checkpoint)], env={})
    assert seen["config"].allowed_hosts is None and seen["config"].body_timeout_s == 60


# --- a non-ASCII API key ------------------------------------------------------------------------------------------
def test_a_non_ascii_api_key_is_compared_as_utf8_bytes() -> None:
    for key in ("clé", "ключ-🔑"):
        with local_client(tiny_app(api_key=key)) as c:
            utf8 = key.encode("utf-8")  # what curl, httpx and browsers send for a non-ASCII header value
            assert c.get("/v1/model", headers={"X-API-Key": utf8}).status_code == 200
            assert c.get("/v1/model", headers={"Authorization": b"Bearer " + utf8}).status_code == 200
            assert c.post("/v1/predict", headers={"X-API-Key": utf8}, **upload(png())).status_code == 200
            assert c.get("/", auth=("anyone", key)).status_code == 200  # HTTP Basic: the browser sends UTF-8
            for wrong in (key[:-1] + "x", key.upper(), key[:-1]):
                r = c.get("/v1/model", headers={"X-API-Key": wrong.encode("utf-8")})
                assert "wrong" in assert_one_line_error(r, 403), wrong
                assert c.get("/", auth=("anyone", wrong)).status_code == 401
    # the same characters in latin-1 are other bytes, so another key (sent raw: the test client re-encodes headers)
    assert _guard_status("clé", [(b"x-api-key", "clé".encode("latin-1"))]) == 403
    assert _guard_status("clé", [(b"x-api-key", "clé".encode())]) == 200


def _guard_status(api_key: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status `Guard` answers a GET /v1/model with these raw header bytes (200: passed on to the app)."""
    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/model", "method": "GET", "headers": [(b"host", b"127.0.0.1"), *headers]}
    asyncio.run(Guard(app, api_key=api_key, max_bytes=100)(scope, None, send))
    return sent[0]["status"]


# --- /v1/explain waits in the same queue ----------------------------------------------------------------------------
def test_explanations_wait_in_the_queue_and_are_refused_when_it_is_full() -> None:
    gate = threading.Event()
    model = tiny_model("vit_tiny_patch4_28").eval()
    model.pretrained_cfg = {}
    blocking = _Counting(TorchClassifier(model))
    blocking.logits = lambda x: (gate.wait(10), blocking.inner.logits(x))[1]
    gate.set()  # the warm-up call passes
    app = create_app(blocking, explain_model=model, config=ServeConfig(max_batch=1, max_queue=1))
    gate.clear()
    with local_client(app) as c, ThreadPoolExecutor(2) as pool:
        schema = c.get("/openapi.json").json()
        first = pool.submit(c.post, "/v1/predict", **upload(png()))  # taken by the model, which blocks
        time.sleep(0.5)
        second = pool.submit(c.post, "/v1/predict", **upload(png(seed=1)))  # waits in the queue: it is full
        time.sleep(0.5)
        for path in ("/v1/explain", "/v1/predict"):
            r = c.post(path, **upload(png()))
            assert "waiting" in assert_one_line_error(r, 503) and r.headers["retry-after"] == "1"
            assert_documented(schema, path, "post", r)
        gate.set()
        assert first.result(10).status_code == 200 and second.result(10).status_code == 200
        r = c.post("/v1/explain", **upload(png()))  # served in its turn once the queue has room
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_the_batcher_runs_a_call_in_its_turn_between_batches() -> None:
    order = []

    def model(x):
        order.append(("batch", len(x)))
        return x

    async def main():
        batcher = MicroBatcher(model, max_batch=8, max_wait_ms=50, max_queue=8)
        jobs = [batcher.submit(torch.zeros(1)), batcher.run(lambda: order.append(("call", 0)) or "done")]
        jobs += [batcher.submit(torch.zeros(1)) for _ in range(2)]
        results = await asyncio.gather(*jobs)
        await batcher.aclose()
        return results

    results = asyncio.run(main())
    assert results[1] == "done"
    assert order == [("batch", 1), ("call", 0), ("batch", 2)]  # the call closed the first batch and ran alone


# --- slow clients on real sockets ---------------------------------------------------------------------------------
@contextlib.contextmanager
def live_server(app, *, max_connections: int, head_timeout_s: float):
    """`vitlab serve`'s uvicorn server (`build_server`) on a free port of 127.0.0.1, in a thread."""
    server = build_server(
        app,
        host="127.0.0.1",
        port=0,
        max_connections=max_connections,
        head_timeout_s=head_timeout_s,
        log_level="warning",
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _connect(port: int, first_bytes: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=6)
    s.sendall(first_bytes)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):  # socket.timeout (a failure) if the server never closes it
        chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_slow_clients_cannot_hold_the_connection_limit() -> None:
    """Slowloris: clients that send a request head, or a body, a few bytes at a time would hold the server's
    connections for ever (uvicorn answers 503 beyond its limit). The head and the body each have a deadline;
    once it passes, the connections are closed and the server serves again."""
    timeout = 1.0
    app = tiny_app(body_timeout_s=timeout, head_timeout_s=timeout)
    schema = app.openapi()
    # uvicorn counts the asking connection too: with 4 slow ones open, a 5th is refused
    with live_server(app, max_connections=5, head_timeout_s=timeout) as port:
        head = b"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slo"  # never finished
        body = (
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 10000\r\n\r\n--x\r\n"  # 10,000 bytes promised, 5 sent
        )
        slow = [_connect(port, head), _connect(port, head), _connect(port, body), _connect(port, body)]
        try:
            time.sleep(0.3)
            status, headers, text = _get(port, "/health")  # every connection is taken
            assert status == 503 and headers["content-type"].startswith("text/plain"), (status, text)
            assert "text/plain" in schema["paths"]["/health"]["get"]["responses"]["503"]["content"]
            start = time.monotonic()
            answers = [_read_until_closed(s) for s in slow]
            assert time.monotonic() - start < 3 * timeout
        finally:
            for s in slow:
                s.close()
        assert answers[0] == answers[1] == b""  # an unfinished head: closed without an answer
        for answer in answers[2:]:  # an unfinished body: 408 with the error body, and the connection closed
            head_part, _, payload = answer.partition(b"\r\n\r\n")
            assert head_part.startswith(b"HTTP/1.1 408") and b"connection: close" in head_part.lower()
            assert "did not arrive within 1 s" in json.loads(payload)["detail"]
            assert matches_schema(schema, schema["paths"]["/v1/predict"]["post"]["responses"]["408"], payload)
        status, _, text = _get(port, "/health")
        assert status == 200 and json.loads(text) == {"status": "ok"}


def test_a_kept_alive_connection_must_send_its_next_head_in_time() -> None:
    """The head deadline starts again after each response, also when the previous request outlived it."""
    app = tiny_app(body_timeout_s=5.0)
    with live_server(app, max_connections=8, head_timeout_s=0.5) as port:
        s = _connect(port, b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n12345")
        try:
            time.sleep(0.8)  # the request is in flight past the first head deadline
            s.sendall(b"67890")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 405")  # answered; the connection is kept alive
            answered, closed = time.monotonic(), None
            s.settimeout(0.2)
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":  # a byte every 0.2 s
                try:
                    if s.recv(1) == b"":
                        closed = time.monotonic()
                        break
                except TimeoutError:
                    pass
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # reset by the server
                    closed = time.monotonic()
                    break
            assert closed is not None and closed - answered < 2.0
        finally:
            s.close()


# --- the OpenAPI schema documents every answer ----------------------------------------------------------------------
def _deref(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        target = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _conforms(doc: dict, node: dict, value) -> bool:
    """``value`` against the JSON-schema subset FastAPI writes for error bodies (object, string, required,
    additionalProperties)."""
    node = _deref(doc, node)
    kind = node.get("type")
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        props = node.get("properties", {})
        if not isinstance(value, dict) or not set(node.get("required", ())) <= set(value):
            return False
        if node.get("additionalProperties") is False and not set(value) <= set(props):
            return False
        return all(_conforms(doc, props[k], v) for k, v in value.items() if k in props)
    return True


def matches_schema(doc: dict, response_doc: dict, payload: bytes) -> bool:
    """Whether a JSON error ``payload`` fits the application/json schema of an OpenAPI response object."""
    return _conforms(doc, response_doc["content"]["application/json"]["schema"], json.loads(payload))


def assert_documented(doc: dict, path: str, method: str, r) -> None:
    """``r``'s status is documented for ``method path``, and its body fits that response's schema."""
    responses = doc["paths"][path][method]["responses"]
    assert str(r.status_code) in responses, (path, method, r.status_code, sorted(responses))
    ctype = r.headers["content-type"].split(";")[0]
    assert ctype in responses[str(r.status_code)]["content"], (path, r.status_code, ctype)
    if ctype == "application/json" and r.status_code >= 400:
        assert matches_schema(doc, responses[str(r.status_code)], r.content), (path, r.status_code, r.text)


def _schema_errors(doc: dict) -> dict[tuple[str, str], set[int]]:
    """Every operation's documented error statuses, checking that each has ErrorBody (503 may be text only)."""
    body = doc["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["detail"] and body["properties"]["detail"]["type"] == "string"
    found = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {int(s) for s in op["responses"] if int(s) >= 400}
            for status in errors:
                content = op["responses"][str(status)]["content"]
                if status == 503:  # uvicorn's own, at the connection limit
                    assert content["text/plain"]["schema"]["type"] == "string"
                if "application/json" in content or status != 503:
                    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            found[(path, method)] = errors
    return found


UPLOAD_ERRORS = {400, 408, 413, 415, 422, 500, 503}


def test_the_openapi_schema_documents_every_error_of_every_endpoint() -> None:
    for key, expected_guard in ((None, {421}), ("k", {401, 403})):
        with local_client(tiny_app(api_key=key)) as c:
            doc = c.get("/openapi.json", auth=("", key) if key else None).json()
        errors = _schema_errors(doc)
        assert errors[("/health", "get")] == {500, 503} | (expected_guard - {401, 403})
        assert errors[("/v1/model", "get")] == {500, 503} | expected_guard
        for path in ("/v1/predict", "/v1/explain"):
            assert errors[(path, "post")] == UPLOAD_ERRORS | expected_guard, path
            assert "application/json" in doc["paths"][path]["post"]["responses"]["503"]["content"]
        assert "HTTPValidationError" not in doc["components"]["schemas"]  # 422 is ErrorBody too


def test_the_error_bodies_the_server_sends_fit_the_schema() -> None:
    seen: set[tuple[str, int]] = set()

    def check(c, doc, method: str, path: str, status: int, **kwargs) -> None:
        r = getattr(c, method)(path, **kwargs)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert_documented(doc, path, method, r)
        seen.add((path, status))

    uploads = ("/v1/predict", "/v1/explain")
    keyless = tiny_app(max_upload_bytes=3000)
    with local_client(keyless) as c, TestClient(keyless, base_url="http://evil.example") as far:
        doc = c.get("/openapi.json").json()
        for path in ("/health", "/v1/model"):
            check(far, doc, "get", path, 421)
        for path in uploads:
            check(far, doc, "post", path, 421, **upload(png()))
            check(c, doc, "post", path, 400, content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
            check(c, doc, "post", path, 413, **upload(png((128, 128))))
            check(c, doc, "post", path, 415, content=b"{}", headers={"content-type": "application/json"})
        check(c, doc, "post", "/v1/predict", 422, params={"top_k": 0}, **upload(png()))
    with local_client(tiny_app("resnet18_28")) as c:
        check(c, doc, "post", "/v1/explain", 422, **upload(png()))
    with local_client(tiny_app(api_key="k")) as c:
        doc = c.get("/openapi.json", headers={"X-API-Key": "k"}).json()
        for path in ("/v1/model",):
            check(c, doc, "get", path, 401)
            check(c, doc, "get", path, 403, headers={"X-API-Key": "nope"})
        for path in uploads:
            check(c, doc, "post", path, 401, **upload(png()))
            check(c, doc, "post", path, 403, headers={"X-API-Key": "nope"}, **upload(png()))
    # 500: the model fails (predict), or anything else does (the JSON handler, not Starlette's plain text)
    model = tiny_model("vit_tiny_patch4_28").eval()
    model.pretrained_cfg = {}
    failing = _Counting(TorchClassifier(model))
    app = create_app(failing, explain_model=model)
    with local_client(app, raise_server_exceptions=False) as c:
        doc = c.get("/openapi.json").json()
        failing.fail_next = True
        check(c, doc, "post", "/v1/predict", 500, **upload(png()))
        app.state.batcher.stats = None  # /v1/model reads it: a TypeError inside the route
        check(c, doc, "get", "/v1/model", 500)
        model.forward = lambda x: 1 / 0  # the explanation's forward fails
        check(c, doc, "post", "/v1/explain", 500, **upload(png()))
    # 408 and 503 come from slow clients and a full queue: their own tests above check them against the schema
    assert {s for _, s in seen} >= {400, 401, 403, 413, 415, 421, 422, 500}
