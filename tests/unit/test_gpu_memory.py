"""GPU memory reporting for the torch kinds: nothing on a CPU, never an exception."""

from __future__ import annotations

from workers.gpu_memory import nvml_process_bytes, torch_vram_bytes


def test_cpu_workers_hold_no_gpu_memory() -> None:
    assert torch_vram_bytes("cpu") == 0


def test_nvml_without_a_driver_or_package_reports_zero_instead_of_failing() -> None:
    # On this CPU-only machine NVML is absent or has no driver; a ping must not break.
    assert nvml_process_bytes() == 0
