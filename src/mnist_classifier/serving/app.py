"""The HTTP service of one worker process: a drawing page, prediction routes, health and metrics (FastAPI).

The routes are plain module-level functions; ``create_app`` loads the model once, starts the batcher and
registers the routes and the edge middleware (request ids and metrics, Host/Origin guard, body limit).
An upload is probed on the event loop (header only); a small one in a quick format is decoded there too
(cheaper than a thread hop), any other on a pool of ``max_decodes`` threads, so a large one never stalls the
event loop and a flood of them cannot take more than those threads. Prepared images go to the batcher, which shares forward passes
between concurrent requests. Every bad request gets a 4xx with a JSON body ``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import ServeConfig
from ..device import select_device
from ..models import load_model
from .backends import onnx_runner, torch_runner
from .batching import Batcher, Overloaded
from .drain import DrainCutoff
from .fleet import Fleet
from .handlers import (BadRequest, ClientError, PayloadTooLarge, Served, UnsupportedMediaType, Unprocessable, answer,
                       parse_pixels, prepare_pixels, prepare_upload, probe_upload)
from .limits import BodyLimit, HostGuard
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .multipart import uploaded_files
from .observe import Observe
from .schemas import (BatchResponse, HealthResponse, PixelsRequest, PredictionResponse, Problem, Readiness, Status,
                      pixels_request)

PAGE = resources.files("mnist_classifier").joinpath("static/index.html")
# Uploads of up to this many pixels in these formats are decoded and prepared on the event loop: at most
# ~1.7 ms (measured: 316x316 random-noise PNG 1.7 ms, baseline JPEG 1.7 ms, GIF 1.2 ms, BMP 0.5 ms; a
# 28x28 PNG 0.17 ms), where a thread hop costs more than a small decode. WebP (5.6 ms for the same pixels)
# and progressive JPEG (3.5 ms, up to 100 scans) always go to the decode threads, as does anything larger.
INLINE_PIXELS = 100_000
INLINE_FORMATS = ("PNG", "JPEG", "GIF", "BMP")
log = logging.getLogger("uvicorn.error")


async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


async def health(request: Request) -> dict[str, Any]:
    """Which model is loaded (and that the process answers)."""
    return request.app.state.served.health()


async def livez() -> dict[str, str]:
    """Liveness: the process answers HTTP. A failure here means restart it."""
    return {"status": "alive"}


async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and warm, and the server is not draining for shutdown (then 503). With
    several workers, how many of them are ready: a connection only ever reaches a ready one."""
    fleet: Fleet | None = request.app.state.fleet
    extra = fleet.readiness() if fleet is not None else {}
    if request.app.state.draining:
        return JSONResponse({"status": "draining", **extra}, status_code=503)
    return JSONResponse({"status": "ready", **extra})


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _uploads(request: Request, max_files: int) -> list[bytes]:
    return uploaded_files(await request.body(), request.headers.get("content-type", ""), "file", max_files)


async def _image(request: Request, data: bytes, turn: asyncio.Semaphore | None = None) -> torch.Tensor:
    """An upload -> the model's uint8 input: probed here, decoded here when small, else on a decode thread
    (one at a time per ``turn``: a batch request's images queue for the threads one by one, not all at once
    ahead of everyone else's)."""
    served: Served = request.app.state.served
    img = probe_upload(served, data)
    if img.size[0] * img.size[1] <= INLINE_PIXELS and img.format in INLINE_FORMATS and not img.info.get("progressive"):
        return prepare_upload(served, img)
    async with turn or contextlib.nullcontext():
        return await asyncio.get_running_loop().run_in_executor(request.app.state.decoder, prepare_upload, served, img)


async def _classify(request: Request, data: bytes | None = None, pixels: bytes | None = None) -> dict[str, Any]:
    """One upload (or JSON pixels) -> its prediction body, its forward pass shared with concurrent requests."""
    served: Served = request.app.state.served
    with request.app.state.batcher.expect(1) as submit:
        if pixels is not None:
            image = prepare_pixels(served, parse_pixels(served, pixels))
        else:
            image = await _image(request, data)
        return answer(served, await submit(image))


async def predict(request: Request) -> JSONResponse:
    """Classify an uploaded image (multipart field ``file``, or a raw image body) or a JSON grid of pixels."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return JSONResponse(await _classify(request, (await _uploads(request, 1))[0]))
    if ctype == "application/json":
        return JSONResponse(await _classify(request, pixels=await request.body()))
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return JSONResponse(await _classify(request, await request.body()))
    raise UnsupportedMediaType("send multipart/form-data with a 'file', an image body, or JSON {'pixels': [[...]]}")


async def _batch_item(request: Request, submit, data: bytes, turn: asyncio.Semaphore) -> dict[str, Any]:  # noqa: ANN001
    try:
        return answer(request.app.state.served, await submit(await _image(request, data, turn)))
    except ClientError as exc:
        return {"error": exc.detail, "status": exc.status}


async def predict_batch(request: Request) -> JSONResponse:
    """Classify several uploaded images (repeated multipart field ``file``); one result per file, in order.
    A bad image gets its own error in its place; the others are still classified. Its images start one per
    turn of the event loop, so that other requests are read and decoded in between."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with one or more 'file' fields")
    datas = await _uploads(request, request.app.state.max_batch_files)
    turn = asyncio.Semaphore(1)
    with request.app.state.batcher.expect(len(datas)) as submit:
        items: list[asyncio.Task] = []
        try:
            for data in datas:
                items.append(asyncio.ensure_future(_batch_item(request, submit, data, turn)))
                await asyncio.sleep(0)
            results = await asyncio.gather(*items)
        finally:
            for item in items:
                item.cancel()  # the client left: the images not classified yet are not
    return JSONResponse({"predictions": list(results)})


