"""Lay out one model entry of a Triton model repository.

    REPOSITORY/NAME/config.pbtxt
    REPOSITORY/NAME/VERSION/{the runtime's files, tokenizer.json, labels.json, manifest.json}

where the runtime (``ner_builder.runtimes``) says which files are its own.

A version folder is assembled beside the repository and renamed into place, so a Triton that
polls the repository never sees a half-written new version. Replacing an existing version (an explicit
``--version``) removes the old folder first: for that moment the version is missing, so roll out new
version numbers to a live server instead.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import shutil
import tempfile
from pathlib import Path

from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import latest_version_dir

LOGGER = logging.getLogger(__name__)

PYTHON_MODEL_SOURCE = importlib.resources.files("ner_builder") / "triton_model" / "model.py"


def next_version(model_dir: Path) -> int:
    latest = latest_version_dir(model_dir) if model_dir.is_dir() else None
    return int(latest.name) + 1 if latest is not None else 1


def staging_dir(repository: Path) -> Path:
    repository.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=repository))


def install_version(staged: Path, model_dir: Path, version: int, config_pbtxt: str,
                    required_files: tuple[str, ...]) -> Path:
    """Move a fully written version folder into place and (re)write the model's config."""
    for required in required_files:
        if not (staged / required).is_file():
            raise BuildError(f"internal: staged version lacks {required}")
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / str(version)
    if target.exists():
        LOGGER.warning("replacing existing version %s", target)
        shutil.rmtree(target)
    staged.rename(target)
    (model_dir / "config.pbtxt").write_text(config_pbtxt)
    return target


def write_python_model(version_dir: Path) -> None:
    (version_dir / "model.py").write_text(PYTHON_MODEL_SOURCE.read_text())


def write_label_map(version_dir: Path, labels: list[str]) -> None:
    (version_dir / "labels.json").write_text(json.dumps(dict(enumerate(labels)), indent=2) + "\n")
