"""Weights on transparent huge pages: where the kernel offers THP, `huge_pages.empty` hands out a 2 MB-aligned
mapping advised MADV_HUGEPAGE (its VmFlags say `hg`) and the loader puts the lm_head there; where THP is off or
absent, torch's plain allocation answers, and either way the values and the greedy kernel's ids stay the same."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor import huge_pages
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.worker import greedy_kernel


def _mapping_flags(address: int) -> tuple[list[str], int] | None:
    """VmFlags and AnonHugePages (kB) of the mapping of this process that holds `address` (None: none does)."""
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        start, end = (int(x, 16) for x in block.split(None, 1)[0].split("-"))
        if start <= address < end:
            flags = re.search(r"^VmFlags:(.*)$", block, re.MULTILINE)
            huge = re.search(r"^AnonHugePages:\s+(\d+) kB", block, re.MULTILINE)
            return (flags.group(1).split() if flags else []), int(huge.group(1)) if huge else 0
    return None


@pytest.fixture
def thp_never(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_ENABLED", setting)


def test_the_thp_mode_is_the_bracketed_choice_and_none_without_the_file(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_ENABLED", setting)
    assert huge_pages.thp_mode() == "madvise"
    monkeypatch.setattr(huge_pages, "THP_ENABLED", tmp_path / "absent")
    assert huge_pages.thp_mode() is None and not huge_pages.available()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads the mapping's flags from /proc (Linux)")
def test_what_this_machine_offers_huge_pages_with_the_advice_taken_or_the_plain_allocation():
    tensor = huge_pages.empty((3 << 20,), torch.float32)  # 12 MB
    tensor.fill_(1.5)
    flags, huge_kb = _mapping_flags(tensor.data_ptr())
    if huge_pages.available():
        assert huge_pages.holds(tensor) and tensor.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
        assert "hg" in flags  # madvise(MADV_HUGEPAGE) took effect on this mapping
        print(f"THP {huge_pages.thp_mode()}: {huge_kb} kB of 12288 on huge pages")
    else:
        assert not huge_pages.holds(tensor) and "hg" not in flags
    assert tensor.sum().item() == 1.5 * (3 << 20)
    address = tensor.data_ptr()
    del tensor
    gc.collect()  # the advised mapping goes with its tensor
    after = _mapping_flags(address)
    assert after is None or "hg" not in after[0]


def test_without_thp_the_plain_allocation_is_used_and_placing_changes_nothing(thp_never):
    assert not huge_pages.available()
    tensor = huge_pages.empty((64, 32), torch.bfloat16)
    assert not huge_pages.holds(tensor) and tensor.shape == (64, 32) and tensor.dtype == torch.bfloat16
    parameter = torch.nn.Parameter(torch.randn(64, 32))
    before = parameter.data_ptr()
    huge_pages.place(parameter)
    assert parameter.data_ptr() == before


@pytest.mark.skipif(greedy_kernel.load_kernel() is None, reason="no C compiler: the kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_placed_weight_keeps_its_values_and_the_kernel_its_ids_with_or_without_prefetch(dtype):
    weight = torch.nn.Parameter(torch.randn(3001, 72, generator=torch.Generator().manual_seed(0)).to(dtype))
    plain = weight.data.clone()
    huge_pages.place(weight)
    assert huge_pages.holds(weight.data) == huge_pages.available()
    assert torch.equal(weight.data, plain)
    for rows in (1, 5, 8, 33):
        hidden = torch.randn(rows, 72, generator=torch.Generator().manual_seed(rows)).to(dtype)
        want = greedy_kernel.greedy_max(plain, hidden)
        for prefetch in (None, True, False):
            values, ids = greedy_kernel.greedy_max(weight.data, hidden, prefetch=prefetch)
            assert torch.equal(ids, want[1]) and torch.equal(values, want[0])


def test_the_loader_puts_the_lm_head_on_huge_pages_where_offered_with_the_checkpoint_values():
    model, _ = load_model(default_model_path(), "float32")
    weight = model.lm_head.weight
    assert huge_pages.holds(weight.data) == huge_pages.available()
    stored = load_file(default_model_path() / "model.safetensors")
    assert torch.equal(weight.data, next(t for key, t in stored.items() if key.endswith("lm_head.weight")).float())
