"""Checkpoints that rebuild their own model and load without running code.

``model.pt`` holds the plain module's state_dict, the ModelConfig, the data set's normalisation and class
names, and a format version. ``last.pt`` adds what ``--resume`` needs: optimizer and RNG state, the epoch,
the metrics so far and the training config. Both are written atomically and read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import fileio
from ..data import DatasetInfo
from ..device import preferred_memory_format
from ..errors import UserError
from .config import ModelConfig
from .registry import ALIASES, MODELS, build_model

FORMAT = "mnist-classifier"
FORMAT_VERSION = 1
DATASET_KEYS = ("name", "class_names", "mean", "std", "channels", "image_size")
PREPROCESS_MODES = ("digit", "object", "resize")  # how a data set's own images were prepared (data.images)
MAX_CLASSES = 10_000
MAX_IMAGE_SIDE = 512  # pixels; the largest --image-size


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the underlying module, without ``torch.compile`` or DDP wrappers, on the CPU."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    inner = getattr(inner, "module", inner)  # DistributedDataParallel wrapper
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def model_payload(model: nn.Module, model_cfg: ModelConfig, info: DatasetInfo) -> dict[str, Any]:
    """Everything needed to rebuild the model and prepare its inputs."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_cfg.to_dict(),
        "dataset": info.to_dict(),
        "state_dict": plain_state_dict(model),
    }


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    fileio.torch_save(path, payload)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely. Every failure is a UserError that names the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; train one with `mnist train` or pass --checkpoint")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the model.pt inside it")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return validate(load_safetensors(path), path)
    _refuse_compressed_records(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global that is not a tensor or plain container: a crafted file stops here.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"checkpoint {path} was refused: it is not a plain weights file ({first[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes the reader raise, it is damage
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    return validate(payload, path)


def _refuse_compressed_records(path: Path) -> None:
    """torch.save stores every record uncompressed, so a record's size is bounded by the file's. A compressed
    one (a few MB inflating to gigabytes before any check could run) is refused unread."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is corrupt or truncated (not a torch zip archive: {str(exc)[:120]})") from None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UserError(f"checkpoint {path} was refused: its record {packed[0]} is compressed, which torch.save never "
                        "does (it could inflate to any size)")


def _need(ok: bool, path: str | os.PathLike, what: str) -> None:
    if not ok:
        raise UserError(f"checkpoint {path} is invalid: {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_dataset(d: Any, path: str | os.PathLike) -> None:
    _need(isinstance(d, dict) and all(k in d for k in DATASET_KEYS), path, f"'dataset' needs {', '.join(DATASET_KEYS)}")
    names, channels = d["class_names"], d["channels"]
    _need(isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES and all(
        isinstance(n, str) and 0 < len(n) <= 200 and n.isprintable() for n in names), path,  # (not surrogates)
        f"'class_names' must be 2-{MAX_CLASSES} printable UTF-8 names")
    _need(isinstance(d["name"], str), path, "the data set's 'name' must be text")
    _need(_is_number(d.get("test_fraction", 0.0)) and 0 <= d.get("test_fraction", 0.0) < 1, path,
          "'test_fraction' must be in [0, 1)")
    _need(isinstance(channels, int) and channels in (1, 3), path, "'channels' must be 1 or 3")
    _need(isinstance(d["image_size"], int) and 8 <= d["image_size"] <= MAX_IMAGE_SIDE, path,
          f"'image_size' must be 8-{MAX_IMAGE_SIDE} pixels")
    for key in ("mean", "std"):
        _need(isinstance(d[key], list) and len(d[key]) == channels and all(_is_number(v) for v in d[key]), path,
              f"'{key}' must be {channels} finite numbers")
    _need(all(v > 0 for v in d["std"]), path, "'std' must be positive (it divides every pixel)")
    _need(d.get("preprocess", "digit") in PREPROCESS_MODES, path, f"'preprocess' must be one of {', '.join(PREPROCESS_MODES)}")


def validate(payload: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check every field a checkpoint's users rely on, for .pt and .safetensors alike, before anything is
    built from it: a crafted file gets one line naming what is wrong, never a traceback or a huge allocation."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not an mnist-classifier checkpoint (no '{FORMAT}' format marker)")
    version = payload.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format version {version!r}; this mnist-classifier reads 1 to {FORMAT_VERSION}")
    for key in ("model", "dataset", "state_dict"):
        if key not in payload:
            raise UserError(f"checkpoint {path} lacks its {key!r} entry")
    model, d = payload["model"], payload["dataset"]
    _need(isinstance(model, dict) and isinstance(model.get("name"), str), path, "'model' needs a name")
    _validate_dataset(d, path)
    for key in ("in_channels", "image_size", "num_classes", "input_size"):
        _need(isinstance(model.get(key, 0), int), path, f"model '{key}' must be a whole number")
    _need(model.get("in_channels", d["channels"]) == d["channels"] and model.get("image_size", d["image_size"]) == d["image_size"],
          path, "the model's input shape differs from its data set's")
    _need(model.get("num_classes", 10) == len(d["class_names"]), path,
          f"the model has {model.get('num_classes', 10)} outputs but {len(d['class_names'])} class names")
    _need(_is_number(model.get("dropout", 0.0)) and 0 <= model.get("dropout", 0.0) < 1, path, "'dropout' must be in [0, 1)")
    _need(model.get("input_size", 0) == 0 or 16 <= model.get("input_size", 0) <= MAX_IMAGE_SIDE, path,
          f"'input_size' must be 0 or 16-{MAX_IMAGE_SIDE}")
    state = payload["state_dict"]
    _need(isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()),
          path, "'state_dict' must map names to tensors")
    return payload


def metadata(payload: dict[str, Any]) -> dict[str, str]:
    """String key -> string value metadata describing the model's inputs and outputs (ONNX and safetensors)."""
    ds = payload["dataset"]
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model": json.dumps(payload["model"]),
        "dataset": json.dumps(ds),
        "class_names": json.dumps(ds["class_names"]),
        "mean": json.dumps(ds["mean"]),
        "std": json.dumps(ds["std"]),
        "input": f"float32 (N, {ds['channels']}, {ds['image_size']}, {ds['image_size']}): pixels/255, minus mean, over std, per channel",
        "output": f"float32 (N, {len(ds['class_names'])}) logits; softmax gives probabilities",
    }


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors export as a checkpoint payload (no pickle involved at any point)."""
    # optional dependency (the export extra): only safetensors files need it
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        state = load(Path(path).read_bytes())
        with safe_open(str(path), framework="pt") as fh:  # the metadata lives in the header
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({str(exc)[:200]})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is a safetensors file without mnist-classifier metadata")
    try:
        version = meta["format_version"]
        return {
            "format": FORMAT,
            "format_version": int(version) if version.isdigit() and len(version) < 6 else version,
            "model": json.loads(meta["model"]),
            "dataset": json.loads(meta["dataset"]),
            "state_dict": state,
        }
    except (KeyError, ValueError, RecursionError) as exc:
        raise UserError(f"checkpoint {path} has unreadable metadata ({type(exc).__name__}: {str(exc)[:120]})") from None


def dataset_info(payload: dict[str, Any]) -> DatasetInfo:
    d = payload["dataset"]
    return DatasetInfo(
        name=d["name"], class_names=tuple(d["class_names"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
        channels=int(d["channels"]), image_size=int(d["image_size"]),
        # checkpoints from before --dataset: MNIST digits, no folder split
        preprocess=str(d.get("preprocess", "digit")), test_fraction=float(d.get("test_fraction", 0.0)),
    )


def model_from_payload(payload: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> nn.Module:
    """Rebuild the model and load its weights strictly; a state_dict from another architecture is a UserError."""
    cfg = ModelConfig.from_dict(payload["model"])
    if ALIASES.get(cfg.name, cfg.name) not in MODELS:
        raise UserError(f"checkpoint {path} needs model {cfg.name!r}, which this version does not have")
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"checkpoint {path} does not fit model {cfg.name!r}: {str(exc).splitlines()[0][:200]}") from None
    return model.eval()


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, DatasetInfo, dict[str, Any]]:
    """Load ``path`` into an eval-mode model on ``device``; return (model, dataset info, raw payload)."""
    payload = load(path)
    device = torch.device(device)
    model = model_from_payload(payload, path).to(device, memory_format=preferred_memory_format(device))
    return model, dataset_info(payload), payload
