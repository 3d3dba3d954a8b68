"""What every result file says about where it came from, and the one way JSON results are written.

Training runs (config.json, summary.json), experiments (their ``meta``) and benchmarks all record
:func:`run_record` and write through :func:`write_json`: atomically (a failed write keeps the
previous file) and as strict JSON (NaN and infinity become ``null``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from reslab._io import atomic_path

__all__ = ["jsonable", "reslab_commit", "run_record", "write_json"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _git(cwd: Path, *args: str) -> str | None:
    """``git args`` in ``cwd``; its output, or None where git is missing or fails."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _names_reslab(pyproject: Path) -> bool:
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, ValueError):
        return False
    return project.get("name") == "reslab"


def reslab_commit(package_dir: Path | None = None) -> str | None:
    """The commit of reslab's own source tree (with ``+dirty`` for uncommitted changes to tracked
    files), or None where reslab does not run from a git checkout of itself.

    ``package_dir`` (default: this package's folder) counts as reslab's source tree only when it is
    the ``reslab`` folder at the top of a git checkout whose pyproject.toml names the project
    ``reslab``. An installed copy (site-packages, even in a virtualenv inside some repository) and
    a checkout of another project around it give None: their commit says nothing about this code.
    """
    package_dir = (package_dir or _PACKAGE_DIR).resolve()
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if not top:
        return None
    top_dir = Path(top).resolve()
    if package_dir != top_dir / "reslab" or not _names_reslab(top_dir / "pyproject.toml"):
        return None
    rev = _git(top_dir, "rev-parse", "HEAD")
    if not rev:
        return None  # a repository without commits
    dirty = _git(top_dir, "status", "--porcelain", "--untracked-files=no")
    return rev + ("+dirty" if dirty else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "unavailable"
    return platform.processor() or platform.machine()


def run_record(device: torch.device | str, **extra: Any) -> dict[str, Any]:
    """Where and with what a result was made: reslab's version and commit, library versions, the
    ``device`` the computation really ran on (``"auto"``: CUDA where present, as the trainer
    picks it), threads, host and UTC time; then ``extra``."""
    import torchvision

    import reslab

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return {
        "reslab_version": reslab.__version__,
        "git_revision": reslab_commit(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": _device_name(device),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(sys.argv),
        **extra,
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON data: NaN and infinities become None (JSON has neither), tensors
    and tuples become lists, numpy scalars numbers, paths strings. Anything else is left for
    ``json.dumps`` to refuse."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "dtype") and hasattr(obj, "item"):  # a numpy scalar
        return jsonable(obj.item())
    return obj


def write_json(path: Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` (through :func:`jsonable`) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    text = json.dumps(jsonable(obj), indent=indent) + "\n"  # fails before the file is touched
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
