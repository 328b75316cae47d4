"""workers/gguf_cache.py reports the converted copy's bytes as it syncs them to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workers import gguf_cache


def test_the_sync_phase_reports_bytes_done_of_the_total(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)

    def convert(gguf_path: Path, out: Path, report: Any) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w" * 3000)

    monkeypatch.setattr(gguf_cache, "convert", convert)
    reports: list[tuple[float | None, str, int | None, int | None]] = []

    def progress(fraction: float | None, message: str, /, *, done_bytes: int | None = None,
                 total_bytes: int | None = None) -> None:
        reports.append((fraction, message, done_bytes, total_bytes))

    folder, cached = gguf_cache.converted_folder(gguf, tmp_path / "cache", progress)
    assert not cached
    marker = len(f"{gguf}\n")  # the completeness marker, synced with the files
    total = marker + 2 + 3000
    synced = [r for r in reports if r[1] == "syncing the converted copy to disk"]
    assert [r[2:] for r in synced] == [(0, total), (marker, total), (marker + 2, total),
                                       (total, total)]
    fractions = [r[0] for r in synced]
    assert fractions == sorted(fractions) and 0.9 <= fractions[0] and fractions[-1] < 1
    assert gguf_cache.is_complete(folder)
