"""The HTTP service: a drawing page, ``POST /predict`` and ``GET /health``, with FastAPI and uvicorn.

The routes are plain module-level functions; ``create_app`` loads the model and the page once, registers the
routes and adds the edge middleware (Host/Origin guard, body limit). Uploads are decoded on a pool of one
thread per core, so a large one never stalls the event loop and a flood of them cannot take more than those
cores. Every bad request gets a 4xx with a JSON body ``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..config import ServeConfig
from ..device import select_device
from ..models import load_model
from ..runs import latest_checkpoint
from .handlers import (BadRequest, ClientError, PayloadTooLarge, Served, UnsupportedMediaType, Unprocessable,
                       parse_pixels, predict_image_bytes, predict_pixels)
from .limits import BodyLimit, HostGuard
from .protocol import with_header_timeout
from .schemas import HealthResponse, PixelsRequest, PredictionResponse, Problem, pixels_request

PAGE = resources.files("mnist_classifier").joinpath("static/index.html")


async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


async def health(request: Request) -> dict[str, Any]:
    """Liveness, and which model is loaded."""
    return request.app.state.served.health()


async def _upload(request: Request) -> bytes:
    """The bytes of the multipart field ``file``."""
    try:
        form = await request.form(max_files=1, max_fields=4)
    except (ClientError, ClientDisconnect):
        raise  # the body limit while the parser read the stream, or a client gone: the middleware answers
    except Exception as exc:  # noqa: BLE001 - malformed multipart from the parser, whatever its type
        raise BadRequest(f"malformed multipart body ({str(exc)[:120] or type(exc).__name__})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise Unprocessable("multipart body needs a file field named 'file'")
    return await upload.read()


async def _decode(served: Served, data: bytes) -> dict[str, Any]:
    """Decode, prepare and classify an upload on the decoder threads (queued when all are busy)."""
    return await asyncio.get_running_loop().run_in_executor(served.decoder, predict_image_bytes, served, data)


async def predict(request: Request) -> dict[str, Any]:
    """Classify an uploaded image (multipart field ``file``, or a raw image body) or a JSON grid of pixels."""
    served: Served = request.app.state.served
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _decode(served, await _upload(request))
    if ctype == "application/json":
        return await run_in_threadpool(predict_pixels, served, parse_pixels(served, await request.body()))
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await _decode(served, await request.body())
    raise UnsupportedMediaType("send multipart/form-data with a 'file', an image body, or JSON {'pixels': [[...]]}")


def _predict_openapi(pixels_model: type[PixelsRequest]) -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": pixels_model.model_json_schema()},
        "image/png": binary, "image/jpeg": binary,
    }}}


async def _client_error(_request: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def create_app(cfg: ServeConfig) -> FastAPI:
    """The app, with the model of ``cfg.checkpoint`` (default: the newest run's) loaded once."""
    cfg.validate()
    device = select_device(cfg.device)
    model, info, payload = load_model(cfg.checkpoint or latest_checkpoint(), device)
    name = payload["model"]["name"]
    # a folder data set is named by its folder only: the absolute path stays on this machine
    dataset = f"folder:{Path(info.name.removeprefix('folder:')).name}" if info.name.startswith("folder:") else info.name
    app = FastAPI(title="mnist-classifier", version=__version__,
                  description=f"Classification with {name} trained on {dataset}. The /docs page loads its "
                              "script from a CDN and needs internet; /openapi.json is served from here.")
    decoder = ThreadPoolExecutor(cfg.max_decodes or os.cpu_count() or 1, thread_name_prefix="decode")
    app.state.page = PAGE.read_text(encoding="utf-8")  # the only file served, read once
    app.state.served = served = Served(model, info, device, name, dataset, cfg.max_pixels,
                                       pixels_request(info.image_size), decoder)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], response_model=HealthResponse)
    problems = {c.status: {"model": Problem, "description": d} for c, d in (
        (BadRequest, "not a decodable image, or not JSON"), (PayloadTooLarge, "body or image too large"),
        (UnsupportedMediaType, "unsupported content type"), (Unprocessable, "no digit, or malformed pixels"))}
    app.add_api_route("/predict", predict, methods=["POST"], response_model=PredictionResponse,
                      openapi_extra=_predict_openapi(served.pixels_model), responses=problems)
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    hosts = {cfg.host, *filter(None, (h.strip() for h in cfg.allowed_hosts.split(",")))}
    app.add_middleware(HostGuard, hosts=hosts, origins={o.strip() for o in cfg.allowed_origins.split(",") if o.strip()})
    return app


def serve(cfg: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted; SIGTERM lets requests in flight finish for up to 5 s."""
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info", http=with_header_timeout(cfg.header_timeout),
                timeout_keep_alive=cfg.keep_alive, timeout_graceful_shutdown=5)
