"""The repository's GPU tests (`@pytest.mark.gpu`: kernels against the reference on CUDA, graphs against eager,
sync-debug runs) in the same rare GPU session as the benchmark: one pytest run over the test files that carry the
marker, its counts and each failure's first lines, read back from pytest's JUnit XML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

_MARKER = "pytest.mark.gpu"


def gpu_test_files(repo: Path) -> list[str]:
    """Test files (relative to `repo`) that mark at least one test as a GPU test."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").rglob("test_*.py") if _MARKER in p.read_text())


def run_gpu_tests(repo: Path, out_dir: Path) -> dict[str, Any]:
    """Run `pytest -m gpu` over the marked files; counts, failures and pytest's last output line."""
    files = gpu_test_files(repo)
    if not files:
        return {"files": [], "tests": 0, "passed": 0, "failed": [], "skipped": 0, "summary": "no GPU tests"}
    xml_path = out_dir / "gpu_tests.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml_path}", *files],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    (out_dir / "gpu_tests.log").write_text(done.stdout + done.stderr)
    if not xml_path.exists():  # pytest never got to run tests (it is missing, or collection broke)
        raise RuntimeError(f"pytest exited with code {done.returncode}: {(done.stdout + done.stderr)[-500:]}")
    cases = ElementTree.parse(xml_path).getroot().iter("testcase")
    failed, skipped, total = [], 0, 0
    for case in cases:
        total += 1
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            name = f"{case.get('classname')}::{case.get('name')}"
            failed.append({"test": name, "message": (problem.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            skipped += 1
    lines = done.stdout.strip().splitlines()
    return {
        "files": files,
        "exit_code": done.returncode,
        "tests": total,
        "passed": total - len(failed) - skipped,
        "failed": failed,
        "skipped": skipped,
        "summary": lines[-1] if lines else "",
    }
