"""The request path as plain functions, testable without HTTP: decode -> prepare -> classify -> answer.

Each client mistake raises a ``ClientError`` subclass that carries its own HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from ..data import DatasetInfo, prepare_image
from ..data.images import ImageError, ImageTooLarge, NothingToSee, NotAnImage, open_image
from ..inference import classify, to_prediction
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
    """The model a server answers with, loaded once per process."""

    model: torch.nn.Module
    info: DatasetInfo
    device: torch.device
    model_name: str
    dataset: str  # as shown to clients (a folder data set by its folder name only)
    max_pixels: int
    pixels_model: type[PixelsRequest]  # the JSON body's schema, sized to the model's input
    decoder: ThreadPoolExecutor  # the only threads that decode uploads: bounds the cores and memory they take

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "dataset": self.dataset,
                "class_names": list(self.info.class_names), "device": str(self.device)}


def answer(served: Served, image: torch.Tensor) -> dict[str, Any]:
    """A prepared uint8 ``(C, H, W)`` image -> the prediction body."""
    probs = classify(served.model, image.unsqueeze(0), served.info, served.device)[0]
    pred = to_prediction("", probs, served.info.class_names, top_k=3)
    return {"index": pred.index, "digit": pred.index, "label": pred.label, "confidence": round(pred.confidence, 6),
            "probabilities": pred.probabilities, "class_names": list(served.info.class_names), "top_k": pred.top_k}


def prepare(served: Served, img: Image.Image) -> torch.Tensor:
    """An image -> the model's input, prepared the way its data set was."""
    info = served.info
    try:
        return prepare_image(img, info.preprocess, info.channels, info.image_size)
    except ImageError as exc:
        raise client_error(exc, "the image") from None


def predict_image_bytes(served: Served, data: bytes) -> dict[str, Any]:
    """An uploaded image file (PNG, JPEG, WebP, GIF or BMP) -> the prediction body. Run it on
    ``served.decoder``, whose size bounds how many uploads are decoded at once."""
    try:
        img = open_image(data, served.max_pixels)
    except ImageError as exc:
        raise client_error(exc, "the upload") from None
    return answer(served, prepare(served, img))


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


def predict_pixels(served: Served, request: PixelsRequest) -> dict[str, Any]:
    """A validated JSON grid of grey levels -> the prediction body."""
    grey = np.rint(np.asarray(request.pixels, dtype=np.float64)).astype(np.uint8)  # (side, side), 0-255
    if not request.preprocess:
        return answer(served, torch.from_numpy(grey).unsqueeze(0))
    return answer(served, prepare(served, Image.fromarray(grey, mode="L")))
