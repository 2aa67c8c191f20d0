"""A directory registry of fitted fraud models: skops artifacts plus JSON metadata.

Layout: ``ROOT/<name>/<version>/model.skops`` and ``ROOT/<name>/<version>/metadata.json``,
versions numbered 1, 2, 3... per name. The estimator is written with ``skops.io.dump``
(never pickle). The types skops does not trust by default are fixed here, in code
(:data:`TRUSTED_TYPES`: exactly those the project's fraud models need); they are checked
when saving and, from the artifact itself, again when loading. The metadata records them
for information only: whoever can write the registry cannot widen what loads.

A version appears atomically: it is written into a hidden temporary directory next to
the versions and renamed into place, so a running pipeline that polls
:meth:`ModelRegistry.latest_version` never sees a half-written artifact. Two writers
saving the same name concurrently get different versions (the rename of a directory onto
an existing version fails, and the writer takes the next number).

Nothing here reads the wall clock: ``created_at`` is passed in.

Example:
    >>> import datetime as dt, tempfile
    >>> import polars as pl
    >>> from models.fraud import HANDBOOK_FEATURES, make_model
    >>> rows = {name: [0.0, 1.0, 0.0, 1.0] for name in HANDBOOK_FEATURES}
    >>> model = make_model("decision_tree").fit(pl.DataFrame(rows | {"TX_FRAUD": [0, 1, 0, 1]}))
    >>> registry = ModelRegistry(tempfile.mkdtemp())
    >>> registry.save(model, created_at=dt.datetime(2018, 8, 1, tzinfo=dt.UTC))
    1
    >>> registry.load("decision_tree").metadata["version"]
    1
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import skops.io as sio

from models.fraud import FraudModel, ModelError

MODEL_FILE = "model.skops"
METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1
#: The only types, beyond skops' own defaults (scikit-learn estimators, numpy dtypes and
#: ufuncs), an artifact may need: the fitted trees inside the tree models and the
#: gradient-boosting predictors (found with ``skops.io.get_untrusted_types`` on every model
#: of :data:`models.fraud.MODEL_FACTORIES`). A new model kind that needs another type is
#: added here, in review, never through a file.
TRUSTED_TYPES: frozenset[str] = frozenset({
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils._bunch.Bunch",
})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LIBRARIES = ("scikit-learn", "numpy", "scipy", "skops", "polars")
_SAVE_ATTEMPTS = 100


class RegistryError(ModelError):
    """An artifact cannot be saved or loaded (bad name, untrusted type, bad metadata)."""


class ModelNotFoundError(RegistryError):
    """No such model name, or no such version of it, in the registry."""


@dataclass(frozen=True)
class ModelVersion:
    """One saved version: its name, number and directory."""

    name: str
    version: int
    path: Path


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from the registry, with its metadata as saved."""

    model: FraudModel
    metadata: dict[str, Any]


