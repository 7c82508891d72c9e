"""Classes named by ``class_path`` strings, as in the YAML configs (foundation: imports nothing of the project)."""

from __future__ import annotations

import importlib


def import_class(class_path: str) -> type:
    """The class named by a dotted ``class_path`` (``package.module.ClassName``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def class_path_of(cls: type) -> str:
    """The ``class_path`` that names ``cls`` (inverse of :func:`import_class`)."""
    return f"{cls.__module__}.{cls.__qualname__}"
