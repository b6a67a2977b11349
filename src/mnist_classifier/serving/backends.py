"""What computes a batch of probabilities: the PyTorch model, or its ONNX export on onnxruntime.

Both take the same uint8 ``(B, C, H, W)`` batch, normalise it with the same torch arithmetic and apply the
same softmax, so they differ only in the network's own floating-point arithmetic.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, fileio
from ..data import DatasetInfo
from ..data.images import normalize
from ..errors import UserError
from ..inference import classify

Run = Callable[[torch.Tensor], np.ndarray]  # uint8 (B, C, H, W) -> float32 probabilities (B, classes)
CACHE_KEEP = 16  # exports kept in the cache: ~0.8 MB each for the guide's CNN, ~18 MB for EfficientNet-Lite0


def onnx_available() -> bool:
    """onnxruntime and the exporter's packages (the export extra) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "onnxscript"))


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` -> onnxruntime on a CPU where it is installed (fewer microseconds per batch, the same answers:
    BENCHMARKS.md), else torch. An explicit onnxruntime that cannot run is a one-line error."""
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" and onnx_available() else "torch"
    if name == "onnxruntime" and device.type != "cpu":
        raise UserError(f"--backend onnxruntime runs on the CPU; use --device cpu (got {device.type})")
    if name == "onnxruntime" and not onnx_available():
        raise UserError("--backend onnxruntime needs onnxruntime and the ONNX exporter: pip install 'mnist-classifier[export]'")
    return name


def torch_runner(model: torch.nn.Module, info: DatasetInfo, device: torch.device) -> Run:
    model.eval()

    def run(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return classify(model, images, info, device).numpy()

    return run


def onnx_runner(model_path: Path, info: DatasetInfo, threads: int) -> Run:
    import onnxruntime as ort  # optional dependency (the export extra)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1  # the worker's share of the cores
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> np.ndarray:
        x = normalize(images, info.mean, info.std).numpy()
        logits = session.run(None, {"images": x})[0]  # (B, classes) float32
        return F.softmax(torch.from_numpy(logits), dim=1).numpy()

    return run


def export_for_serving(payload: dict[str, Any], folder: Path) -> Path:
    """The checkpoint's ONNX export, written once (by the supervisor) for every worker to load."""
    from ..inference.export import onnx_bytes  # the exporter imports onnx: only this backend needs it

    path = folder / "model.onnx"
    fileio.write_bytes(path, onnx_bytes(payload))  # a full temporary folder: CannotWrite, and no partial file
    return path


def export_cache_dir(setting: str) -> Path | None:
    """``--export-cache``: '' -> the user's cache folder, 'off' -> None, else that folder."""
    if setting == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    return fileio.user_cache("onnx")


def export_key(checkpoint_bytes: bytes) -> str:
    """What an export depends on: the checkpoint's bytes, the exporter's code and the versions that run it."""
    from ..inference import export

    key = hashlib.sha256(checkpoint_bytes)
    onnx_version = importlib.metadata.version("onnx")  # not `import onnx`: a second of a cached start
    for part in (torch.__version__, onnx_version, __version__, Path(export.__file__).read_text(encoding="utf-8")):
        key.update(b"\0" + part.encode())
    return key.hexdigest()[:32]


def cached_export(checkpoint_path: Path, cache: Path, scratch: Path, keep: int = CACHE_KEEP) -> Path:
    """The checkpoint's export from ``cache`` when these bytes were exported before, else exported into it
    (atomically: a file there is whole). The export is made from the very bytes the key was computed from (a
    copy in ``scratch``), so a checkpoint replaced meanwhile cannot file one model's export under another's
    key. Only the ``keep`` most recently used exports stay."""
    from ..inference.export import export_onnx
    from ..models import checkpoint

    data = Path(checkpoint_path).read_bytes()
    path = cache / f"{export_key(data)}.onnx"
    if path.is_file():
        os.utime(path)  # most recently used
    else:
        copy = scratch / Path(checkpoint_path).name  # the suffix decides the reader (.pt or .safetensors)
        fileio.write_bytes(copy, data)
        export_onnx(checkpoint.load(copy), path)
    for old in sorted(cache.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]:
        old.unlink(missing_ok=True)
    return path
