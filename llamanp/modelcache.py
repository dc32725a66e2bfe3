"""Run what you have: `-w` takes a model file, any checkpoint, or a known name.

    llama-np.py -w model.lmw ...      # used as it is
    llama-np.py -w model.gguf ...     # converted once into the model cache, then run
    llama-np.py -w smollm2 ...        # a known model by name, fetched as the demo does

An .lmw file (named so, or starting with the .lmw magic bytes) is opened as it
is. Anything convert.py reads (a GGUF file, a Hugging Face or Meta directory,
a llama2.c .pt or .bin) is converted the first time into the model cache,
$LLAMANP_CACHE/models (else ~/.cache/llamanp/models), and found there on every
later run. The cached file is named after the source and its identity:

  * a file of at most SMALL_FILE bytes: the SHA-256 of its contents (quick to
    compute at that size, and it survives copies and touches);
  * a larger file: its absolute path, size and modification time (hashing
    gigabytes on every run would cost more than the conversion it saves);
  * a directory: its absolute path, and the name, size and modification time
    of each file directly in it.

Changing the source therefore makes a new conversion; old ones stay in the
cache until deleted. The weights are stored as f32 (convert.py --dtype makes
other kinds), and the tokenizer is the checkpoint's own (-t still overrides it
when the model is loaded).
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import sys
from pathlib import Path

from . import fetch, fileio, lmw
from .errors import LlamanpError

SMALL_FILE = 64 << 20      # up to this size a source file is identified by its contents


def resolve(spec: str, verbose: bool = True) -> Path:
    """The .lmw file that `-w spec` means, converting or fetching it if needed."""
    path = Path(spec)
    if not path.exists() and not path.is_symlink():
        if spec in fetch.KNOWN:
            return fetch.fetch(spec, verbose)
        hint = ("" if path.suffix or "/" in spec else
                f" (models known by name: {', '.join(sorted(fetch.KNOWN))})")
        raise LlamanpError(f"{spec} does not exist{hint}")
    if not (path.is_dir() or path.is_file()) or is_lmw(path):
        return path                # lmw.read says what is wrong with anything else
    return cached_conversion(path, verbose)


def is_lmw(path: Path) -> bool:
    """Named .lmw, or a regular file that starts with the .lmw magic bytes."""
    if path.suffix == ".lmw":
        return True
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(len(lmw.MAGIC)) == lmw.MAGIC
    except OSError:
        return False


def source_identity(path: Path) -> dict:
    """What names a source in the cache (see the module docstring)."""
    path = path.resolve()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {"dir": str(path), "files": [[p.name, *_size_mtime(p)] for p in files]}
    size, mtime = _size_mtime(path)
    if size <= SMALL_FILE:
        return {"sha256": fileio.sha256(path)}
    return {"file": str(path), "size": size, "mtime_ns": mtime}


def _size_mtime(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def cache_path(path: Path) -> Path:
    """Where the conversion of `path` lives in the model cache: named by the
    source's identity, then (for people listing the cache) the source's name.
    A conversion made under another name (a copy of a small file) is found too."""
    identity = json.dumps(source_identity(path), sort_keys=True).encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
    models = fetch.cache_dir() / "models"
    found = sorted(models.glob(f"{key}-*.lmw")) if models.is_dir() else []
    if found:
        return found[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.resolve().name.rsplit(".", 1)[0])[:60]
    return models / f"{key}-{stem or 'model'}.lmw"


def cached_conversion(path: Path, verbose: bool = True) -> Path:
    """`path` converted to .lmw in the model cache (once)."""
    from .convert import convert, detect_format
    from .convert.cli import Progress
    detect_format(path)            # an unknown format is refused before anything is said
    out = cache_path(path)
    if out.exists():
        return out
    if verbose:
        print(f"converting {path} into the model cache (once): {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    # force: a run converting the same source at the same time writes the same file
    convert(path, out, force=True, progress=Progress() if verbose else None)
    return out
