"""The compiled log-mel passes (mel_kernel.c): built on first use with the system C compiler, cached, called by ctypes.

Kernels (`active_kernel()`), best first:
- "c-mkl": the compiled passes call MKL's rfft themselves, through the DFTI entry points that torch's own library
  exports (x86 builds of torch with MKL); checked once at load to give the same floats as the "c" kernel.
- "c": the compiled passes around `torch.fft.rfft` (window; then power, mel, log10, max and scaling).
- "torch": `mel` uses its pure-torch path: no working C compiler, or `OMNISTREAM_MEL_KERNEL=torch`.
`OMNISTREAM_MEL_KERNEL` is "auto" (default), "c" (never call MKL directly) or "torch". The shared library is
compiled once per source, compiler and CPU into the project cache dir by `native_build.build_shared_library`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import subprocess
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from omnistream.multimodal.mel_filters import hann_window, mel_filters
from omnistream.multimodal.native_build import build_shared_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mel_kernel.c")
ENV_KERNEL = "OMNISTREAM_MEL_KERNEL"
_MKL_FUNCTIONS = ("DftiCreateDescriptor_s_1d", "DftiSetValue", "DftiCommitDescriptor", "DftiComputeForward",
                  "DftiFreeDescriptor")
_lock = threading.Lock()


@dataclass(frozen=True)
class _Kernel:
    library: ctypes.CDLL
    mkl: bool  # mel_kernel_frames may be called (MKL's DFTI handed over and checked)


def active_kernel() -> str:
    """"c-mkl", "c" or "torch": which implementation `mel._log_mel_into` uses (see the module docstring)."""
    kernel = _kernel()
    return "torch" if kernel is None else "c-mkl" if kernel.mkl else "c"


def log_mel_into(frames: torch.Tensor, out: torch.Tensor, windowed: torch.Tensor | None, scaled: bool) -> float:
    """Frames [n, 400] into out [128, n] with the compiled kernel: log10 mel, or log10 mel / 4 + 1 when `scaled`.

    `windowed` is contiguous float32 scratch of at least [n, 400] for the "c" kernel (None: allocated here).
    Returns the max of the unscaled log10 values (-inf for no frames). Needs `active_kernel() != "torch"`.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the compiled log-mel kernel is not available")
    n = frames.shape[0]
    if frames.dtype != torch.float32 or out.dtype != torch.float32:
        raise TypeError(f"log-mel kernel: float32 frames and output needed, got {frames.dtype} and {out.dtype}")
    if frames.shape[1:] != (400,) or out.shape != (128, n):
        raise ValueError(f"log-mel kernel: frames [n, 400] and out [128, n] needed, got {tuple(frames.shape)} "
                         f"and {tuple(out.shape)}")
    if out.stride(1) != 1 or out.stride(0) < n:
        raise ValueError(f"log-mel kernel: out needs unit column stride and rows of stride >= {n}, got {out.stride()}")
    if n == 0:
        return float("-inf")
    if frames.stride(1) != 1 or frames.stride(0) < 1:
        frames = frames.contiguous()
    if kernel.mkl:
        peak = kernel.library.mel_kernel_frames(frames.data_ptr(), frames.stride(0), n, out.data_ptr(),
                                                out.stride(0), int(scaled))
        if not math.isnan(peak):
            return peak
        logger.warning("log-mel: MKL call failed for %d frames; redone around torch.fft.rfft", n)
    return _two_passes(kernel.library, frames, out, windowed, scaled)


def _two_passes(library: ctypes.CDLL, frames: torch.Tensor, out: torch.Tensor, windowed: torch.Tensor | None,
                scaled: bool) -> float:
    n = frames.shape[0]
    windowed = torch.empty(n, 400) if windowed is None else windowed[:n]
    if windowed.dtype != torch.float32 or windowed.shape != (n, 400) or not windowed.is_contiguous():
        raise ValueError(f"log-mel kernel: contiguous float32 scratch [>={n}, 400] needed, got {windowed.dtype} "
                         f"{tuple(windowed.shape)} strides {windowed.stride()}")
    library.mel_kernel_window(frames.data_ptr(), frames.stride(0), n, windowed.data_ptr())
    spectrum = torch.fft.rfft(windowed)
    return library.mel_kernel_mel(spectrum.data_ptr(), n, out.data_ptr(), out.stride(0), int(scaled))


