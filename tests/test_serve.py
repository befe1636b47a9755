"""`vitlab serve`: every endpoint, every kind of bad input (each a one-line 4xx, and the server serves the next
request), micro-batching of concurrent requests, inference off the event loop, a failing model, the API key."""

from __future__ import annotations

import asyncio
import io
import json
import logging
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
from vitlab.serve.app import _Guard
from vitlab.serve.batching import QueueFull


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


@pytest.fixture(scope="module")
def client(digits_checkpoint):
    with TestClient(load_app(str(digits_checkpoint))) as c:
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
    with TestClient(create_app(TorchClassifier(model))) as c:
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
    with TestClient(app) as c:
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
    with TestClient(app) as c:
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
    asyncio.run(_Guard(app, api_key=None, max_bytes=10_000)(scope, receive, send))
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
    with TestClient(app) as c:
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
    with TestClient(create_app(slow)) as c:
        t = threading.Thread(target=lambda: c.post("/v1/predict", **upload(png())))
        t.start()
        time.sleep(0.3)  # the model call has started
        start = time.perf_counter()
        assert c.get("/health").status_code == 200
        assert time.perf_counter() - start < 0.8  # answered while the model computes
        t.join()


def test_a_model_that_raises_is_a_500_that_is_logged_and_the_next_request_is_served(digits_checkpoint, caplog) -> None:
    failing = _Counting(load_classifier(digits_checkpoint))
    with TestClient(create_app(failing)) as c:
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
    with TestClient(load_app(str(digits_checkpoint), config=ServeConfig(api_key="s3cret"))) as c:
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
