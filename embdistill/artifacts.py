"""Reading and writing stage outputs safely.

* Pickles are read through :class:`RestrictedUnpickler`, which allows only the types our
  artefacts hold (builtin containers and scalars, numpy arrays and dtypes, torch tensors)
  and refuses anything else with a :class:`UserError`: loading a pickle can run code.
* Every write is atomic (temp file in the same folder + ``os.replace``), so a killed stage
  never leaves a half-written file under the final name.
* Each artefact gets a JSON manifest beside it (``<file>.manifest.json``): stage, resolved
  config, input fingerprints, its own files as written (:mod:`embdistill.digests`), package
  versions, creation time. A stage is *done* when its manifest exists with the same config and
  inputs and its files are those written; :func:`is_done` checks exactly that, so a damaged
  output (a truncated export, flipped bytes) is redone, with a warning naming the file.
* One writer per output: :func:`output_lock` holds ``<output>.lock`` (with the holder's pid)
  while a process writes an output that a second process would corrupt (appended metrics,
  an export folder built in place); a second one is refused in one line.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import io
import json
import logging
import os
import pickle
import platform
import shutil
import socket
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .digests import fingerprint, output_damage, output_record
from .errors import UserError

log = logging.getLogger("embdistill.artifacts")

MANIFEST_SUFFIX = ".manifest.json"
# What np.load raises for a damaged .npz, a zip archive: cut short, bytes flipped (a CRC that
# does not match), an array missing.
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
_UMASK = os.umask(0)
os.umask(_UMASK)

# (module, name) pairs a pickle may reference. numpy moved its internals from numpy.core to
# numpy._core in 2.0; pickles written by either are accepted.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "bool"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "Counter"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # torch tensors pickled with plain pickle (the original's .kmeanspkl holds bf16 tensors)
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch", "Size"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("torch", "float64"),
    ("torch", "int64"),
    ("torch", "int32"),
    ("torch", "uint8"),
    ("torch", "bool"),
}
_NUMPY_DTYPE_MODULES = {"numpy", "numpy.dtypes"}
_TORCH_STORAGES = {
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "DoubleStorage",
    "LongStorage",
    "IntStorage",
    "ByteStorage",
    "BoolStorage",
    "UntypedStorage",
    "TypedStorage",
}


def weights_only_refusal(exc: BaseException) -> str:
    """The reason in ``torch.load(weights_only=True)``'s refusal (e.g. "Trying to load
    unsupported GLOBAL posix.system ..."), without its advice to load the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines
               if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return (reasons or lines or [type(exc).__name__])[0]


def _load_storage_from_bytes(data: bytes):
    """Safe stand-in for ``torch.storage._load_from_bytes``, which calls torch.load with
    ``weights_only=False`` (arbitrary code); the tensor payload needs only weights."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:  # a payload that is not weights
        raise pickle.UnpicklingError(f"refused a torch storage: {weights_only_refusal(exc)}") from None


class RestrictedGlobals:
    """The unpickling rule of our artefacts: resolve only the globals they contain. A mixin, for
    the C unpickler (:class:`RestrictedUnpickler`) and pickle's pure-Python one
    (:class:`embdistill.senses.rowfile.StoredRowsUnpickler`)."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _NUMPY_DTYPE_MODULES and name.endswith("DType"):
            return super().find_class(module, name)
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_from_bytes
        if module == "torch" and name in _TORCH_STORAGES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global '{module}.{name}'")


class RestrictedUnpickler(RestrictedGlobals, pickle.Unpickler):
    """An unpickler that resolves only the globals our artefacts contain."""


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle through the restricted unpickler; every failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    with open(path, "rb") as fh:
        return read_pickle(fh, path)