class ModelRegistry:
    """Saves and loads fitted :class:`~models.fraud.FraudModel` versions under ``root``.

    Args:
        root: the registry directory; created on the first save.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def save(
        self,
        model: FraudModel,
        *,
        created_at: dt.datetime,
        name: str | None = None,
        training_range: tuple[dt.date, dt.date] | None = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Write a new version of ``name`` (default ``model.name``) and return its number.

        Args:
            model: a fitted model.
            created_at: the creation time to record (timezone-aware).
            name: the registry name; letters, digits, ``_``, ``.``, ``-``.
            training_range: first and last instant (or day) of the training data.
            metrics: evaluation results to record, e.g. ``{"average_precision": 0.69}``.
            extra: any other JSON-serialisable facts to record.

        Raises:
            RegistryError: bad name, unfitted model, naive ``created_at``, or a type
                outside :data:`TRUSTED_TYPES` in the artifact.
        """
        name = _checked_name(name or model.name)
        if not model.is_fitted:
            raise RegistryError(f"model {name!r} is not fitted")
        if created_at.tzinfo is None:
            raise RegistryError("created_at must be timezone-aware")
        facts = _metadata(model, name, created_at, training_range, metrics, extra)
        try:
            json.dumps(facts)
        except (TypeError, ValueError) as error:
            raise RegistryError(f"metadata of {name!r} is not JSON-serialisable: {error}") from error
        parent = self.root / name
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        try:
            sio.dump(model.estimator, staging / MODEL_FILE)
            facts["trusted_types"] = _checked_types(sio.get_untrusted_types(file=staging / MODEL_FILE))
            return self._publish(staging, parent, facts)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path, parent: Path, facts: dict[str, Any]) -> int:
        # Rename is atomic; it fails when another writer took the number first (the target
        # exists and is not empty), and then we write the metadata again with the next one.
        for _ in range(_SAVE_ATTEMPTS):
            version = (self.latest_version(facts["name"]) or 0) + 1
            facts["version"] = version
            _write_synced(staging / METADATA_FILE, json.dumps(facts, indent=2, sort_keys=True))
            _fsync_path(staging / MODEL_FILE)
            _fsync_path(staging)
            target = parent / str(version)
            if target.exists():
                continue
            try:
                os.rename(staging, target)
            except OSError:
                continue
            _fsync_path(parent)
            return version
        raise RegistryError(f"could not allocate a version of {facts['name']!r}")

    def latest_version(self, name: str) -> int | None:
        """The highest complete version of ``name``, or ``None`` when there is none.

        Example:
            >>> ModelRegistry("/nonexistent").latest_version("hgb") is None
            True
        """
        versions = self._versions(_checked_name(name))
        return versions[-1] if versions else None

    def _versions(self, name: str) -> list[int]:
        parent = self.root / name
        if not parent.is_dir():
            return []
        return sorted(int(entry.name) for entry in parent.iterdir() if entry.name.isdigit())

    def list(self) -> list[ModelVersion]:
        """Every saved version, sorted by name then version."""
        if not self.root.is_dir():
            return []
        names = sorted(entry.name for entry in self.root.iterdir() if _NAME.match(entry.name))
        return [
            ModelVersion(name, version, self.root / name / str(version))
            for name in names
            for version in self._versions(name)
        ]

    def metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The metadata of one version (default: the latest) without loading the model."""
        path = self._version_dir(name, version) / METADATA_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RegistryError(f"unreadable metadata {path}: {error}") from error

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Load one version of ``name`` (default: the latest) with skops, never pickle.

        Raises:
            ModelNotFoundError: no such name or version.
            RegistryError: the artifact needs a type outside :data:`TRUSTED_TYPES`, or its
                metadata claims one (a tampered registry), or the file is broken.
        """
        facts = self.metadata(name, version)
        _checked_types(facts.get("trusted_types", []))
        estimator = load_estimator(self._version_dir(name, facts["version"]) / MODEL_FILE)
        model = FraudModel(
            facts["model"], estimator, features=facts["features"], seed=facts["seed"], params=facts["params"]
        )
        return LoadedModel(model, facts)

    def _version_dir(self, name: str, version: int | None) -> Path:
        name = _checked_name(name)
        number = self.latest_version(name) if version is None else int(version)
        if number is None:
            raise ModelNotFoundError(f"no model {name!r} in {self.root}")
        path = self.root / name / str(number)
        if not path.is_dir():
            raise ModelNotFoundError(f"no version {number} of {name!r} in {self.root}")
        return path


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _checked_types(types: Sequence[str]) -> list[str]:
    refused = sorted(set(types) - TRUSTED_TYPES)
    if refused:
        raise RegistryError(f"refusing untrusted types: {', '.join(refused)}")
    return sorted(types)


def load_estimator(path: str | os.PathLike[str]) -> Any:
    """Load a ``.skops`` file trusting only :data:`TRUSTED_TYPES` beyond skops' defaults.

    The types to trust come from this module, never from a file beside the artifact: the
    types the artifact needs are read from the artifact and refused unless allowed here.

    Raises:
        RegistryError: the artifact needs another type, or cannot be read.
    """
    try:
        needed = sio.get_untrusted_types(file=path)
    except Exception as error:  # skops raises several types for broken files
        raise RegistryError(f"cannot load {path}: {error}") from error
    trusted = _checked_types(needed)
    try:
        return sio.load(path, trusted=trusted)
    except Exception as error:  # skops raises several types for refused or broken files
        raise RegistryError(f"cannot load {path}: {error}") from error


def _metadata(
    model: FraudModel,
    name: str,
    created_at: dt.datetime,
    training_range: tuple[dt.date, dt.date] | None,
    metrics: Mapping[str, float] | None,
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": METADATA_FORMAT,
        "name": name,
        "model": model.name,
        "params": model.params,
        "seed": model.seed,
        "features": list(model.features),
        "training_range": None
        if training_range is None
        else {"start": training_range[0].isoformat(), "end": training_range[1].isoformat()},
        "metrics": {key: float(value) for key, value in (metrics or {}).items()},
        "created_at": created_at.isoformat(),
        "library_versions": library_versions(),
        "extra": dict(extra or {}),
    }


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries an artifact depends on.

    Example:
        >>> sorted(library_versions())[:2]
        ['numpy', 'polars']
    """
    versions = {"python": platform.python_version()}
    for library in _LIBRARIES:
        try:
            versions[library] = importlib_metadata.version(library)
        except importlib_metadata.PackageNotFoundError:
            versions[library] = "absent"
    return versions


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
