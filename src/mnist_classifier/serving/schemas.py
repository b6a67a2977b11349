"""The request and response bodies of the HTTP API as pydantic models: the OpenAPI schema and the validation
of a JSON request both come from here."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, create_model

GreyLevel = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]


class PixelsRequest(BaseModel):
    """A grey image as JSON. ``pixels_request(side)`` narrows the grid to the served model's input size."""

    model_config = ConfigDict(extra="forbid")

    pixels: list[list[GreyLevel]] = Field(description="rows of grey levels, 0-255, either polarity")
    preprocess: bool = Field(True, description="crop, scale and centre like the training images (false: use the "
                                               "pixels as they are, white on black)")


def pixels_request(side: int) -> type[PixelsRequest]:
    """``PixelsRequest`` with exactly ``side`` rows of ``side`` numbers (28 for MNIST models)."""
    row = Annotated[list[GreyLevel], Field(min_length=side, max_length=side)]
    grid = Annotated[list[row], Field(min_length=side, max_length=side,  # type: ignore[valid-type]
                                      description=f"{side} rows of {side} grey levels, 0-255, either polarity")]
    return create_model(f"Pixels{side}Request", __base__=PixelsRequest, pixels=(grid, ...))


class TopClass(BaseModel):
    label: str
    index: int
    probability: float


class PredictionResponse(BaseModel):
    index: int = Field(description="class index into class_names")
    digit: int = Field(description="the same as index (kept for clients written for MNIST)")
    label: str
    confidence: float = Field(description="probability of the top class, 0-1")
    probabilities: list[float]
    class_names: list[str]
    top_k: list[TopClass]


class ItemError(BaseModel):
    error: str = Field(description="why this image got no prediction")
    status: int = Field(description="the HTTP status the image alone would have got")


class BatchResponse(BaseModel):
    predictions: list[PredictionResponse | ItemError] = Field(description="one per uploaded file, in order")


class HealthResponse(BaseModel):
    status: str
    model: str
    dataset: str
    class_names: list[str]
    device: str
    backend: str = Field(description="what runs the network: torch or onnxruntime")
    worker_pid: int = Field(description="the worker process that answered")


class Status(BaseModel):
    status: str


class Readiness(Status):
    workers_ready: int | None = None  # several workers: how many are ready (listening, model loaded)
    workers: int | None = None  # ... of how many


class Problem(BaseModel):
    detail: str
