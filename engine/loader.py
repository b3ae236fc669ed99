"""Build a model from a checkpoint directory: config.json → registry → lazily streamed safetensors weights.

Owns checkpoint file discovery and name normalisation to the thinker-only form; sharding is the layers' business.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from omnistream.engine.config import FULL_MODEL_TYPE, ThinkerConfig
from omnistream.engine.models.registry import get_model_class

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NOT_THINKER = ("talker.", "code2wav.")  # full-checkpoint parts that are out of scope
_HF_INTERNAL_PREFIXES = (  # HF-5.x state_dict names → checkpoint names
    ("model.language_model.", "model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.visual.", "visual."),
)


def load_model(
    model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ThinkerConfig]:
    """Build the registered model for `model_dir` in `dtype` (None/"auto": the checkpoint's) and load its weights."""
    model_dir = Path(model_dir)
    with open(model_dir / "config.json") as f:
        raw = json.load(f)
    config = ThinkerConfig.from_dict(raw)
    model_dtype = resolve_dtype(dtype, config.dtype)
    with torch.device(device), _default_dtype(model_dtype):
        model = get_model_class(raw)(config)
    full_layout = raw.get("model_type") == FULL_MODEL_TYPE or "thinker_config" in raw
    loaded = model.load_weights(iter_thinker_weights(model_dir, full_layout))
    missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for {len(missing)} parameters: {missing[:10]}")
    return model.eval(), config


def resolve_dtype(dtype: torch.dtype | str | None, checkpoint_dtype: str | None) -> torch.dtype:
    """A torch dtype from a dtype, its name, or None/"auto" (the checkpoint's dtype field, else float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose one of {sorted(_DTYPES)}")
        return dtype
    name = (checkpoint_dtype or "float32") if dtype in (None, "auto") else dtype
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def iter_thinker_weights(model_dir: Path, full_layout: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (thinker-only name, tensor), reading from disk only the tensors that are kept."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                name = thinker_name(key, full_layout)
                if name is not None:
                    yield name, f.get_tensor(key)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files: those listed by model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [model_dir / name for name in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    return files


def thinker_name(key: str, full_layout: bool) -> str | None:
    """Checkpoint key → thinker-only name, or None for talker/code2wav tensors."""
    if key.startswith(_NOT_THINKER):
        return None
    if full_layout:
        if not key.startswith("thinker."):
            raise ValueError(
                f"unexpected tensor {key!r} in a full Qwen3-Omni checkpoint (expected thinker./talker./code2wav.)"
            )
        key = key.removeprefix("thinker.")
    for old, new in _HF_INTERNAL_PREFIXES:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
