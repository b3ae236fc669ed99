"""SnakeBeta keeps e^α and 1 / (e^β + 1e-9) between calls: its output is the formula's for the weights it has
now, also after they are loaded or changed in place, and for inference tensors (never cached)."""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.layers.snake import SnakeBeta


def _formula(snake: SnakeBeta, x: torch.Tensor) -> torch.Tensor:
    alpha, beta = snake.alpha.view(1, -1, 1).exp(), snake.beta.view(1, -1, 1).exp()
    return x + torch.sin(x * alpha) ** 2 / (beta + 1e-9)


def test_the_cached_scales_follow_every_change_of_the_weights():
    torch.manual_seed(0)
    snake, x = SnakeBeta(6), torch.randn(2, 6, 40)
    assert torch.equal(snake(x), _formula(snake, x))
    with torch.no_grad():
        snake.load_state_dict({"alpha": torch.randn(6), "beta": torch.randn(6)})
    first = snake(x)
    assert torch.allclose(first, _formula(snake, x), atol=1e-6) and torch.equal(snake(x), first)
    with torch.inference_mode():
        snake.alpha.mul_(0.5)  # in place: the version counter moves
        assert torch.allclose(snake(x), _formula(snake, x), atol=1e-6) and not torch.equal(snake(x), first)
    snake.double()  # new tensors
    assert torch.allclose(snake(x.double()), _formula(snake, x.double()), atol=1e-12)


def test_weights_made_in_inference_mode_are_never_cached():
    with torch.inference_mode():
        snake, x = SnakeBeta(4), torch.randn(1, 4, 10)
        assert snake.alpha.is_inference()
        before = snake(x)
        snake.beta.fill_(1.0)
        assert torch.allclose(snake(x), _formula(snake, x), atol=1e-6) and not torch.equal(snake(x), before)
