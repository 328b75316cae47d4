"""The config values of the optional Ray cluster backend: ``[server] cluster`` and a recipe's
``resources``.

Kept out of :mod:`supervisor.config` (which only names the keys) and free of any Ray import:
a config is checked, and a single-machine server runs, without Ray installed.

``cluster`` says where models run:

* unset, ``""`` or ``"off"``: on this machine (the default);
* ``"local"``: on a Ray instance this server starts for itself (one node: this machine);
* ``"auto"``: on the Ray cluster this machine is already a node of (``ray start``);
* ``"HOST:PORT"``: on the cluster whose head (GCS) listens there; this machine must be one of
  its nodes, as for any Ray driver;
* ``"ray://HOST:PORT"``: through Ray Client, from a machine that is not a node.

``resources`` are the Ray resources one worker of the model needs on its node, with Ray's
names: ``GPU`` (fractions allowed), or a custom resource a node was started with
(``ray start --resources='{"npu": 1}'``). The planner treats each as a budget per node, so a
node with ``npu = 1`` holds one such model at a time and another one evicts it.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from typing import Any

from supervisor.config_values import ConfigError, as_str, fail

CLUSTER_MODES = ("local", "auto")
_ADDRESS_RE = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
#: Ray's resource names: letters, digits, ``_ - . /``; ``CPU`` and ``memory`` are Ray's own
#: scheduling figures, which the planner does not use (workers ask for no CPUs; memory is
#: the recipe's ``memory`` and the node's budget).
_RESOURCE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:\-/]{0,127}$")
_RESERVED_RESOURCES = ("CPU", "memory", "object_store_memory")


def parse_cluster(value: Any, where: str, textual: bool) -> str | None:
    """None (this machine only), "local", "auto", "HOST:PORT" or "ray://HOST:PORT"."""
    expected = ('"local", "auto", "HOST:PORT" (a Ray head) or "ray://HOST:PORT" (Ray Client); '
                'or "" / "off" for this machine only')
    if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
        return None
    text = as_str(value, where, expected)
    if text.lower() in CLUSTER_MODES:
        text = text.lower()
    else:
        match = _ADDRESS_RE.match(text)
        if match is None or not 0 < int(match.group(3)) < 65536:
            fail(where, expected, value)
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{where}: cluster = {text!r} needs Ray, which is not installed "
                          "(pip install 'lemonade-supervisor[ray]')")
    return text


def parse_resources(raw: Any, at: str) -> dict[str, float]:
    """A recipe's ``resources`` table: Ray resource name -> a positive amount."""
    where = f"{at} resources"
    if not isinstance(raw, Mapping):
        fail(where, 'a table of Ray resources, e.g. { GPU = 1 } or { npu = 1 }', raw)
    out: dict[str, float] = {}
    for name, amount in raw.items():
        if name in _RESERVED_RESOURCES:
            raise ConfigError(
                f"{where}: {name!r} is not a resource a model asks for here (its memory is "
                f"the recipe's 'memory'; workers take no CPU reservation)")
        if not _RESOURCE_RE.match(name):
            fail(f"{where}.{name}", "a Ray resource name (letters, digits, _ - . /)", name)
        if (isinstance(amount, bool) or not isinstance(amount, int | float)
                or not math.isfinite(amount) or amount <= 0):
            fail(f"{where}.{name}", "a positive number", amount)
        if amount > 1 and amount != int(amount):
            # Ray's own rule: fractions only below one unit.
            fail(f"{where}.{name}", "a whole number, or a fraction below 1", amount)
        out[str(name)] = float(amount)
    return out
