"""Open registries of plugin kinds: built-ins, ``module:attr`` import paths and entry points.

A config names a kind (``kind: anomaly``, ``format: jsonl``, ``kind: handbook_terminal``);
:class:`PluginRegistry` resolves it, in this order:

1. a built-in of the engine, or one registered at run time with :meth:`PluginRegistry.register`;
2. an installed package's entry point in the registry's group (``eventray.processors``,
   ``eventray.sources``, ``eventray.stages``), declared in its ``pyproject.toml``::

       [project.entry-points."eventray.processors"]
       fraud = "pipelines.fraud.flow:FraudStep"

3. an import path ``package.module:attribute``, found on ``sys.path`` with the given search
   folders first (the config's folder and the working directory).

An unknown name raises :class:`~pipelines.errors.UnknownPluginError` listing the allowed
names; a path that cannot be imported raises :class:`PluginImportError` naming the path and
the import's own error. The engine knows no application: applications such as the fraud
flow register their kinds through entry points, like any other installed package.

Example:
    >>> registry = PluginRegistry("step kind", "eventray.processors", {"noop": dict})
    >>> registry.resolve("noop")
    <class 'dict'>
    >>> registry.resolve("json:dumps").__name__
    'dumps'
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError, UnknownPluginError

#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.factory``).
IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class PluginImportError(ConfigError):
    """An import path (``module:attr``) names nothing importable; the message says why."""

    def __init__(self, path: str, cause: BaseException) -> None:
        self.path = path
        super().__init__(f"cannot import {path!r}: {type(cause).__name__}: {cause}")


@contextmanager
def search_path(folders: Sequence[str | Path]) -> Iterator[None]:
    """Put ``folders`` first on ``sys.path`` for the duration of a ``with`` block."""
    added = [str(Path(f).resolve()) for f in folders if Path(f).is_dir()]
    saved = list(sys.path)
    sys.path[:0] = [f for f in added if f not in sys.path[: len(added)]]
    try:
        yield
    finally:
        sys.path[:] = saved + [p for p in sys.path if p not in saved and p not in added]


def import_path(path: str, folders: Sequence[str | Path] = ()) -> Any:
    """The object an import path ``package.module:attribute`` names.

    Args:
        path: ``module:attribute``.
        folders: searched before ``sys.path`` (the config's folder, the working directory).

    Raises:
        PluginImportError: the module or the attribute cannot be found or fails to import.

    Example:
        >>> import_path("os.path:join")("a", "b")
        'a/b'
    """
    if not re.match(IMPORT_PATH, path):
        raise PluginImportError(path, ValueError("expected 'package.module:attribute'"))
    module_name, _, attribute = path.partition(":")
    try:
        with search_path(folders):
            target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # any error the user's module raises on import is reported
        raise PluginImportError(path, exc) from None
    return target


class PluginRegistry:
    """Kinds of one plugin family, by name: built-ins, entry points, import paths.

    Args:
        kind: what is looked up, for error messages (``"step kind"``).
        group: the entry-point group installed packages declare kinds in.
        builtins: the engine's own kinds.
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, Any] | None = None) -> None:
        self.kind, self.group = kind, group
        self._registered: dict[str, Any] = dict(builtins or {})

    def register(self, name: str, plugin: Any) -> None:
        """Add a kind under ``name`` (replacing a built-in of that name is refused)."""
        if name in self._registered and self._registered[name] is not plugin:
            raise ConfigError(f"{self.kind} {name!r} is registered already")
        self._registered[name] = plugin

    def names(self) -> list[str]:
        """Every name that resolves without an import path."""
        return sorted({*self._registered, *(ep.name for ep in self._entry_points())})

    def resolve(self, name: str, folders: Sequence[str | Path] = ()) -> Any:
        """The plugin a config's ``name`` refers to.

        Raises:
            UnknownPluginError: not a registered name, entry point or import path.
            PluginImportError: an entry point or import path that fails to load.
        """
        if name in self._registered:
            return self._registered[name]
        for entry in self._entry_points():
            if entry.name == name:
                try:
                    return entry.load()
                except Exception as exc:  # a broken installed plugin: say which
                    raise PluginImportError(entry.value, exc) from None
        if ":" in name:
            return import_path(name, folders)
        raise UnknownPluginError(self.kind, name, [*self.names(), "<package.module:attribute>"])

    def _entry_points(self) -> list[metadata.EntryPoint]:
        return list(metadata.entry_points(group=self.group))
