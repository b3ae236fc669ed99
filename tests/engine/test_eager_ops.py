"""Our custom ops skip the dispatcher only where nothing needs it: an eager call on plain CPU tensors runs the op's
body (no `omnistream::` op reaches the dispatcher) with the registered op's result, while meta tensors and
torch.compile tracing get the registered op and its fake."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omnistream.engine.model_executor.eager_ops import EagerOp
from omnistream.engine.model_executor.layers.grouped_gemm import grouped_gemm


class OpRecorder(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _gemm_inputs(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=generator)
    w = torch.randn(3, 8, 16, generator=generator)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    return x.to(device), w.to(device), offs.to(device)


def test_an_eager_call_on_plain_tensors_runs_the_body_with_the_ops_result() -> None:
    x, w, offs = _gemm_inputs()
    with OpRecorder() as recorder:
        got = grouped_gemm(x, w, offs)
    assert not [name for name in recorder.names if name.startswith("omnistream")]
    assert torch.equal(got, grouped_gemm.op(x, w, offs))


def test_meta_tensors_get_the_registered_op_and_its_fake() -> None:
    x, w, offs = _gemm_inputs("meta")
    with OpRecorder() as recorder:
        got = grouped_gemm(x, w, offs)
    assert recorder.names == ["omnistream.grouped_gemm.default"]
    assert got.device.type == "meta" and got.shape == (10, 8)


def test_a_compiled_caller_traces_the_registered_op_not_the_body() -> None:
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    op = EagerOp("omnistream_test::double", double)
    op.register_fake(lambda x: torch.empty_like(x))
    graphs = []

    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.arange(4.0)
    assert torch.equal(torch.compile(lambda t: op(t) + 1, fullgraph=True, backend=backend)(x), x * 2 + 1)
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert torch.ops.omnistream_test.double.default in targets
