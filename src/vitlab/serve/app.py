"""The HTTP server: a FastAPI app over a classifier (eager PyTorch or onnxruntime).

    GET  /             the web page (inline CSS and JS, no external assets)
    GET  /health       liveness, never behind the API key
    GET  /v1/model     name, classes, input size, normalisation, limits, batching counters
    POST /v1/predict   multipart field ``file`` -> top-k classes with probabilities (JSON)
    POST /v1/explain   multipart field ``file`` -> PNG of the attention-rollout overlay
    GET  /docs         OpenAPI (Swagger UI); the schema at /openapi.json

Every refusal is a 4xx (or 503 when overloaded) with one line of JSON, ``{"detail": "..."}`` (`ErrorBody`), and
/openapi.json lists, for each endpoint, every status it can answer with that schema. `Guard`, an ASGI layer in
front of the app (`vitlab.serve.guard`), refuses before anything is parsed: a Host the server does not answer to
(421), a missing or wrong API key (401 / 403), a body that is not multipart (415), empty (400), over the size
limit (413) or too slow to arrive (408). The upload itself is checked in `images`: format, pixel count before
decoding, truncation. Predictions and explanations wait in one queue, the `MicroBatcher`'s (503 when it is full);
a model that raises answers 500 with its message, is logged, and the next request is served.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import torch
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from vitlab.predict import preprocess, top_classes
from vitlab.serve.batching import MicroBatcher, QueueFull
from vitlab.serve.explain import explain_support, overlay_png, relevance_map
from vitlab.serve.guard import Guard, default_allowed_hosts, error
from vitlab.serve.images import UploadError, decode_upload

log = logging.getLogger("vitlab.serve")
T = TypeVar("T")

ImageField = Annotated[UploadFile, File(description="The image: PNG, JPEG, WebP, BMP or GIF.")]
OK_PART_TYPES = ("image/", "application/octet-stream")  # what browsers and curl send for an image file


@dataclass
class ServeConfig:
    """Limits and batching of a server. ``api_key`` None leaves the API open (fine on 127.0.0.1).

    ``allowed_hosts``: the names the server answers to in the Host header (``*.example.org`` for subdomains,
    ``*`` for any); others get 421. None: the loopback names (localhost, 127.0.0.1, ::1) without an API key, any
    name with one. ``body_timeout_s`` bounds how long a request's body may take to arrive (408 after it);
    ``head_timeout_s`` how long its request line and headers may take (the connection is closed after it).
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256  # requests waiting for the model before the server answers 503
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    decode_threads: int = 2  # images decoded at once: with max_pixels, bounds the memory decoding takes
    api_key: str | None = None
    max_top_k: int = 100
    allowed_hosts: tuple[str, ...] | None = None
    body_timeout_s: float = 60.0
    head_timeout_s: float = 10.0


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


class ErrorBody(BaseModel):
    """Every answer that is not a success: one line saying what was wrong and, where it helps, what to do."""

    model_config = ConfigDict(extra="forbid")
    detail: str = Field(description="One line, for a person: what was wrong and what to do.")


# What each status means, as /openapi.json documents it; `_responses` picks those an endpoint can answer.
STATUS_MEANING = {
    400: "Malformed request: an empty body, no multipart field 'file', a broken multipart body, or an empty, "
    "truncated or corrupt image.",
    401: "No API key (the server has one): send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
    403: "A wrong API key.",
    408: "The request body did not arrive within the server's body timeout.",
    413: "The body is over the upload limit, or the image over the pixel limit.",
    415: "The body is not multipart/form-data, or the file part is not an image in a supported format.",
    421: "The Host header names a host this server does not answer to (protection against DNS rebinding).",
    422: "A parameter is invalid (top_k < 1), or the model cannot be explained by attention rollout (the reason).",
    500: "The model or the server failed on this request; the next request is served.",
    503: "Overloaded: the model's queue is full (JSON, with Retry-After), or uvicorn's connection limit is reached "
    "(text/plain 'Service Unavailable', before the request reaches the app).",
}


def _responses(statuses: list[int], *, queued: bool) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error ``statuses`` of an endpoint: each with `ErrorBody`. 503 comes from
    uvicorn's connection limit as plain text on any endpoint, and as `ErrorBody` where requests are ``queued``."""
    out: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody, "description": STATUS_MEANING[s]} for s in statuses}
    text = {"text/plain": {"schema": {"type": "string", "example": "Service Unavailable"}}}
    out[503] = {"model": ErrorBody, "content": text} if queued else {"content": text}
    out[503]["description"] = STATUS_MEANING[503]
    return out


