"""What every benchmark writes beside its numbers: where, when and with what they were measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reslab.record import run_record, write_json


def write_result(path: Path, result: dict[str, Any], *, device: torch.device | str) -> None:
    """Write ``result`` as JSON to ``path`` (atomically) with :func:`reslab.record.run_record`:
    reslab's version and commit, library versions, the ``device`` measured on, machine and date."""
    write_json(path, {**result, **run_record(device)})
    print(f"wrote {path}")