def read_pickle(fh, path: Path, unpickler: type = RestrictedUnpickler) -> Any:
    """The pickle in the open file ``fh`` (``path`` names it in errors) through ``unpickler``, a
    restricted one (:class:`RestrictedGlobals`); every failure is a one-line UserError."""
    try:
        return unpickler(fh).load()
    except pickle.UnpicklingError as exc:
        if "refused" in str(exc):
            raise UserError(
                f"{path}: unsafe pickle ({exc}); only dicts, lists, numbers, numpy arrays and "
                "torch tensors are allowed"
            ) from None
        raise UserError(f"{path}: corrupt pickle ({exc})") from None
    except MemoryError:  # not the file's fault: say so, with what it takes
        raise UserError(f"{path}: out of memory (MemoryError) loading this {path.stat().st_size / 2**20:.1f} MB "
                        "pickle; the file is not known to be damaged: free memory or use a larger machine") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, OSError, struct.error) as exc:  # struct.error: pure-Python unpickling's short read
        reason = "truncated" if isinstance(exc, (EOFError, struct.error)) else type(exc).__name__
        raise UserError(f"{path}: corrupt pickle ({reason}: {exc})".rstrip(": ")) from None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temp file beside ``path``; on success fsync and ``os.replace`` it into place.

    On any exception the temp file is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any file
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # a failed write (a full disk) names no file: name the one being written
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def lock_path(path: str | os.PathLike) -> Path:
    return Path(str(path).rstrip(os.sep) + ".lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<path>.lock`` while writing ``path`` (a file or folder); UserError, naming the
    holder's pid and host, when another live process holds it.

    The lock is an ``flock`` on that file, so the kernel releases it when its holder dies,
    however it dies: a lock left by a killed process is simply taken over. (On a shared file
    system, flock works across nodes where the file system supports it, as NFS does.)"""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise UserError(f"{path} is being written by another process ({_lock_holder(lock)}); "
                            f"wait for it to finish or stop it (lock file {lock})") from None
        # The previous holder may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else will see; start again.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def replacing_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Build a folder in ``.<name>.building`` beside ``out_dir`` (one writer at a time:
    :func:`output_lock`) and, when the block succeeds, move it into place, so that ``out_dir``
    is either the previous folder or the complete new one; a failed build is removed."""
    out_dir = Path(out_dir)
    with output_lock(out_dir):
        building = out_dir.with_name(f".{out_dir.name}.building")
        shutil.rmtree(building, ignore_errors=True)
        try:
            yield building
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        share_files(building)
        previous = out_dir.with_name(f".{out_dir.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(previous)
        building.rename(out_dir)
        shutil.rmtree(previous, ignore_errors=True)


def share_files(folder: Path) -> None:
    """Give every file under ``folder`` the permissions a plain write gives (0666 less the
    umask): libraries that write through temp files (transformers' save_pretrained, for
    model.safetensors) leave them 0600, unreadable by the other users of a shared cluster."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, (0o666 & ~_UMASK) | (path.stat().st_mode & 0o111))


def _lock_holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid, host = lock.read_text().split()
        return f"pid {int(pid)} on {host}"
    return "holder unknown"


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """Pickle ``obj`` to ``path`` atomically (protocol 5, readable by Python >= 3.8). Protocol 5
    writes NumPy arrays from their own memory; protocol 4 copied each into a bytes object that
    the pickler's memo kept to the end: a second copy of every array in the file."""
    with atomic_open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=5)


def save_torch(state: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``state`` to ``path``, atomically. A full disk is one OSError naming
    the folder, the space the file needs and the space free (torch reports a failed write as
    "unexpected pos" after the OSError); ``path``'s previous version, and every other file, stay
    as they were."""
    import torch

    path = Path(path)
    try:
        with atomic_open(path, "wb") as fh:
            torch.save(state, fh)
    except (OSError, RuntimeError) as exc:
        if not _no_space(exc):
            raise
        needed, free = _tensor_bytes(state), shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC, f"no space left on device for {path.name}: it needs about {needed / 2**20:.1f} "
                      f"MB, {free / 2**20:.1f} MB are free (nothing in the folder was changed)",
                      str(path.parent)) from None


def _no_space(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a full disk."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in ``value`` (nested dicts, lists, tuples): about what torch.save writes."""
    if isinstance(value, Mapping):
        return sum(map(_tensor_bytes, value.values()))
    if isinstance(value, (list, tuple)):
        return sum(map(_tensor_bytes, value))
    return value.element_size() * value.numel() if hasattr(value, "element_size") else 0


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def package_version(name: str) -> str | None:
    """The installed version of a package, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes our outputs."""
    versions = {"python": platform.python_version()}
    for name in ("embdistill", "torch", "transformers", "sentence-transformers", "numpy",
                 "scikit-learn", "mteb", "peft"):
        version = package_version(name)
        if version is not None:
            versions[name] = version
    return versions


def manifest_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + MANIFEST_SUFFIX)


def normalise_config(value: Any) -> Any:
    """A config as it reads back from JSON (tuples -> lists, paths -> str, numpy scalars ->
    numbers): the one form in which run identities are compared (manifests, checkpoints)."""
    return json.loads(json.dumps(value, default=_json_default))


def write_manifest(
    path: str | os.PathLike,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Record what produced ``path``: write it *after* the artefact, so that a manifest
    means the artefact is complete."""
    manifest = {
        "artifact": Path(path).name,
        "stage": stage,
        "config": normalise_config(dict(config)),
        "inputs": {k: fingerprint(v) for k, v in (inputs or {}).items()},
        "outputs": output_record(path),
        "versions": package_versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        manifest["extra"] = normalise_config(dict(extra))
    save_json(manifest, manifest_path(path))
    return manifest


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest beside ``path``, or None when there is none or it is unreadable."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        return json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_done(
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> bool:
    """True when ``path`` exists as its manifest records it, with the same config and inputs."""
    path = Path(path)
    manifest = read_manifest(path)
    if not path.exists() or manifest is None:
        return False
    if manifest.get("config") != normalise_config(dict(config)):
        return False
    damage = output_damage(path, manifest.get("outputs"))
    if damage:
        log.warning("damaged output, redoing it: %s", damage)
        return False
    recorded = manifest.get("inputs", {})
    for key, value in (inputs or {}).items():
        if not Path(value).exists() or recorded.get(key) != fingerprint(value):
            return False
    return True


def skip_if_done(
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
    what: str = "stage",
) -> bool:
    """Log and return True when the work behind ``path`` is already done (and not --overwrite)."""
    if not overwrite and is_done(path, config=config, inputs=inputs):
        log.info("%s: %s is up to date, skipping (--overwrite to redo)", what, path)
        return True
    return False


class PartFiles:
    """The numbered part files of one resumable job, ``<folder>/<stem>.part<NNNNN>.npz``.

    One rule for every stage that writes in parts: a part is *done* when its file and its
    manifest (holding the job's ``config`` and the part's index) both exist; the manifest is
    written after the file, so a part killed while being written is redone. Parts hold named
    NumPy arrays in ``.npz`` files, read with ``allow_pickle=False``: no code can run from them.
    """

    def __init__(self, folder: str | os.PathLike, stem: str, config: Mapping[str, Any]):
        self.folder, self.stem, self.config = Path(folder), stem, dict(config)

    @classmethod
    def beside(cls, artifact: str | os.PathLike, config: Mapping[str, Any]) -> "PartFiles":
        """The parts of ``artifact``, in ``<artifact>.parts/<stem>.part<NNNNN>.npz`` beside it."""
        artifact = Path(artifact)
        return cls(artifact.with_name(artifact.name + ".parts"), artifact.stem, config)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.stem}.part{index:05d}.npz"

    def _config(self, index: int) -> dict:
        return {**self.config, "part": index}

    def done(self, index: int) -> bool:
        return is_done(self.path(index), config=self._config(index))

    def write(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        with atomic_open(self.path(index), "wb") as fh:
            np.savez(fh, **arrays)
        write_manifest(self.path(index), stage=f"{self.stem}-part", config=self._config(index))

    def load(self, index: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The part's arrays (only ``names``, when given: the others are not read)."""
        path = self.path(index)
        if not self.done(index):
            raise UserError(f"{path} is missing or from another job; rerun with --overwrite")
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in (data.files if names is None else names)}
        except NPZ_ERRORS as exc:
            raise UserError(f"{path}: corrupt part file ({exc}); rerun with --overwrite") from None

    def clear(self) -> None:
        """Remove every part of this stem (done or not) and stale temp files of killed writes."""
        if not self.folder.is_dir():
            return
        for path in self.folder.glob(f"{self.stem}.part*.npz*"):
            path.unlink(missing_ok=True)
        for stale in self.folder.glob(f".{self.stem}.part*.tmp"):
            stale.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the folder goes too once empty
            self.folder.rmdir()