def _predict_openapi(pixels_model: type[PixelsRequest]) -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": pixels_model.model_json_schema()},
        "image/png": binary, "image/jpeg": binary,
    }}}


def _batch_openapi() -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": {"file": files}}}}}}


async def _client_error(_request: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    request.app.state.metrics.overloaded.inc()
    return JSONResponse({"detail": f"the server is busy ({exc}); try again shortly"}, status_code=503,
                        headers={"Retry-After": "1"})


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, str(exc)[:200])
    return JSONResponse({"detail": "internal error; the server's log says more"}, status_code=500)


def _load(cfg: ServeConfig, onnx_path: Path | None, threads: int) -> Served:
    """The model (or its ONNX export, when given) for this process."""
    device = select_device(cfg.device)
    model, info, payload = load_model(cfg.checkpoint, device)
    run = onnx_runner(onnx_path, info, threads) if onnx_path else torch_runner(model, info, device)
    # a folder data set is named by its folder only: the absolute path stays on this machine
    dataset = f"folder:{Path(info.name.removeprefix('folder:')).name}" if info.name.startswith("folder:") else info.name
    served = Served(run, "onnxruntime" if onnx_path else "torch", info, device, payload["model"]["name"], dataset,
                    cfg.max_pixels, pixels_request(info.image_size))
    # warm up: the first forward pass allocates and picks kernels; do it before the first request
    run(torch.zeros(1, info.channels, info.image_size, info.image_size, dtype=torch.uint8))
    return served


def _routes(app: FastAPI, served: Served) -> None:
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    app.add_api_route("/livez", livez, methods=["GET"], response_model=Status)
    app.add_api_route("/readyz", readyz, methods=["GET"], response_model=Readiness,
                      responses={503: {"model": Readiness, "description": "draining for shutdown"}})
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=Response,
                      responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    problems = {c.status: {"model": Problem, "description": d} for c, d in (
        (BadRequest, "not a decodable image, or not JSON"), (PayloadTooLarge, "body or image too large"),
        (UnsupportedMediaType, "unsupported content type"), (Unprocessable, "no digit, or malformed pixels"))}
    problems[503] = {"model": Problem, "description": "too many images waiting, or shutting down; retry after "
                                                     "Retry-After seconds"}
    app.add_api_route("/predict", predict, methods=["POST"], response_model=PredictionResponse,
                      openapi_extra=_predict_openapi(served.pixels_model), responses=problems)
    app.add_api_route("/predict/batch", predict_batch, methods=["POST"], response_model=BatchResponse,
                      openapi_extra=_batch_openapi(), responses=problems)
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)


def create_app(cfg: ServeConfig, onnx_path: Path | None = None, threads: int = 1, fleet: Fleet | None = None) -> FastAPI:
    """The app of one worker, with the model of ``cfg.checkpoint`` loaded once; ``onnx_path``: run its ONNX
    export on onnxruntime instead of PyTorch, with ``threads`` threads; ``fleet``: the supervisor's view of
    all the workers, for /readyz and /metrics."""
    served = _load(cfg, onnx_path, threads)
    decoder = ThreadPoolExecutor(cfg.max_decodes, thread_name_prefix="decode")
    metrics_ = Metrics(served.model_name, served.dataset, __version__, served.backend, fleet)
    batcher = Batcher(served.run, cfg.max_batch, cfg.max_wait_ms / 1000.0, threaded=served.device.type != "cpu",
                      on_batch=lambda n: metrics_.observe_batch(n, batcher.queued), max_queue=cfg.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()  # requests in flight have been answered by now (uvicorn drains before this)
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mnist-classifier", version=__version__, lifespan=lifespan,
                  description=f"Classification with {served.model_name} trained on {served.dataset}. The /docs page "
                              "loads its script from a CDN and needs internet; /openapi.json is served from here.")
    app.state.page = PAGE.read_text(encoding="utf-8")  # the only file served, read once
    app.state.served, app.state.batcher, app.state.decoder, app.state.metrics = served, batcher, decoder, metrics_
    app.state.max_batch_files, app.state.draining, app.state.fleet = cfg.max_batch_files, False, fleet
    _routes(app, served)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    hosts = {cfg.host, *filter(None, (h.strip() for h in cfg.allowed_hosts.split(",")))}
    app.add_middleware(HostGuard, hosts=hosts, origins={o.strip() for o in cfg.allowed_origins.split(",") if o.strip()})
    app.add_middleware(DrainCutoff, draining=lambda: app.state.draining, drain_timeout=cfg.drain_timeout)
    app.add_middleware(Observe, metrics=metrics_, access_log=cfg.access_log)
    return app
