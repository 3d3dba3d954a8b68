"""CSV/TSV lists of ``path,label[,split]`` for image data not laid out by class."""

from __future__ import annotations

import csv
import io
from pathlib import Path

__all__ = ["SPLITS", "read_list"]

SPLITS = ("train", "val", "test")


def read_list(path: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(paths, labels, splits) from a CSV (comma) or TSV (tab) list. A header row is recognised
    by its first field ``path``/``file``/``filename``/``image``; a ``split`` column is optional."""
    text = path.read_text(encoding="utf-8-sig")
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = [
        (line, r)
        for line, r in enumerate(csv.reader(io.StringIO(text), delimiter=delim), start=1)
        if any(c.strip() for c in r)
    ]
    if not rows:
        raise ValueError(f"{path}: empty list (expected rows of path{delim}label)")
    head = [c.strip().lower() for c in rows[0][1]]
    label_col, split_col = 1, None
    if head[0] in ("path", "file", "filename", "image"):
        rows = rows[1:]
        label_col = head.index("label") if "label" in head else 1
        split_col = head.index("split") if "split" in head else None
    width = max(label_col, split_col or 0) + 1
    paths, labels, splits = [], [], []
    for line, r in rows:
        if len(r) < width or not r[0].strip() or not r[label_col].strip():
            raise ValueError(f"{path}, line {line}: expected path{delim}label, got {r}")
        paths.append(r[0].strip())
        labels.append(r[label_col].strip())
        s = r[split_col].strip().lower() if split_col is not None else None
        if s is not None and s not in SPLITS:
            raise ValueError(f"{path}, line {line}: split {s!r} is not one of {SPLITS}")
        splits.append(s)
    if not paths:
        raise ValueError(f"{path}: no rows after the header")
    return paths, labels, splits