def create_app(
    classifier: Any,
    *,
    explain_model: nn.Module | None = None,
    config: ServeConfig | None = None,
    runtime: str = "torch",
) -> FastAPI:
    """The app for ``classifier`` (`vitlab.predict.TorchClassifier` or `vitlab.export.OnnxClassifier`).

    ``explain_model`` is the torch module whose attention `/v1/explain` rolls out (default: the classifier's own
    module; an ONNX classifier without one refuses explanations with the reason). `Guard` runs in front of
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

    # The key is checked by `Guard`; these two only describe it to OpenAPI, so /docs has an Authorize button.
    doc_auth = (
        [Depends(HTTPBearer(auto_error=False)), Depends(APIKeyHeader(name="X-API-Key", auto_error=False))]
        if cfg.api_key
        else []
    )
    allowed_hosts = cfg.allowed_hosts if cfg.allowed_hosts is not None else default_allowed_hosts(cfg.api_key)
    # what `Guard` can answer on any endpoint but /health, then what the upload endpoints add
    guarded = [421] * ("*" not in allowed_hosts) + [401, 403] * bool(cfg.api_key) + [500]
    upload = sorted([*guarded, 400, 408, 413, 415, 422])
    app = FastAPI(
        title="vitlab serve",
        summary="Image classification with a vitlab model: top-k classes and attention-rollout explanations.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = cfg
    app.add_middleware(
        Guard,
        api_key=cfg.api_key,
        max_bytes=cfg.max_upload_bytes,
        allowed_hosts=allowed_hosts,
        body_timeout_s=cfg.body_timeout_s,
    )

    _add_error_handlers(app)

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

    async def predict_one(file: UploadFile) -> torch.Tensor:
        return await batcher.submit(await read_image(file))

    async def explain_upload(file: UploadFile) -> tuple[bytes, str, float]:
        return await batcher.run(explain_one, await read_image(file))  # in the queue, in turn, as a prediction

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_PAGE, headers={"Cache-Control": "no-cache"})

    @app.get(
        "/health", tags=["service"], responses=_responses([421] * ("*" not in allowed_hosts) + [500], queued=False)
    )
    async def health() -> dict[str, str]:
        """Liveness: answers while the server runs (no API key needed)."""
        return {"status": "ok"}

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        tags=["model"],
        dependencies=doc_auth,
        responses=_responses(guarded, queued=False),
    )
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

    @app.post(
        "/v1/predict",
        response_model=Prediction,
        tags=["model"],
        dependencies=doc_auth,
        responses=_responses(upload, queued=True),
    )
    async def predict(
        file: ImageField,
        top_k: Annotated[int, Query(ge=1, description="How many classes to return (at most all of them).")] = 5,
    ) -> Any:
        """Top-k classes with probabilities for one image."""
        probs = await _attempt(predict_one(file))  # the model's failure is logged by the batcher
        if isinstance(probs, JSONResponse):
            return probs
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
        responses={
            200: {"content": {"image/png": {}}, "description": "The image with the rollout heat map."},
            **_responses(upload, queued=True),
        },
    )
    async def explain(file: ImageField) -> Response:
        """PNG of the image with the attention-rollout relevance of each patch overlaid (red: most relevant).
        Headers X-Vitlab-Class (percent-encoded) and X-Vitlab-Probability give the top class. Models without
        global attention answer 422 with the reason."""
        if explain_note is not None:
            return error(422, explain_note)
        answer = await _attempt(explain_upload(file), log_as="explanation failed")
        if isinstance(answer, JSONResponse):
            return answer
        png, name, prob = answer
        headers = {"X-Vitlab-Class": quote(name), "X-Vitlab-Probability": f"{prob:.6f}"}
        return Response(png, media_type="image/png", headers=headers)

    return app


async def _attempt(work: Awaitable[T], *, log_as: str | None = None) -> T | JSONResponse:
    """The result of a request's work, or its error answer: a bad upload's 4xx, a full queue's 503 (with
    Retry-After), the model's own failure as a 500 (logged as ``log_as``) after which the server keeps serving."""
    try:
        return await work
    except UploadError as e:
        return error(e.status, str(e))
    except QueueFull as e:
        return error(503, str(e), **{"Retry-After": "1"})
    except Exception as e:
        if log_as:
            log.exception(log_as)
        return error(500, f"the model failed: {type(e).__name__}: {_first_line(e)}")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON `ErrorBody`: an unhandled exception (500) and FastAPI's validation errors (a missing
    'file' field is a 400 with what to send, anything else a 422 naming the parameter)."""

    @app.exception_handler(Exception)
    async def _failed(_request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return error(500, f"the server failed: {type(exc).__name__}: {_first_line(exc)}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        e = exc.errors()[0]
        where = " ".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "missing" and "file" in where:
            return error(400, "no field 'file' in the form: send the image as multipart/form-data field 'file'")
        return error(422, f"{where}: {e.get('msg', 'invalid')}")


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
    (uvicorn answers 503 beyond it), and with the upload limit the memory requests can take; the head and body
    timeouts keep slow clients from holding them."""
    from vitlab.serve.server import build_server

    cfg = config or ServeConfig()
    if not _is_loopback(host) and cfg.api_key is None:
        log.warning("serving on %s without an API key: anyone who reaches this address can use the model", host)
        if cfg.allowed_hosts is None:  # clients name this machine as they reach it: answer to any name
            cfg = replace(cfg, allowed_hosts=("*",))
    app = load_app(checkpoint, runtime=runtime, config=cfg)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    log.info(
        "vitlab serve: %s (%s) on http://%s:%d/ - API key %s",
        checkpoint,
        runtime,
        host if ":" not in host else f"[{host}]",
        port,
        "required" if cfg.api_key else "off",
    )
    server = build_server(app, host=host, port=port, max_connections=max_connections, head_timeout_s=cfg.head_timeout_s)
    server.run()


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
