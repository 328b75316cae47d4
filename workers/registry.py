"""Worker kind name -> the class that implements it.

A recipe names a kind (``recipe = "synthetic"``); the worker process has to turn that name
into a :class:`workers.base.Model` subclass. Kinds that ship with the project are listed in
:data:`BUILTIN`; third-party packages add theirs through the ``lemonade.workers`` entry-point
group. Only the one kind a worker needs is imported, and only when asked for, so listing the
kinds never pulls in torch or any other heavy model library.

Each kind's recipe options are declared as a :class:`workers.options.OptionSpec` that lives
in a light module, so the supervisor can check every recipe when its config loads without
importing the kind. Builtin specs are in :mod:`workers.recipe_options` (see
:data:`BUILTIN_OPTIONS`). A plugin declares its spec through the ``lemonade.worker_options``
entry-point group, under the same name as its kind, pointing at an ``OptionSpec`` in a module
that is cheap to import::

    [project.entry-points."lemonade.workers"]
    mykind = "mypkg.model:MyModel"
    [project.entry-points."lemonade.worker_options"]
    mykind = "mypkg.options:OPTIONS"

A plugin that declares none is not checked at start-up (its ``load`` alone judges its
options, at first use).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType

from workers.base import Model
from workers.kinds import KINDS
from workers.options import OptionSpec

ENTRY_POINT_GROUP = "lemonade.workers"
OPTIONS_ENTRY_POINT_GROUP = "lemonade.worker_options"

#: Kinds that ship with the project: name -> ``"module:attribute"`` (from workers.kinds).
BUILTIN: Mapping[str, str] = MappingProxyType({name: k.model for name, k in KINDS.items()})

#: Where each builtin kind's option spec lives: name -> ``"module:attribute"`` (light modules).
BUILTIN_OPTIONS: Mapping[str, str] = MappingProxyType(
    {name: k.options for name, k in KINDS.items()})


class UnknownKindError(KeyError):
    """No builtin kind and no installed plugin has this name."""

    def __init__(self, kind: str, known: list[str]) -> None:
        super().__init__(kind)
        self.kind = kind
        self.known = known

    def __str__(self) -> str:
        # KeyError's own __str__ would print the repr of the key only.
        known = ", ".join(self.known) or "(none)"
        return f"unknown worker kind {self.kind!r}; known: {known}"


def available() -> dict[str, str]:
    """All kind names and their ``"module:attribute"`` targets; builtins win on a clash."""
    found: dict[str, str] = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update(BUILTIN)
    return dict(sorted(found.items()))


def _load_target(kind: str, target: str) -> object:
    module_name, _, attribute = target.partition(":")
    # Entry-point values may carry extras ("pkg.mod:Cls [gpu]"); they do not matter here.
    attribute = attribute.split("[", 1)[0].strip()
    if not module_name.strip() or not attribute:
        raise ImportError(f"worker kind {kind!r} has a malformed target {target!r}")
    obj: object = importlib.import_module(module_name.strip())
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def option_spec(kind: str) -> OptionSpec | None:
    """The declared recipe options of ``kind``, or None when it declares none (a plugin).

    Imports only the module that holds the spec, never the kind's own module (for a
    builtin kind). Raises ``ImportError``/``AttributeError`` when a declared spec cannot be
    loaded and ``TypeError`` when it is not an :class:`OptionSpec`.
    """
    target = BUILTIN_OPTIONS.get(kind)
    if target is None and kind not in BUILTIN:
        found = [ep for ep in entry_points(group=OPTIONS_ENTRY_POINT_GROUP) if ep.name == kind]
        target = found[0].value if found else None
    if target is None:
        return None
    spec = _load_target(kind, target)
    if not isinstance(spec, OptionSpec):
        raise TypeError(f"the options of worker kind {kind!r} point at {target!r}, which is "
                        "not a workers.options.OptionSpec")
    return spec


def resolve(kind: str) -> type[Model]:
    """Import and return the class for ``kind``.

    Raises :class:`UnknownKindError` (a ``KeyError``) naming the known kinds when nothing has
    this name, ``ImportError`` when the kind's module cannot be imported, and ``TypeError``
    when the target is not a :class:`Model` subclass.
    """
    kinds = available()
    target = kinds.get(kind)
    if target is None:
        raise UnknownKindError(kind, list(kinds))
    obj = _load_target(kind, target)
    if not isinstance(obj, type) or not issubclass(obj, Model):
        raise TypeError(f"worker kind {kind!r} points at {target!r}, which is not a Model class")
    return obj
