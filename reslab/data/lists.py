"""What files a source holds, and their classes and splits: class-folder trees (a directory or a
zip) and CSV/TSV lists of ``path,label[,split]`` for data not laid out by class."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path, PurePosixPath

from reslab.data.images import IMAGE_SUFFIXES
from reslab.data.store import FileStore, open_zip

__all__ = ["SPLITS", "list_layout", "list_tree", "read_list", "tree_layout"]

SPLITS = ("train", "val", "test")
#: A list is read whole (and its rows held as Python strings, several times its size): 1 GiB is
#: some 10 million rows of ``path,label``, more than ImageNet-21k's images.
MAX_LIST_BYTES = 2**30


def read_list(path: Path) -> tuple[list[str], list[str], list[str | None]]:
    """(paths, labels, splits) from a CSV (comma) or TSV (tab) list. A header row is recognised
    by its first field ``path``/``file``/``filename``/``image``; a ``split`` column is optional."""
    size = path.stat().st_size
    if size > MAX_LIST_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, over the {MAX_LIST_BYTES:,} a list may have")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:  # its own message names no file
        raise ValueError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the list as UTF-8"
        ) from None
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


# -- listing ------------------------------------------------------------------------------------
def _is_image(rel: PurePosixPath) -> bool:
    """An image by its suffix, except macOS Finder metadata (``__MACOSX/``, ``._*`` AppleDouble
    files), which carries image suffixes but is not an image."""
    return (
        rel.suffix.lower() in IMAGE_SUFFIXES
        and "__MACOSX" not in rel.parts
        and not rel.name.startswith("._")
    )


def list_tree(path: Path) -> tuple[FileStore, list[tuple[PurePosixPath, str]]]:
    """(store, [(relative path, name to read)]) of every image below a directory or in a zip. The
    name to read is the zip member's name as stored; the relative path is normalised
    (``./train/a.png`` -> ``train/a.png``) and may not open it."""
    if path.is_dir():
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                full = Path(root) / f
                rel = PurePosixPath(full.relative_to(path).as_posix())
                if _is_image(rel):
                    out.append((rel, rel.as_posix()))
        return FileStore(str(path), "dir"), out
    with open_zip(path) as zf:
        names = sorted(zf.namelist())
    out = [(PurePosixPath(n), n) for n in names if _is_image(PurePosixPath(n))]
    return FileStore(str(path), "zip"), out


def tree_layout(
    files: list[tuple[PurePosixPath, str]], root: Path
) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [names]}} from ``[top/]split/<class>/<file>`` paths."""
    layout: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    nested = []  # split/class/.../file: not read, so not silently dropped either
    for rel, name in files:
        parts = rel.parts
        for i, p in enumerate(parts[:-2]):
            if p in layout and len(parts) - i == 3:  # split/class/file
                layout[p].setdefault(parts[i + 1], []).append(name)
                break
        else:
            if any(p in layout for p in parts[:-3]):
                nested.append(rel)
    if nested:
        raise ValueError(
            f"{root}: {len(nested)} image(s) sit below a class folder, e.g. {nested[0]}; images "
            "must be directly in [top/]train/<class>/ (and val/<class>/, test/<class>/)"
        )
    if not layout["train"]:
        raise ValueError(
            f"{root}: no images found under a 'train/<class>/' folder (expected "
            "[top/]train/<class>/*.jpg, with val/<class>/ and/or test/<class>/ beside it)"
        )
    return layout


def list_layout(path: Path) -> tuple[FileStore, dict[str, dict[str, list[str]]]]:
    paths, labels, splits = read_list(path)
    layout: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for p, lab, s in zip(paths, labels, splits, strict=True):
        layout[s or "train"].setdefault(lab, []).append(p)
    if not layout["train"]:
        raise ValueError(f"{path}: no rows of the train split")
    return FileStore(str(path.parent), "dir"), layout