def _kernel() -> _Kernel | None:
    """The loaded and initialised kernel, or None (forced off, or no compiler: logged once)."""
    with _lock:
        return _load()


@lru_cache(maxsize=1)
def _load() -> _Kernel | None:
    choice = os.environ.get(ENV_KERNEL, "auto")
    if choice not in ("auto", "c", "torch"):
        raise ValueError(f"{ENV_KERNEL} must be 'auto', 'c' or 'torch', got {choice!r}")
    if choice == "torch":
        logger.info("log-mel: %s=torch, using the pure-torch path", ENV_KERNEL)
        return None
    try:
        library = ctypes.CDLL(str(build_shared_library(SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("log-mel: compiled kernel unavailable (%s); using the pure-torch path", exc)
        return None
    library.mel_kernel_init.restype = None
    library.mel_kernel_init.argtypes = [ctypes.c_void_p] * 4
    library.mel_kernel_window.restype = None
    library.mel_kernel_window.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    library.mel_kernel_mel.restype = ctypes.c_float
    library.mel_kernel_mel.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int32]
    library.mel_kernel_use_mkl.restype = None
    library.mel_kernel_use_mkl.argtypes = [ctypes.c_void_p] * len(_MKL_FUNCTIONS)
    library.mel_kernel_frames.restype = ctypes.c_float
    library.mel_kernel_frames.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int64, ctypes.c_int32]
    _initialise(library)
    return _Kernel(library, choice == "auto" and _hand_over_mkl(library))


def _hand_over_mkl(library: ctypes.CDLL) -> bool:
    """Give the kernel MKL's DFTI from torch's library and check it reproduces the two passes bit for bit."""
    addresses = _mkl_addresses()
    if addresses is None:
        logger.info("log-mel: MKL's DFTI not found in torch's library; the kernel calls torch.fft.rfft")
        return False
    library.mel_kernel_use_mkl(*addresses)
    frames = torch.randn(3 * 64 + 5, 400, generator=torch.Generator().manual_seed(0))  # full and single transforms
    direct, two_passes = torch.empty(128, frames.shape[0]), torch.empty(128, frames.shape[0])
    peak = library.mel_kernel_frames(frames.data_ptr(), 400, frames.shape[0], direct.data_ptr(), frames.shape[0], 0)
    _two_passes(library, frames, two_passes, None, False)
    if math.isnan(peak) or not torch.equal(direct, two_passes):
        logger.warning("log-mel: MKL called directly differs from torch.fft.rfft; the kernel calls torch.fft.rfft")
        return False
    return True


def _mkl_addresses() -> list[int] | None:
    """Addresses of MKL's DFTI functions in torch's CPU library, when torch has MKL and that library exports them."""
    if not torch.backends.mkl.is_available():
        return None
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            handle = ctypes.CDLL(str(path))
            return [ctypes.cast(getattr(handle, name), ctypes.c_void_p).value for name in _MKL_FUNCTIONS]
        except (OSError, AttributeError):
            continue
    return None


def _initialise(library: ctypes.CDLL) -> None:
    filters = mel_filters().t().contiguous()  # [128 mels, 201 bins]
    used = filters.ne(0)
    bins = torch.arange(filters.shape[1]).expand_as(filters)
    lo = torch.where(used, bins, filters.shape[1]).amin(1).to(torch.int32)
    hi = (torch.where(used, bins, -1).amax(1) + 1).to(torch.int32)
    window = hann_window().contiguous()
    library.mel_kernel_init(window.data_ptr(), filters.data_ptr(), lo.data_ptr(), hi.data_ptr())
