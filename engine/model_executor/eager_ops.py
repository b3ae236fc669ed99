"""Our torch custom ops, called without the dispatcher where nothing needs it.

A `torch.library.custom_op` called in eager mode goes through the dispatcher, the op's dynamo-disable wrapper
and an aliasing check of its output: several µs per call, and its first call imports torch._dynamo (over a
second on a small CPU). `EagerOp` registers the op as usual and keeps its Python body: on plain tensors in eager
mode a call runs the body itself (the same code, so the same result); under tracing
(`torch.compiler.is_compiling()`: torch.compile, export), on `meta` tensors and on tensor subclasses such as
FakeTensor it calls the registered op, whose fake implementation those need. Public torch API only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")


class EagerOp(Generic[R]):
    """A registered custom op (`.op`, named `name`) whose eager calls on plain tensors run `body` directly."""

    def __init__(self, name: str, body: Callable[..., R], mutates_args: Iterable[str] = ()) -> None:
        self.body = body
        self.op = torch.library.custom_op(name, body, mutates_args=tuple(mutates_args))

    def register_fake(self, fake: Callable[..., R]) -> Callable[..., R]:
        """Register the op's shape-only implementation (as `CustomOpDef.register_fake`)."""
        self.op.register_fake(fake)
        return fake

    def __call__(self, first: torch.Tensor, *args: Any, **kwargs: Any) -> R:
        if torch.compiler.is_compiling() or type(first) is not torch.Tensor or first.is_meta:
            return self.op(first, *args, **kwargs)
        return self.body(first, *args, **kwargs)


def eager_op(name: str, mutates_args: Iterable[str] = ()) -> Callable[[Callable[..., R]], EagerOp[R]]:
    """Decorator: `@eager_op("omnistream::name")` over the op's body, like `@torch.library.custom_op`."""

    def wrap(body: Callable[..., R]) -> EagerOp[R]:
        return EagerOp(name, body, mutates_args)

    return wrap
