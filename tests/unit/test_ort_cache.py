"""The optimised-graph cache for ONNX Runtime sessions (workers.ort_cache), with the real
onnxruntime on the small models it ships: used on the second load, rebuilt when its source
changes, and a corrupt or half-written cache file is detected and rebuilt, never opened."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnxruntime import datasets  # noqa: E402

from workers import ort_cache  # noqa: E402

CPU = ["CPUExecutionProvider"]


def _options() -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return options


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copyfile(datasets.get_example("sigmoid.onnx"), path)
    return path


def _open(source: Path, cache: Path) -> tuple[Any, str]:
    return ort_cache.cached_session(ort, source, cache, _options, CPU)


def _cached(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.optimized.onnx"))


def _sigmoid(session: Any) -> np.ndarray:
    name = session.get_inputs()[0].name
    x = np.linspace(-2, 2, 60, dtype=np.float32).reshape(3, 4, 5)
    return session.run(None, {name: x})[0]


def test_the_second_load_opens_the_cached_graph(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    first, how = _open(source, cache)
    assert how == "built"
    (graph,) = _cached(cache)
    assert (graph.parent / (graph.name + ".sha256")).is_file()
    second, how = _open(source, cache)
    assert how == "cache"
    np.testing.assert_allclose(_sigmoid(second), _sigmoid(first), rtol=1e-6)


def test_a_changed_source_gets_a_new_graph_and_the_old_one_goes(
    source: Path, tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    _open(source, cache)
    (old,) = _cached(cache)
    shutil.copyfile(datasets.get_example("mul_1.onnx"), source)  # another model, same path
    session, how = _open(source, cache)
    assert how == "built", "a changed source must not open the old graph"
    (new,) = _cached(cache)
    assert new != old and not old.exists()
    assert session.get_inputs()[0].shape == [3, 2], "the new source's graph"


def test_the_key_follows_the_library_version_and_the_cpu(
    source: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = ort_cache.cache_key(source, "1.20.0", CPU, "ORT_ENABLE_ALL")
    assert key != ort_cache.cache_key(source, "1.21.0", CPU, "ORT_ENABLE_ALL")
    assert key != ort_cache.cache_key(source, "1.20.0", CPU, "ORT_ENABLE_BASIC")
    monkeypatch.setattr(ort_cache, "cpu_signature", lambda: "another CPU | flags=sse2")
    assert key != ort_cache.cache_key(source, "1.20.0", CPU, "ORT_ENABLE_ALL"), (
        "a graph optimised for one CPU must not be opened on another")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_checksum", "garbage"])
def test_a_damaged_cache_file_is_rebuilt_and_the_load_succeeds(
    source: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    reference, _ = _open(source, cache)
    (graph,) = _cached(cache)
    stamp = graph.parent / (graph.name + ".sha256")
    data = bytearray(graph.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    elif damage == "truncate":
        graph.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "no_checksum":  # a crash between the file and its checksum
        stamp.unlink()
    else:  # garbage that matches its (rewritten) checksum: onnxruntime refuses it
        graph.write_bytes(b"not an onnx graph")
        stamp.write_text(ort_cache.file_sha256(graph) + "\n")
    session, how = _open(source, cache)
    assert how == "built", f"a {damage} cache file must be rebuilt, never opened"
    assert "rebuilding" in caplog.text
    np.testing.assert_allclose(_sigmoid(session), _sigmoid(reference), rtol=1e-6)
    _, how = _open(source, cache)
    assert how == "cache", "the rebuilt file is good"


@pytest.mark.parametrize("where", ["missing", "a_file"])
def test_a_cache_dir_that_cannot_be_written_still_loads(
    source: Path, tmp_path: Path, where: str,
) -> None:
    cache = tmp_path / "cache"
    if where == "a_file":
        cache.write_text("a file where the folder should be")
    session, how = _open(source, cache)
    assert how == "uncached" and _sigmoid(session).shape == (3, 4, 5)


def test_sessions_with_another_provider_are_not_cached(source: Path, tmp_path: Path) -> None:
    class FakeOrt:  # only the provider list differs; the session itself is real
        __version__ = ort.__version__
        GraphOptimizationLevel = ort.GraphOptimizationLevel

        @staticmethod
        def InferenceSession(path: str, sess_options: Any, providers: list[Any]) -> Any:
            return ort.InferenceSession(path, sess_options=sess_options, providers=CPU)

    cache = tmp_path / "cache"
    cache.mkdir()
    _, how = ort_cache.cached_session(
        FakeOrt, source, cache, _options,
        [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    assert how == "uncached" and _cached(cache) == []
