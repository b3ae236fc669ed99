"""The model's forward never asks the host anything (docs hot-path.md §2): built on the `meta` device, the thinker
runs a mixed step (prefill chunks over cached prefixes beside decodes) and a decode step, with each attention backend,
under a dispatch-mode tripwire that fails on any op producing a host tensor; any data-dependent op (.item(),
.tolist(), nonzero, boolean masks, bincount) raises on meta by itself. A forward compiled with fullgraph=True and
dynamic shapes does not recompile for another batch mix, and equals the eager forward."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.model_config import ThinkerConfig, read_model_config
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.model_executor.models.qwen3_omni_thinker import Qwen3OmniThinkerForCausalLM

BLOCK = 16
BACKENDS = ["reference", "cpu", "triton"]
# (context before the step, new tokens) per request
MIXED = [(0, 21), (40, 9), (130, 1), (17, 1), (300, 1)]
DECODE = [(5, 1), (64, 1), (199, 1)]


class HostTensorTripwire(TorchDispatchMode):
    """Fails on the first op inside it whose output is a host (CPU) tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                raise AssertionError(f"{func} made a host tensor inside the forward")
        return out


def _step(model: Qwen3OmniThinkerForCausalLM, shapes: list[tuple[int, int]], device: str):
    """Inputs of one step: ids, 3-D positions, metadata (pages in a scrambled order) on `device`."""
    tables, next_page = [], 1
    width = max(-(-(past + new) // BLOCK) for past, new in shapes)
    for past, new in shapes:
        pages = -(-(past + new) // BLOCK)
        tables.append(list(range(next_page + pages - 1, next_page - 1, -1)) + [0] * (width - pages))
        next_page += pages
    metadata = AttentionMetadata.build([n for _, n in shapes], [p + n for p, n in shapes], tables, BLOCK, device)
    positions = torch.cat([torch.arange(p, p + n) for p, n in shapes]).float().expand(3, -1).to(device)
    ids = torch.randint(0, model.config.text.vocab_size, (metadata.num_tokens,)).to(device)
    return ids, positions, metadata


def _meta_forward(backend: str, shapes: list[tuple[int, int]]) -> torch.Tensor:
    config = ThinkerConfig.from_dict(read_model_config(default_model_path()))
    with torch.device("meta"):
        model = Qwen3OmniThinkerForCausalLM(config, attention_backend=backend)
    assert model.attention_backend == backend
    caches = [torch.empty(model.kv_cache_shape_per_layer(64, BLOCK), device="meta") for _ in range(model.num_layers)]
    ids, positions, metadata = _step(model, shapes, "meta")
    with torch.inference_mode(), HostTensorTripwire():
        return model(ids, positions, caches, metadata)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [MIXED, DECODE], ids=["mixed", "decode"])
def test_the_forward_runs_on_meta_and_makes_no_host_tensor(backend, shapes) -> None:
    hidden = _meta_forward(backend, shapes)
    assert hidden.device.type == "meta" and hidden.shape[0] == sum(n for _, n in shapes)


def test_the_tripwire_catches_a_host_tensor_and_meta_catches_a_read_back() -> None:
    x = torch.ones(3, device="meta")
    with pytest.raises(AssertionError, match="host tensor"), HostTensorTripwire():
        x + torch.tensor([1.0, 2.0, 3.0]).sum()
    with pytest.raises((RuntimeError, NotImplementedError)):
        x.nonzero().shape[0] + int(x.sum().item())


def test_a_compiled_forward_does_not_recompile_for_another_batch_mix() -> None:
    torch._dynamo.reset()
    model = load_model(default_model_path(), "float32")[0]
    assert model.attention_backend == "cpu"
    caches = [torch.zeros(model.kv_cache_shape_per_layer(64, BLOCK)) for _ in range(model.num_layers)]
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        first = _step(model, MIXED, "cpu")
        compiled(first[0], first[1], caches, first[2])
        second = _step(model, DECODE + [(8, 30), (0, 2)], "cpu")
        want = model(second[0], second[1], [c.clone() for c in caches], second[2])
        with torch.compiler.set_stance("fail_on_recompile"):
            got = compiled(second[0], second[1], caches, second[2])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
