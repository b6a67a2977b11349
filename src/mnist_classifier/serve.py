"""An HTTP service: a drawing page, ``POST /predict`` and ``GET /health``, with FastAPI and uvicorn.

The model is loaded once when the app is built; inference runs without autograd in a worker thread so a
large upload being decoded never stalls the event loop. Every bad request gets a 4xx with a JSON body
``{"detail": "..."}``.
"""


import json
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import ServeConfig
from .preprocess import ImageError, open_image, prepare_image


class HTTPProblem(Exception):
    """A client error: status code and message, sent as JSON."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (by Content-Length, or while streaming) with 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = json.dumps({"detail": f"request body is larger than {self.max_bytes} bytes"}).encode()
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_json(send, 413 if length.isdigit() else 400, too_big if length.isdigit()
                                    else b'{"detail": "invalid Content-Length"}')
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPProblem(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPProblem as exc:
            if not started:
                await _send_json(send, exc.status, json.dumps({"detail": exc.detail}).encode())


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


_PIXELS_SCHEMA = {
    "type": "object",
    "required": ["pixels"],
    "properties": {
        "pixels": {
            "type": "array", "minItems": 28, "maxItems": 28,
            "items": {"type": "array", "minItems": 28, "maxItems": 28, "items": {"type": "number", "minimum": 0, "maximum": 255}},
            "description": "28 rows of 28 grey levels, 0-255, either polarity",
        },
        "preprocess": {"type": "boolean", "default": True,
                       "description": "crop, scale and centre like MNIST (false: use the 28x28 pixels as they are, white on black)"},
    },
}


def create_app(cfg: ServeConfig):
    """Build the FastAPI app with the model loaded once."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__, checkpoint, runs
    from .device import select_device
    from .predict import classify, to_prediction

    cfg.validate()
    device = select_device(cfg.device)
    ckpt = cfg.checkpoint or str(runs.latest_checkpoint())
    model, info, payload = checkpoint.load_model(ckpt, device)
    side = info.image_size
    page = resources.files("mnist_classifier").joinpath("static/index.html").read_text(encoding="utf-8")

    app = FastAPI(
        title="mnist-classifier",
        version=__version__,
        description=f"Digit classification with {payload['model']['name']} trained on {info.name}.",
    )

    @app.exception_handler(HTTPProblem)
    async def _problem(_request, exc: HTTPProblem):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return JSONResponse({"detail": "invalid request", "errors": json.loads(json.dumps(exc.errors(), default=str))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    def run_model(digit: torch.Tensor) -> dict[str, Any]:
        probs = classify(model, digit.unsqueeze(0), info, device)[0]
        pred = to_prediction("", probs, info.class_names, top_k=3)
        return {"digit": pred.digit, "label": pred.label, "confidence": round(pred.confidence, 6),
                "probabilities": pred.probabilities, "class_names": list(info.class_names), "top_k": pred.top_k}

    def from_image_bytes(data: bytes) -> dict[str, Any]:
        try:
            img = open_image(data, cfg.max_pixels)
        except ImageError as exc:
            status = 413 if "too large" in str(exc) else 400
            raise HTTPProblem(status, f"the upload {exc}") from None
        return run_model(_prepared_or_422(img, info))

    def from_pixels(body: Any) -> dict[str, Any]:
        if info.channels != 1:
            raise HTTPProblem(422, f"this {info.name} model takes colour images: upload an image file instead of 'pixels'")
        if not isinstance(body, dict) or "pixels" not in body:
            raise HTTPProblem(422, f"expected a JSON object with 'pixels': {side} rows of {side} numbers 0-255")
        try:
            arr = np.asarray(body["pixels"], dtype=np.float64)
        except (TypeError, ValueError):
            raise HTTPProblem(422, f"'pixels' must be {side} rows of {side} numbers") from None
        if arr.shape != (side, side):
            raise HTTPProblem(422, f"'pixels' must be {side}x{side}, got shape {list(arr.shape)}")
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
            raise HTTPProblem(422, "'pixels' values must be numbers from 0 to 255")
        preprocess = body.get("preprocess", True)
        if not isinstance(preprocess, bool):
            raise HTTPProblem(422, "'preprocess' must be true or false")
        grey = np.rint(arr).astype(np.uint8)
        if not preprocess:
            return run_model(torch.from_numpy(grey).unsqueeze(0))
        return run_model(_prepared_or_422(Image.fromarray(grey, mode="L"), info))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and which model is loaded."""
        return {"status": "ok", "model": payload["model"]["name"], "dataset": info.name,
                "class_names": list(info.class_names), "device": str(device)}

    @app.post(
        "/predict",
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/json": {"schema": _PIXELS_SCHEMA},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        }}},
        responses={400: {"description": "not a decodable image"}, 413: {"description": "body or image too large"},
                   415: {"description": "unsupported content type"}, 422: {"description": "no digit, or malformed pixels"}},
    )
    async def predict(request: Request) -> dict[str, Any]:
        """Classify an uploaded image (multipart field ``file``, or a raw image body) or a JSON 28x28 array."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as exc:  # malformed multipart from the parser, whatever its type
                raise HTTPProblem(400, f"malformed multipart body ({str(exc)[:120] or type(exc).__name__})") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPProblem(422, "multipart body needs a file field named 'file'")
            data = await upload.read()
            return await run_in_threadpool(from_image_bytes, data)
        if ctype == "application/json":
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise HTTPProblem(400, "body is not valid JSON") from None
            return await run_in_threadpool(from_pixels, body)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await run_in_threadpool(from_image_bytes, await request.body())
        raise HTTPProblem(415, "send multipart/form-data with a 'file', an image body, or JSON {'pixels': [[...]]}")

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    return app


def _prepared_or_422(img: Image.Image, info) -> torch.Tensor:  # noqa: ANN001 - a DatasetInfo
    try:
        return prepare_image(img, info.preprocess, info.channels, info.image_size)
    except ImageError as exc:
        raise HTTPProblem(422, f"the image {exc}") from None


def serve(cfg: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info")
