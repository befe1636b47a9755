"""The HTTP server: a FastAPI app over a classifier (eager PyTorch or onnxruntime).

    GET  /             the web page (inline CSS and JS, no external assets)
    GET  /health       liveness, never behind the API key
    GET  /v1/model     name, classes, input size, normalisation, limits, batching counters
    POST /v1/predict   multipart field ``file`` -> top-k classes with probabilities (JSON)
    POST /v1/explain   multipart field ``file`` -> PNG of the attention-rollout overlay
    GET  /docs         OpenAPI (Swagger UI); the schema at /openapi.json

Every refusal is a 4xx with one line of JSON, ``{"detail": "..."}``. `_Guard`, an ASGI layer in front of the app,
refuses before anything is parsed: a missing or wrong API key (401 / 403; with a key set, every path but /health
needs it, and the page and the docs ask a browser for it by HTTP Basic), an upload endpoint called without a
multipart body (415), an empty body (400) and a body over the size limit (413, counted as it arrives, so a client
that lies in Content-Length or sends chunks cannot pass it). The upload itself is checked in `images`: format,
pixel count before decoding, truncation. Predictions go through the `MicroBatcher`; a model that raises answers
500 with its message, is logged, and the next request is served.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hmac
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote

import torch
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, Field
from torch import nn

from vitlab.predict import preprocess, top_classes
from vitlab.serve.batching import MicroBatcher, QueueFull
from vitlab.serve.explain import explain_support, overlay_png, relevance_map
from vitlab.serve.images import UploadError, decode_upload

log = logging.getLogger("vitlab.serve")

PUBLIC_PATHS = ("/health",)  # liveness probes carry no key
# Pages a browser navigates to cannot send a header: they ask for the key by HTTP Basic authentication (any user
# name, the key as password), and the browser then sends it with the page's own API calls.
BROWSER_PATHS = ("/", "/docs", "/docs/oauth2-redirect", "/openapi.json")
UPLOAD_PATHS = ("/v1/predict", "/v1/explain")
ImageField = Annotated[UploadFile, File(description="The image: PNG, JPEG, WebP, BMP or GIF.")]
OK_PART_TYPES = ("image/", "application/octet-stream")  # what browsers and curl send for an image file


@dataclass
class ServeConfig:
    """Limits and batching of a server. ``api_key`` None leaves the API open (fine on 127.0.0.1)."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256  # requests waiting for the model before the server answers 503
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    decode_threads: int = 2  # images decoded at once: with max_pixels, bounds the memory decoding takes
    api_key: str | None = None
    max_top_k: int = 100


class ClassProbability(BaseModel):
    class_name: str = Field(alias="class")
    probability: float


class Prediction(BaseModel):
    model: str
    top: list[ClassProbability]


class ModelInfo(BaseModel):
    name: str
    runtime: str
    classes: list[str]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    explain: bool
    explain_note: str | None
    limits: dict[str, Any]
    batching: dict[str, Any]


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


