"""Build a model from a checkpoint directory: config.json → registry → lazily read safetensors weights.

Owns checkpoint file discovery and name normalisation to the thinker-only form; sharding is the layers' business:
their weight loaders narrow a `CheckpointSlice`, and only the rows/columns of this rank are read from disk.
Under tensor parallelism an audio tower whose heads (or FFN width) do not divide the TP size is replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from omnistream.engine.checkpoint.model_config import (
    FULL_MODEL_TYPE,
    ThinkerConfig,
    read_model_config,
)
from omnistream.engine.model_executor import distributed, huge_pages
from omnistream.engine.model_executor.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from omnistream.engine.model_executor.models.audio_encoder import AudioEncoder
from omnistream.engine.model_executor.models.registry import get_model_class

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# read whole at every step: on transparent huge pages where the kernel offers them (huge_pages.py)
HUGE_PAGE_PARAMETERS = ("lm_head.weight",)
_NOT_THINKER = ("talker.", "code2wav.")  # the speech models' parts, loaded by speech_loader.py
_HF_INTERNAL_PREFIXES = (  # HF-5.x state_dict names → checkpoint names
    ("model.language_model.", "model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.visual.", "visual."),
)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
) -> tuple[nn.Module, ThinkerConfig]:
    """Build the registered model for `model_dir` in `dtype` (None/"auto": the checkpoint's) with the named
    attention backend (attention/selector.py), and load its weights."""
    model_dir = Path(model_dir)
    raw = read_model_config(model_dir)
    config = ThinkerConfig.from_dict(raw)
    model_dtype = resolve_dtype(dtype, config.dtype)
    with torch.device(device), default_dtype(model_dtype):
        model = _build_model(get_model_class(raw), config, attention_backend)
    for name, parameter in model.named_parameters():
        if name in HUGE_PAGE_PARAMETERS:
            huge_pages.place(parameter)  # before loading: the checkpoint's values are copied straight there
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


def _build_model(model_class: type[nn.Module], config: ThinkerConfig, attention_backend: str) -> nn.Module:
    """The model for this TP rank. Fallback: when the audio tower's heads or FFN width do not divide the TP size
    (e.g. 20 heads at TP=8), the tower is replicated on every rank (built at TP size 1, its parallel linears turned
    into plain ones so it issues no collectives) instead of failing; the decoder and vision tower stay sharded."""
    tp_size = distributed.get_tp_world_size()
    if tp_size == 1 or not config.audio_config or audio_tower_shards(config.audio_config, tp_size):
        return model_class(config, attention_backend)
    model = model_class(dataclasses.replace(config, audio_config=None), attention_backend)
    model.config = config
    with distributed.tp_group_hidden():  # so the tower's layers hold whole weights
        model.audio_tower = AudioEncoder(config.audio_config)
    for module in model.audio_tower.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.__class__ = ReplicatedLinear  # same whole weight; forward without the all-reduce/gather
    return model


def audio_tower_shards(audio_config: dict[str, Any], tp_size: int) -> bool:
    """Whether the audio tower can be split by heads over `tp_size` ranks (else it is replicated)."""
    heads, ffn = int(audio_config["encoder_attention_heads"]), int(audio_config["encoder_ffn_dim"])
    return heads % tp_size == 0 and ffn % tp_size == 0


def iter_thinker_weights(model_dir: Path, full_layout: bool) -> Iterator[tuple[str, CheckpointSlice]]:
    """Yield (thinker-only name, lazy slice); a slice is valid until the next item is requested."""
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                name = thinker_name(key, full_layout)
                if name is not None:
                    yield name, CheckpointSlice(f.get_slice(key))


class CheckpointSlice:
    """A tensor-like view of one checkpoint tensor that reads from disk only the part a weight loader keeps.

    `shape`, `narrow`, `split`, `chunk`, integer indexing and iteration over dim 0 only narrow the view; any torch
    operation on it (e.g. `param.data.copy_(slice)`) or any other tensor attribute reads exactly the viewed
    elements (`bytes_read` counts them) and proceeds on that tensor.
    """

    bytes_read = 0  # process-wide total, for measuring what sharded loading reads

    def __init__(self, source: Any, index: tuple[int | tuple[int, int], ...] | None = None) -> None:
        self._source = source
        # per checkpoint dim: an int (dropped dim) or a [start, stop) range
        self._index = index if index is not None else tuple((0, n) for n in source.get_shape())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._kept())

    @property
    def dtype(self) -> torch.dtype:
        name = self._source.get_dtype()
        return _SAFETENSORS_DTYPES[name] if name in _SAFETENSORS_DTYPES else self.materialize().dtype

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        dim = self._checkpoint_dim(dim)
        lo, hi = self._index[dim]
        if start < 0 or length < 0 or lo + start + length > hi:
            raise ValueError(f"narrow({dim}, {start}, {length}) is out of range for shape {tuple(self.shape)}")
        return self._with(dim, (lo + start, lo + start + length))

    def split(self, split_size: int | list[int], dim: int = 0) -> list[CheckpointSlice]:
        total = self.shape[dim]
        sizes = (
            list(split_size)
            if not isinstance(split_size, int)
            else [min(split_size, total - start) for start in range(0, total, split_size)]
        )
        if sum(sizes) != total:
            raise ValueError(f"split sizes {sizes} do not sum to {total}")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self.narrow(dim, start, size) for start, size in zip(starts, sizes)]

    def chunk(self, chunks: int, dim: int = 0) -> list[CheckpointSlice]:
        return self.split(math.ceil(self.shape[dim] / chunks), dim)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, int):
            dim = self._checkpoint_dim(0)
            lo, hi = self._index[dim]
            if not -(hi - lo) <= item < hi - lo:
                raise IndexError(f"index {item} is out of range for dim 0 of size {hi - lo}")
            return self._with(dim, lo + item % (hi - lo))
        return self.materialize()[item]

    def __iter__(self) -> Iterator[CheckpointSlice]:
        return (self[i] for i in range(len(self)))

    def materialize(self) -> torch.Tensor:
        """Read the viewed elements from the file (in the checkpoint's dtype)."""
        key = tuple(slice(i, i + 1) if isinstance(i, int) else slice(*i) for i in self._index)
        tensor = self._source[key].reshape(self.shape)
        CheckpointSlice.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def real(arg: Any) -> Any:
            if isinstance(arg, CheckpointSlice):
                return arg.materialize()
            if isinstance(arg, (list, tuple)):
                return type(arg)(real(a) for a in arg)
            return arg

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)  # any other tensor API works on the read values

    def __repr__(self) -> str:
        return f"CheckpointSlice(shape={tuple(self.shape)})"

    def _kept(self) -> list[tuple[int, int]]:
        return [i for i in self._index if not isinstance(i, int)]

    def _checkpoint_dim(self, dim: int) -> int:
        kept = [d for d, i in enumerate(self._index) if not isinstance(i, int)]
        if not -len(kept) <= dim < len(kept):
            raise IndexError(f"dim {dim} is out of range for a slice with {len(kept)} dims")
        return kept[dim]

    def _with(self, dim: int, value: int | tuple[int, int]) -> CheckpointSlice:
        return CheckpointSlice(self._source, self._index[:dim] + (value,) + self._index[dim + 1 :])


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
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside get `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
