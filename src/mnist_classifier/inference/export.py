"""Exports for deployment: ONNX (any runtime) and safetensors (weights without pickle).

Both carry what a consumer needs to prepare inputs: the normalisation constants, the input shape and the
class names (ONNX: in the model's ``metadata_props``; safetensors: in its string metadata).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..errors import UserError
from ..models import checkpoint

FORMATS = ("onnx", "safetensors")


def onnx_bytes(payload: dict[str, Any], opset: int = 18) -> bytes:
    """The checkpoint's model as a serialised ONNX model with a dynamic batch dimension and metadata."""
    import onnx  # optional dependency (the export extra)

    model = checkpoint.model_from_payload(payload).to("cpu", memory_format=torch.contiguous_format).eval()
    ds = payload["dataset"]
    example = torch.zeros(2, ds["channels"], ds["image_size"], ds["image_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress chatter is not for our users
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, verbose=False,
        )
    proto = program.model_proto
    for key, value in checkpoint.metadata(payload).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "mnist-classifier"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(payload: dict[str, Any], path: str | os.PathLike, opset: int = 18) -> Path:
    """Write the checkpoint's model as ONNX (``onnx_bytes``); return the path."""
    fileio.write_bytes(path, onnx_bytes(payload, opset))
    return Path(path)


def export_safetensors(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the weights as safetensors, with the model and data-set description as metadata."""
    from safetensors.torch import save  # optional dependency (the export extra)

    tensors = {k: v.contiguous() for k, v in payload["state_dict"].items()}
    fileio.write_bytes(path, save(tensors, metadata=checkpoint.metadata(payload)))
    return Path(path)


def export(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Export ``checkpoint_path`` as ``fmt``; the default output sits beside it (model.onnx, model.safetensors)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    payload = checkpoint.load(checkpoint_path)
    checkpoint.model_from_payload(payload, checkpoint_path)  # a clear error now if the weights do not fit
    target = Path(out) if out else Path(checkpoint_path).with_suffix("." + fmt)
    return export_onnx(payload, target) if fmt == "onnx" else export_safetensors(payload, target)
