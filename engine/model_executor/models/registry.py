"""Model registry: config.json `architectures` / `model_type` → model class (full and thinker-only names alike)."""

from __future__ import annotations

from typing import Any

from torch import nn

from omnistream.engine.model_executor.models.qwen3_omni_thinker import (
    Qwen3OmniThinkerForCausalLM,
)

_MODELS: dict[str, type[nn.Module]] = {
    "Qwen3OmniMoeForConditionalGeneration": Qwen3OmniThinkerForCausalLM,
    "Qwen3OmniMoeThinkerForConditionalGeneration": Qwen3OmniThinkerForCausalLM,
    "qwen3_omni_moe": Qwen3OmniThinkerForCausalLM,
    "qwen3_omni_moe_thinker": Qwen3OmniThinkerForCausalLM,
}


def get_model_class(raw_config: dict[str, Any]) -> type[nn.Module]:
    """The class for a config.json dict: first a matching architecture, then the model_type."""
    names = [*(raw_config.get("architectures") or []), raw_config.get("model_type")]
    for name in names:
        if name in _MODELS:
            return _MODELS[name]
    raise ValueError(f"unsupported model {names!r}; supported architectures/model types: {sorted(_MODELS)}")
