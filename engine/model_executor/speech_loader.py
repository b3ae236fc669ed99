"""Build and load the speech models (talker with its code predictor, code2wav) from a full Qwen3-Omni
checkpoint.

Only when config.json enables audio output; it reads only the `talker.*` and `code2wav.*` tensors (and only
the files that hold them), so the thinker's load path and memory are untouched. The models are built whole (at
TP size 1): in v1 the speech lane runs on rank 0, and its forwards run under `tp_group_hidden()` as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from omnistream.engine.checkpoint.model_config import ThinkerConfig, read_model_config
from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.model_executor import distributed
from omnistream.engine.model_executor.loader import (
    CheckpointSlice,
    checkpoint_files,
    default_dtype,
    resolve_dtype,
)
from omnistream.engine.model_executor.models.code2wav import Code2Wav
from omnistream.engine.model_executor.models.talker import Talker

_PARTS = ("talker.", "code2wav.")


class SpeechModels(NamedTuple):
    config: SpeechConfig
    talker: Talker
    code2wav: Code2Wav


def load_speech_models(
    model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> SpeechModels | None:
    """The speech models of `model_dir` in `dtype` (None/"auto": the checkpoint's), or None when its
    config.json does not enable audio output. Raises ValueError for a missing or unexpected speech tensor."""
    model_dir = Path(model_dir)
    raw = read_model_config(model_dir)
    config = SpeechConfig.from_dict(raw)
    if config is None:
        return None
    thinker_hidden = ThinkerConfig.from_dict(raw).text.hidden_size
    if config.talker.thinker_hidden_size != thinker_hidden:
        raise ValueError(
            f"talker_config.thinker_hidden_size ({config.talker.thinker_hidden_size}) must equal the "
            f"thinker's hidden_size ({thinker_hidden})"
        )
    model_dtype = resolve_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype"))
    with torch.device(device), default_dtype(model_dtype), distributed.tp_group_hidden():
        talker, code2wav = Talker(config.talker), Code2Wav(config.code2wav)
    loaded = {
        "talker.": talker.load_weights(_part_weights(model_dir, "talker.")),
        "code2wav.": code2wav.load_weights(_part_weights(model_dir, "code2wav.")),
    }
    for prefix, model in (("talker.", talker), ("code2wav.", code2wav)):
        missing = sorted(prefix + name for name, _ in model.named_parameters() if name not in loaded[prefix])
        if missing:
            raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} speech weights: {missing[:10]}")
    return SpeechModels(config, talker.eval(), code2wav.eval())


def _speech_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold speech tensors (all of them when there is no index to say)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        return checkpoint_files(model_dir)
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    return [model_dir / name for name in sorted({v for k, v in weight_map.items() if k.startswith(_PARTS)})]


def _part_weights(model_dir: Path, prefix: str) -> Iterator[tuple[str, CheckpointSlice]]:
    """(name relative to `prefix`, lazy slice) for every checkpoint tensor under `prefix`."""
    for path in _speech_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    yield key.removeprefix(prefix), CheckpointSlice(f.get_slice(key))