class _Guard:
    """ASGI layer: API key, content type, empty and oversized bodies, refused before the app parses anything. A
    body under the limit is read here and replayed to the app, so at most ``max_bytes`` per request is held."""

    def __init__(self, app: Any, *, api_key: str | None, max_bytes: int) -> None:
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._check_key(scope["path"], headers)
        if refusal is None and scope["path"] in UPLOAD_PATHS and scope["method"] == "POST":
            refusal = self._check_upload_headers(headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, refusal = await self._read_body(receive)
        if refusal is None and not body and scope["path"] in UPLOAD_PATHS:
            refusal = _error(400, "the request body is empty: send the image as multipart/form-data field 'file'")
        if refusal is not None:
            return await refusal(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect

        await self.app(scope, replay, send)

    def _check_key(self, path: str, headers: dict[str, str]) -> JSONResponse | None:
        if self.api_key is None or path in PUBLIC_PATHS:
            return None
        given = _given_key(headers)
        right = bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())  # constant time
        if right:
            return None
        if path in BROWSER_PATHS:  # 401 with a Basic challenge, wrong key too: the browser asks (again)
            message = "the API key is wrong" if given else "this page needs the server's API key"
            return _error(401, message, **{"WWW-Authenticate": 'Basic realm="vitlab", charset="UTF-8"'})
        if given:
            return _error(403, "the API key is wrong")
        return _error(
            401,
            "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            **{"WWW-Authenticate": "Bearer"},
        )

    def _check_upload_headers(self, headers: dict[str, str]) -> JSONResponse | None:
        ctype = headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return _error(
                415,
                f"Content-Type is {ctype or 'missing'!s}: send the image as multipart/form-data field 'file' "
                "(curl -F file=@image.png)",
            )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return _error(413, f"the upload is {length} bytes; the limit is {self.max_bytes} bytes")
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, JSONResponse | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", _error(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # stop reading: the rest of the body is never held
                return b"", _error(413, f"the upload is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _given_key(headers: dict[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY``, ``X-API-Key: KEY``, or HTTP Basic's password."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return None
    return headers.get("x-api-key")


def create_app(
    classifier: Any,
    *,
    explain_model: nn.Module | None = None,
    config: ServeConfig | None = None,
    runtime: str = "torch",
) -> FastAPI:
    """The app for ``classifier`` (`vitlab.predict.TorchClassifier` or `vitlab.export.OnnxClassifier`).

    ``explain_model`` is the torch module whose attention `/v1/explain` rolls out (default: the classifier's own
    module; an ONNX classifier without one refuses explanations with the reason). `_Guard` runs in front of
    the app's routes; ``app.state.batcher`` is the `MicroBatcher`.
    """
    cfg = config or ServeConfig()
    if explain_model is None:  # a TorchClassifier explains with its own module
        explain_model = getattr(classifier, "model", None)
    in_chans, h, w = classifier.input_size
    names = list(classifier.class_names)

    def run_batch(images: torch.Tensor) -> torch.Tensor:
        return classifier.logits(preprocess(images, classifier)).float().softmax(-1)  # (B, classes)

    batcher = MicroBatcher(run_batch, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue)
    decoder = concurrent.futures.ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="vitlab-decode")
    explain_note = explain_support(explain_model)
    run_batch(torch.zeros(1, in_chans, h, w, dtype=torch.uint8))  # warm up: the first request is not the slowest

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await batcher.aclose()

    # The key is checked by `_Guard`; these two only describe it to OpenAPI, so /docs has an Authorize button.
    doc_auth = (
        [Depends(HTTPBearer(auto_error=False)), Depends(APIKeyHeader(name="X-API-Key", auto_error=False))]
        if cfg.api_key
        else []
    )
    app = FastAPI(
        title="vitlab serve",
        summary="Image classification with a vitlab model: top-k classes and attention-rollout explanations.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = cfg
    app.add_middleware(_Guard, api_key=cfg.api_key, max_bytes=cfg.max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        where = " ".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "missing" and "file" in where:
            return _error(400, "no field 'file' in the form: send the image as multipart/form-data field 'file'")
        return _error(422, f"{where}: {e.get('msg', 'invalid')}")

    async def read_image(file: UploadFile) -> torch.Tensor:
        ctype = (file.content_type or "application/octet-stream").lower()
        if not ctype.startswith(OK_PART_TYPES):
            raise UploadError(415, f"the file is sent as {ctype}; send an image (PNG, JPEG, WebP, BMP or GIF)")
        data = await file.read()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            decoder,
            lambda: decode_upload(data, in_chans=in_chans, img_size=(h, w), max_pixels=cfg.max_pixels),
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, str]:
        """Liveness: answers while the server runs (no API key needed)."""
        return {"status": "ok"}

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=doc_auth)
    async def model_info() -> dict[str, Any]:
        """The model behind the server: name, class names, input size [C, H, W], normalisation, limits."""
        return {
            "name": classifier.model_name,
            "runtime": runtime,
            "classes": names,
            "input_size": [in_chans, h, w],
            "mean": list(classifier.mean),
            "std": list(classifier.std),
            "explain": explain_note is None,
            "explain_note": explain_note,
            "limits": {
                "max_upload_bytes": cfg.max_upload_bytes,
                "max_pixels": cfg.max_pixels,
                "max_top_k": cfg.max_top_k,
            },
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, **batcher.stats},
        }

    @app.post("/v1/predict", response_model=Prediction, tags=["model"], dependencies=doc_auth)
    async def predict(
        file: ImageField,
        top_k: Annotated[int, Query(ge=1, description="How many classes to return (at most all of them).")] = 5,
    ) -> Any:
        """Top-k classes with probabilities for one image."""
        try:
            image = await read_image(file)
            probs = await batcher.submit(image)
        except UploadError as e:
            return _error(e.status, str(e))
        except QueueFull as e:
            return _error(503, str(e), **{"Retry-After": "1"})
        except Exception as e:  # the model's own failure (logged by the batcher): this request fails, not the server
            return _error(500, f"the model failed: {type(e).__name__}: {_first_line(e)}")
        return {"model": classifier.model_name, "top": top_classes(probs, names, min(top_k, cfg.max_top_k))}

    def explain_one(image: torch.Tensor) -> tuple[bytes, str, float]:
        relevance, logits = relevance_map(explain_model, preprocess(image[None], classifier))
        prob, idx = logits.float().softmax(-1)[0].max(0)
        return overlay_png(image, relevance[0]), names[int(idx)], float(prob)

    @app.post(
        "/v1/explain",
        tags=["model"],
        dependencies=doc_auth,
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "The image with the rollout heat map."}},
    )
    async def explain(file: ImageField) -> Response:
        """PNG of the image with the attention-rollout relevance of each patch overlaid (red: most relevant).
        Headers X-Vitlab-Class (percent-encoded) and X-Vitlab-Probability give the top class. Models without
        global attention answer 422 with the reason."""
        if explain_note is not None:
            return _error(422, explain_note)
        try:
            image = await read_image(file)
            png, name, prob = await batcher.run(explain_one, image)
        except UploadError as e:
            return _error(e.status, str(e))
        except Exception as e:  # the model's own failure: log it, answer, keep serving
            log.exception("explanation failed")
            return _error(500, f"the model failed: {type(e).__name__}: {_first_line(e)}")
        headers = {"X-Vitlab-Class": quote(name), "X-Vitlab-Probability": f"{prob:.6f}"}
        return Response(png, media_type="image/png", headers=headers)

    return app


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


