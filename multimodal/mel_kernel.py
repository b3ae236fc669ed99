"""The compiled log-mel passes (mel_kernel.c) around torch's rfft: built on first use with the system C compiler,
cached, called by ctypes.

The shared library is compiled once per source, compiler and CPU (`cc -O3 -march=native`) into the project cache
dir (`OMNISTREAM_CACHE_DIR`, default ~/.cache/omnistream) under a name that hashes all three, written to a temporary
name and renamed, so concurrent first uses never load a half-written file. Without a working compiler (or with
`OMNISTREAM_MEL_KERNEL=torch`) `active_kernel()` is "torch" and `mel` uses its pure-torch path, after one log line.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mel_kernel.c")
ENV_KERNEL = "OMNISTREAM_MEL_KERNEL"
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # the second for compilers that reject -march=native
_COMPILE_TIMEOUT_S = 120
_lock = threading.Lock()


def active_kernel() -> str:
    """"c" when the compiled kernel is in use, "torch" when `mel` falls back to its pure-torch path."""
    return "c" if _library() is not None else "torch"


def log_mel_into(frames: torch.Tensor, out: torch.Tensor, windowed: torch.Tensor, scaled: bool) -> float:
    """Frames [n, 400] into out [128, n] with the compiled passes around torch's rfft: log10 mel, or log10 mel / 4 + 1
    when `scaled`. `windowed` is contiguous float32 scratch of at least [n, 400].

    Returns the max of the unscaled log10 values (-inf for no frames). Needs `active_kernel() == "c"`.
    """
    library = _library()
    if library is None:
        raise RuntimeError("the compiled log-mel kernel is not available")
    n = frames.shape[0]
    if {frames.dtype, out.dtype, windowed.dtype} != {torch.float32}:
        raise TypeError(f"log-mel kernel: float32 tensors needed, got {frames.dtype}, {out.dtype}, {windowed.dtype}")
    if frames.shape[1:] != (400,) or out.shape != (128, n) or windowed.shape[0] < n or windowed.shape[1:] != (400,):
        raise ValueError(f"log-mel kernel: frames [n, 400], out [128, n] and windowed [>=n, 400] needed, got "
                         f"{tuple(frames.shape)}, {tuple(out.shape)} and {tuple(windowed.shape)}")
    if n == 0:
        return float("-inf")
    if frames.stride(1) != 1 or frames.stride(0) < 1:
        frames = frames.contiguous()
    if not windowed.is_contiguous() or out.stride(1) != 1 or out.stride(0) < n:
        raise ValueError(f"log-mel kernel: contiguous scratch and out rows of unit stride needed, got strides "
                         f"{windowed.stride()} and {out.stride()}")
    library.mel_kernel_window(frames.data_ptr(), frames.stride(0), n, windowed.data_ptr())
    spectrum = torch.fft.rfft(windowed[:n])
    return library.mel_kernel_mel(spectrum.data_ptr(), n, out.data_ptr(), out.stride(0), int(scaled))


def _library() -> ctypes.CDLL | None:
    """The loaded and initialised kernel, or None (forced off, or no compiler: logged once)."""
    with _lock:
        return _load()


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    choice = os.environ.get(ENV_KERNEL, "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"{ENV_KERNEL} must be 'auto' or 'torch', got {choice!r}")
    if choice == "torch":
        logger.info("log-mel: %s=torch, using the pure-torch path", ENV_KERNEL)
        return None
    try:
        library = ctypes.CDLL(str(_build()))
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
    _initialise(library)
    return library


def _initialise(library: ctypes.CDLL) -> None:
    from .mel import _window, mel_filters  # mel imports this module at its top

    filters = mel_filters().t().contiguous()  # [128 mels, 201 bins]
    used = filters.ne(0)
    bins = torch.arange(filters.shape[1]).expand_as(filters)
    lo = torch.where(used, bins, filters.shape[1]).amin(1).to(torch.int32)
    hi = (torch.where(used, bins, -1).amax(1) + 1).to(torch.int32)
    window = _window().contiguous()
    library.mel_kernel_init(window.data_ptr(), filters.data_ptr(), lo.data_ptr(), hi.data_ptr())


def _build() -> Path:
    """Path of the compiled library for this source, compiler and CPU, compiling it if it is not cached yet."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_identity()]))
        target = _cache_dir() / f"mel_kernel-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", temp, str(SOURCE), "-lm"],
                                    capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
            if result.returncode == 0:
                os.replace(temp, target)
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {result.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
    raise RuntimeError("; ".join(errors))


def _cpu_identity() -> bytes:
    """What -march=native depends on: the machine type and, on Linux, the CPU model and feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    parts += [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join(parts).encode()


def _cache_dir() -> Path:
    """The project cache dir, as engine/default_model.py resolves it."""
    return Path(os.environ.get("OMNISTREAM_CACHE_DIR") or Path.home() / ".cache" / "omnistream")
