"""What every benchmark writes beside its numbers: where and when they were measured."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from reslab.train.outputs import git_revision


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` with the revision, torch version, machine and date."""
    result = {
        **result,
        "git_revision": git_revision(),
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
