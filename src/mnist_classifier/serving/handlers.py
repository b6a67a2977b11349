"""The request path as plain functions, testable without HTTP: probe -> decode -> prepare -> (batch) -> answer.

Each client mistake raises a ``ClientError`` subclass that carries its own HTTP status.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from ..data import DatasetInfo, prepare_image
from ..data.decode import ImageError, ImageTooLarge, NothingToSee, NotAnImage, decode_image, probe_image
from ..inference import to_prediction
from .schemas import PixelsRequest


class ClientError(Exception):
    """A request the server cannot answer, for a reason the client can fix; ``status`` is its HTTP code."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(ClientError):
    status = 400


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class Unprocessable(ClientError):
    status = 422


# Each kind of image problem -> the client error it is: unreadable 400, too big 413, nothing in it 422.
_IMAGE_ERRORS: dict[type[ImageError], type[ClientError]] = {
    NotAnImage: BadRequest, ImageTooLarge: PayloadTooLarge, NothingToSee: Unprocessable,
}


def client_error(exc: ImageError, what: str) -> ClientError:
    return _IMAGE_ERRORS.get(type(exc), BadRequest)(f"{what} {exc}")


@dataclass
class Served:
    """The model a server answers with, loaded once per process, and what bounds the work per request."""

    run: Callable[[torch.Tensor], np.ndarray]  # uint8 (B, C, H, W) -> probabilities (B, classes)
    backend: str  # "torch" or "onnxruntime"
    info: DatasetInfo
    device: torch.device
    model_name: str
    dataset: str  # as shown to clients (a folder data set by its folder name only)
    max_pixels: int
    pixels_model: type[PixelsRequest]  # the JSON body's schema, sized to the model's input

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "dataset": self.dataset,
                "class_names": list(self.info.class_names), "device": str(self.device), "backend": self.backend,
                "worker_pid": os.getpid()}


def answer(served: Served, probs: np.ndarray, top_k: int = 3) -> dict[str, Any]:
    """One image's probabilities ``(classes,)`` -> the prediction body: `mnist predict`'s JSON without the path,
    plus every class's probability and name."""
    prediction = to_prediction("", torch.from_numpy(probs), served.info.class_names, top_k)
    body = prediction.to_json()
    del body["path"], body["low_confidence"]
    return {**body, "probabilities": prediction.probabilities, "class_names": list(served.info.class_names)}


def prepare(served: Served, img: Image.Image) -> torch.Tensor:
    """A decoded image -> the model's uint8 ``(C, H, W)`` input, prepared the way its data set was."""
    info = served.info
    try:
        return prepare_image(img, info.preprocess, info.channels, info.image_size)
    except ImageError as exc:
        raise client_error(exc, "the image") from None


def probe_upload(served: Served, data: bytes) -> Image.Image:
    """Check an upload's header (format, size, cost); cheap enough for the event loop."""
    try:
        return probe_image(data, served.max_pixels)
    except ImageError as exc:
        raise client_error(exc, "the upload") from None


def prepare_upload(served: Served, img: Image.Image) -> torch.Tensor:
    """Decode a probed upload and prepare it; the costly part, bounded by the probe's checks."""
    try:
        img = decode_image(img, served.max_pixels)
    except ImageError as exc:
        raise client_error(exc, "the upload") from None
    return prepare(served, img)


def parse_pixels(served: Served, raw: bytes) -> PixelsRequest:
    """A JSON body -> the validated request; a grey-image model only (colour models take image files)."""
    if served.info.channels != 1:
        raise Unprocessable(f"this {served.info.name} model takes colour images: upload an image file instead of 'pixels'")
    try:
        return served.pixels_model.model_validate_json(raw)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest("body is not valid JSON") from None
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise Unprocessable(f"{where}: {first['msg']} (expected {{'pixels': rows of grey levels 0-255}})") from None


def prepare_pixels(served: Served, request: PixelsRequest) -> torch.Tensor:
    """A validated JSON grid of grey levels -> the model's uint8 ``(1, H, W)`` input."""
    grey = np.rint(np.asarray(request.pixels, dtype=np.float64)).astype(np.uint8)  # (side, side), 0-255
    if not request.preprocess:
        return torch.from_numpy(grey).unsqueeze(0)
    return prepare(served, Image.fromarray(grey, mode="L"))
