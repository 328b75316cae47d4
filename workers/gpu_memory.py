"""How much GPU memory this worker process holds, for the torch kinds' ``vram_bytes()``.

torch's ``memory_reserved`` counts what its caching allocator holds on one device, but not the
CUDA context (often hundreds of MB), which is what the driver and the next model actually
lose. NVML's per-process figure includes it, so when ``nvidia-ml-py`` is installed the larger
of the two is reported; without it, torch's figure is the best this process can see.
"""

from __future__ import annotations

import os


def torch_vram_bytes(device: str) -> int:
    """GPU bytes this process holds on ``device`` ("cpu" -> 0); never raises."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return max(int(torch.cuda.memory_reserved(device)), nvml_process_bytes())


def nvml_process_bytes() -> int:
    """This process's GPU memory as the driver sees it (context included), if NVML exists."""
    try:
        import pynvml  # from nvidia-ml-py, optional
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            total = 0
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory:
                        total += int(proc.usedGpuMemory)
            return total
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML present but unusable (no driver, no permission): not fatal
        return 0
