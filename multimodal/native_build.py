"""Small C kernels built on first use: the project cache dir and one compile-and-cache step shared by every kernel.

It sits in the lowest floor that uses native code (the log-mel kernel here; the engine's kernels import it from
here). A library is compiled once per source, compiler, flags and CPU (`cc -O3 -march=native`, then plain -O3 for
compilers that reject it) into the cache dir (`OMNISTREAM_CACHE_DIR`, default ~/.cache/omnistream) under a name that
hashes all four, written to a temporary name and renamed, so concurrent first uses never load a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAG_SETS = (("-O3", "-march=native"), ("-O3",))  # the second for compilers that reject -march=native
_COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """The project's cache dir: $OMNISTREAM_CACHE_DIR, else ~/.cache/omnistream (models, compiled kernels)."""
    return Path(os.environ.get("OMNISTREAM_CACHE_DIR") or Path.home() / ".cache" / "omnistream")


def build_shared_library(source: Path, extra_flags: tuple[str, ...] = (), libraries: tuple[str, ...] = ("m",)) -> Path:
    """Path of the compiled library of `source` for this compiler and CPU, compiling it if it is not cached yet.

    Raises RuntimeError when no compiler is found or every flag set fails (with the compiler's last words)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc, clang or $CC)")
    text = source.read_bytes()
    links = [f"-l{name}" for name in libraries]
    errors = []
    for base_flags in FLAG_SETS:
        flags = [*base_flags, *extra_flags]
        key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags + links).encode(), _cpu_identity()]))
        target = cache_dir() / f"{source.stem}-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", temp, str(source), *links],
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