_PAGE = resources.files("vitlab.serve").joinpath("page.html").read_text(encoding="utf-8")


def load_app(checkpoint: str, *, runtime: str = "torch", config: ServeConfig | None = None) -> FastAPI:
    """`create_app` for a checkpoint: ``runtime="onnx"`` predicts with onnxruntime on the checkpoint's
    ``model.onnx`` (or a ``.onnx`` file) and explains with the checkpoint's torch model when there is one."""
    from pathlib import Path

    from vitlab.checkpoint import from_pretrained
    from vitlab.predict import load_classifier

    classifier = load_classifier(checkpoint, runtime=runtime)
    model = None if runtime == "torch" or Path(checkpoint).suffix == ".onnx" else from_pretrained(checkpoint)
    return create_app(classifier, explain_model=model, config=config, runtime=runtime)


def run_server(
    checkpoint: str,
    *,
    runtime: str = "torch",
    host: str = "127.0.0.1",
    port: int = 8000,
    config: ServeConfig | None = None,
    max_connections: int = 128,
) -> None:
    """Serve ``checkpoint`` with uvicorn until interrupted. ``max_connections`` bounds concurrent connections
    (uvicorn answers 503 beyond it), and with the upload limit the memory requests can take."""
    import ipaddress

    import uvicorn

    cfg = config or ServeConfig()
    app = load_app(checkpoint, runtime=runtime, config=cfg)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and cfg.api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches this address can use the model", host)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log.info(
        "vitlab serve: %s (%s) on http://%s:%d/ - API key %s",
        checkpoint,
        runtime,
        host if ":" not in host else f"[{host}]",
        port,
        "required" if cfg.api_key else "off",
    )
    uvicorn.run(app, host=host, port=port, limit_concurrency=max_connections, timeout_keep_alive=5, log_level="info")
