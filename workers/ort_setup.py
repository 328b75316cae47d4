"""Importing onnxruntime without it writing into the user's home.

onnxruntime 1.2x+ on Linux keeps a telemetry store (a device id and an SQLite database) under
``$XDG_CACHE_HOME/Microsoft/DeveloperTools`` (``~/.cache`` by default) from the moment it is
imported, and opens it in every process that imports it. Workers keep their files under the
supervisor's data dir instead, so before the first import this points ``XDG_CACHE_HOME`` of
the worker process (only) at the kind's data dir, and turns telemetry events off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from workers.base import data_dir


def import_onnxruntime(kind: str) -> Any:
    """The ``onnxruntime`` module, imported with its cache under ``data_dir(kind)``."""
    if "onnxruntime" not in sys.modules:
        os.environ["XDG_CACHE_HOME"] = str(data_dir(kind).resolve())
    import onnxruntime

    onnxruntime.disable_telemetry_events()
    return onnxruntime
