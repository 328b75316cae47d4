"""The learned-imports manifest: what a load imported is recorded, read back and imported,
and a broken or unsafe manifest is never trusted (workers.import_manifest)."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import import_manifest


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LEMONADE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture()
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package on sys.path whose modules no test has imported yet."""
    name = f"lazylib_{tmp_path.name.replace('-', '_')}"
    root = tmp_path / "site" / name
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "models.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _forget(name: str) -> None:
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_what_a_load_imports_is_recorded_and_imported_again(data_dir: Path, library: str) -> None:
    before = frozenset(sys.modules)
    importlib.import_module(f"{library}.models")  # "the load"
    assert import_manifest.learn("k", before) >= 2
    recorded = import_manifest.read("k")
    assert f"{library}.models" in recorded and library in recorded
    assert import_manifest.learn("k", before) == 0, "nothing new the second time"

    _forget(library)  # a fresh zygote of the kind: the modules are not imported yet
    done, hazard = import_manifest.import_learned("k")
    assert done.modules >= 1 and done.failed == 0 and hazard is None
    assert f"{library}.models" in sys.modules


def test_modules_that_no_longer_import_are_skipped(data_dir: Path, library: str) -> None:
    before = frozenset(sys.modules)
    source = Path(importlib.import_module(f"{library}.models").__file__ or "")
    import_manifest.learn("k", before)
    _forget(library)
    source.unlink()  # the library was upgraded and the module is gone
    done, _ = import_manifest.import_learned("k")
    assert done.failed == 1
    assert f"{library}.models" not in import_manifest.read("k"), "dropped from the manifest"
    assert library in import_manifest.read("k")
    assert f"{library}.models" not in sys.modules


@pytest.mark.parametrize("content", [
    "{not json",
    '{"format": 1, "python": "2.7", "modules": ["json"]}',
    '{"format": 99, "python": "%s", "modules": ["json"]}',
    '{"format": 1, "python": "%s", "modules": [1, 2]}',
    '["json"]',
    "",
])
def test_a_corrupt_or_foreign_manifest_is_ignored_and_rewritten(
    data_dir: Path, library: str, content: str,
) -> None:
    path = import_manifest.manifest_path("k")
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    path.write_text(content.replace("%s", python))
    assert import_manifest.read("k") == []
    assert import_manifest.import_learned("k")[0].modules == 0
    before = frozenset(sys.modules)
    importlib.import_module(f"{library}.models")
    assert import_manifest.learn("k", before) >= 1
    data = json.loads(path.read_text())
    assert data["format"] == import_manifest.FORMAT and data["python"] == python
    assert f"{library}.models" in data["modules"]


def test_importing_stops_at_the_first_module_that_makes_forking_unsafe(
    data_dir: Path, library: str,
) -> None:
    before = frozenset(sys.modules)
    importlib.import_module(f"{library}.models")
    import_manifest.learn("k", before)
    _forget(library)
    seen: list[str] = []

    def hazard(name: str) -> str | None:
        seen.append(name)
        return "a thread was started"

    done, found = import_manifest.import_learned("k", hazard)
    assert found == "a thread was started" and len(seen) == 1 and done.modules == 1


def test_a_half_written_manifest_is_never_seen(data_dir: Path, library: str) -> None:
    """Writes go to a temporary file renamed into place: a leftover .part is ignored."""
    path = import_manifest.manifest_path("k")
    (path.parent / (path.name + ".x.part")).write_text('{"format": 1, "modu')
    assert import_manifest.read("k") == []
    before = frozenset(sys.modules)
    importlib.import_module(f"{library}.models")
    import_manifest.learn("k", before)
    assert f"{library}.models" in import_manifest.read("k")


def test_a_manifest_set_aside_is_no_longer_used_or_learned(data_dir: Path, library: str) -> None:
    before = frozenset(sys.modules)
    importlib.import_module(f"{library}.models")
    import_manifest.learn("k", before)
    where = import_manifest.set_aside("k", "1 Python thread(s) were started while importing")
    assert not import_manifest.manifest_path("k").exists()
    rejected = json.loads(where.read_text())
    assert "thread" in rejected["reason"] and f"{library}.models" in rejected["modules"]
    assert import_manifest.read("k") == []
    assert import_manifest.learn("k", frozenset()) == 0, "a rejected kind learns no more"
    assert not import_manifest.manifest_path("k").exists()


def test_modules_made_in_memory_are_not_recorded(data_dir: Path) -> None:
    import types

    before = frozenset(sys.modules)
    sys.modules["made_in_memory_xyz"] = types.ModuleType("made_in_memory_xyz")
    try:
        import_manifest.learn("k", before)
        assert "made_in_memory_xyz" not in import_manifest.read("k")
    finally:
        del sys.modules["made_in_memory_xyz"]
