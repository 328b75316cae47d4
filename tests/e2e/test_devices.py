"""Per-device figures in every view of a real server: status JSON, ``lemonade status``,
``/api/ps`` and ``/metrics``.

The GPUs are STAND-INS (this machine has none): ``cuda:0`` is read from a stand-in probe
file (``LEMONADE_STAND_IN_GPU_PROBE``) that also reports another program's memory on it, and
``npu`` is a declared device no probe sees. The models on them are synthetic workers with
``stand_in_vram_mb``: real processes that report a VRAM figure and allocate none.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import run_cli

MiB = 1024 * 1024
CONFIG = """
[server]
auto_unload_timer = "10m"
memory_budget = "none"
[devices."cuda:0"]
memory = "1GiB"
headroom = "0"
[devices.npu]
memory = "256MiB"
[models.gpu-voice]
recipe = "synthetic"
type = "tts"
vram = "300MiB"
[models.gpu-voice.options]
stand_in_vram_mb = 300
[models.npu-voice]
recipe = "synthetic"
type = "tts"
device = "npu"
vram = "100MiB"
[models.npu-voice.options]
stand_in_vram_mb = 100
"""


def test_every_view_shows_the_devices(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    probe = tmp_path / "gpus.json"
    probe.write_text(json.dumps({"gpus": [{
        "index": 0, "label": "stand-in GPU", "total": 1024 * MiB, "used": 200 * MiB,
        "processes": {"4194000": 200 * MiB},  # not ours: another program's 200 MiB
    }]}))
    server = start_server(CONFIG, env={"LEMONADE_STAND_IN_GPU_PROBE": str(probe)})
    assert server.load("gpu-voice")["state"] == "ready"
    assert server.load("npu-voice")["state"] == "ready"
    assert server.speech("gpu-voice").status == 200

    status = server.status()
    models = {m["name"]: m for m in status["models"]}
    assert models["gpu-voice"]["placed_device"] == "cuda:0"  # auto, and the GPU had room
    assert models["gpu-voice"]["device"] == "cuda:0"
    assert models["gpu-voice"]["memory_by_device"]["cuda:0"] == 300 * MiB
    assert models["npu-voice"]["memory_by_device"]["npu"] == 100 * MiB
    devices = {d["name"]: d for d in status["devices"]}
    assert set(devices) == {"cpu", "cuda:0", "npu"}
    gpu = devices["cuda:0"]
    assert (gpu["seen"], gpu["total_bytes"], gpu["used_by_others_bytes"]) == (
        True, 1024 * MiB, 200 * MiB)
    assert gpu["budget_bytes"] == 824 * MiB  # 1 GiB less the other program's 200 MiB
    assert gpu["used_by_models_bytes"] == 300 * MiB
    assert devices["npu"]["seen"] is False and devices["npu"]["budget_bytes"] == 256 * MiB

    ps = {m["name"]: m for m in server.get("/api/ps").json()["models"]}
    assert ps["gpu-voice"]["size_vram"] == 300 * MiB

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(server.get("/metrics").body.decode())
        for sample in family.samples
    }
    assert samples[("lemonade_device_budget_bytes", (("device", "cuda:0"),))] == 824 * MiB
    assert samples[("lemonade_device_used_bytes",
                    (("by", "others"), ("device", "cuda:0")))] == 200 * MiB
    assert samples[("lemonade_device_used_bytes",
                    (("by", "models"), ("device", "npu")))] == 100 * MiB

    table = run_cli("status", env={"LEMONADE_URL": server.url})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["DEVICE", "TOTAL", "BUDGET"]
    gpu_row = next(line for line in lines if line.startswith("cuda:0"))
    assert gpu_row.split()[1:6] == ["1.0", "GiB", "824.0", "MiB", "300.0"]
    assert any(line.startswith("npu (declared)") for line in lines)
    voice_row = next(line for line in lines if line.startswith("gpu-voice"))
    assert "300.0 MiB cuda:0" in voice_row


def test_a_recipe_on_a_missing_gpu_stops_serve_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "lemonade.toml"
    config.write_text('[devices."cuda:0"]\nmemory = "8GiB"\n'
                      '[models.lost]\nrecipe = "synthetic"\ntype = "tts"\ndevice = "cuda:3"\n')
    result = run_cli("serve", "--config", str(config), "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("lemonade: ") and "cuda:3" in lines[-1], result.stderr
    assert "[models.lost] device" in lines[-1]
    assert "Traceback" not in result.stderr
