"""GPU check: after an unload, is the worker's VRAM really back, and how soon?

For a machine with an NVIDIA GPU, ``nvidia-ml-py`` and a CUDA build of torch; it runs in well
under 5 minutes. The kokoro kind (torch; the real 82M architecture with random weights, built
by ``inprocess_kokoro.ensure_weights``) is loaded on ``cuda:N`` and unloaded, side by side:

- lemonade: ``lemonade serve`` with the model on the GPU (``--zygotes off``); the unload ends
  the worker process. Printed: NVML's memory for the worker's pid while loaded and after the
  unload (must reach 0), the device's used memory against its value before the load (must
  come back within +-64 MiB), and the seconds from the unload request until both held
  (target <= 1.5 s). ``/api/v1/status``'s ``devices`` section is printed too, to compare the
  server's own per-device figures with NVML's.
- in-process: a long-lived process holding the model itself, whose unload is ``del`` +
  ``gc.collect()`` + ``torch.cuda.empty_cache()`` (Kokoro-FastAPI's ``/dev/unload``): what
  that leaves on the device (the CUDA context and the allocator's reserve).

Run: ``.venv/bin/python bench/gpu_check.py [--device cuda:0] [--rounds 2] [--workdir DIR]``
Exits 2 with one line when NVML or the device is missing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import print_table, stream_speech, work_folder
from inprocess_kokoro import MODEL, SPEECH, InProcessKokoro, LemonadeKokoro, ensure_weights
from memory_returned import Nvml

MIB = 2**20
SLACK = 64 * MIB
TARGET_S = 1.5


def _until_released(nvml: Nvml, pid: int, used_before: int, limit_s: float = 30.0) -> float:
    """Seconds until NVML lists no memory for ``pid`` and the device is back to its level."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if nvml.pids_bytes({pid}) == 0 and nvml.used_bytes() <= used_before + SLACK:
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def lemonade_round(nvml: Nvml, weights: Path, device: str, workdir: Path) -> dict[str, Any]:
    before = nvml.used_bytes()
    arm = LemonadeKokoro(weights, device, "off", workdir)
    try:
        base = nvml.used_bytes()  # the server itself holds no GPU memory
        arm.server.request("POST", "/api/v1/load", {"model_name": MODEL})
        stream_speech(arm.server.port, SPEECH)
        row = arm.server.model_row(MODEL)
        pid = int(row["pid"])
        loaded_pid = nvml.pids_bytes({pid})
        loaded_used = nvml.used_bytes()
        devices = arm.server.request("GET", "/api/v1/status").get("devices", [])
        started = time.monotonic()
        arm.server.request("POST", "/api/v1/unload", {"model_name": MODEL})
        released_s = _until_released(nvml, pid, base, limit_s=30.0)
        after_used = nvml.used_bytes()
        return {
            "before": before, "loaded_pid": loaded_pid, "loaded_used": loaded_used,
            "after_pid": nvml.pids_bytes({pid}), "after_used": after_used,
            "released_s": released_s, "unload_s": time.monotonic() - started,
            "placed": row.get("placed_device") or row.get("device"), "devices": devices,
        }
    finally:
        arm.stop()


def inprocess_round(nvml: Nvml, weights: Path, device: str, workdir: Path) -> dict[str, Any]:
    before = nvml.used_bytes()
    arm = InProcessKokoro(weights, device, workdir)
    try:
        started_used = nvml.used_bytes()
        stream_speech(arm.server.port, SPEECH)  # loads on first use
        pid = arm.server.pid
        loaded_pid = nvml.pids_bytes({pid})
        loaded_used = nvml.used_bytes()
        arm.unload()
        time.sleep(1.5)  # the same allowance the lemonade arm is held to
        return {
            "before": before, "started_used": started_used, "loaded_pid": loaded_pid,
            "loaded_used": loaded_used, "after_pid": nvml.pids_bytes({pid}),
            "after_used": nvml.used_bytes(),
        }
    finally:
        arm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    nvml, why = Nvml.open(args.device)
    if nvml is None:
        raise SystemExit(f"gpu_check needs an NVIDIA GPU: {why}") from None
    with work_folder(args.workdir, "gpu-check-") as workdir:
        weights = ensure_weights(workdir / "weights")
        ours = [lemonade_round(nvml, weights, args.device, workdir / f"lemonade-{i}")
                for i in range(args.rounds)]
        theirs = [inprocess_round(nvml, weights, args.device, workdir / f"inprocess-{i}")
                  for i in range(args.rounds)]
    mib = lambda n: round(n / MIB, 1)  # noqa: E731
    print_table(
        f"lemonade: unload ends the worker ({args.device})",
        ["round", "placed", "pid VRAM loaded", "pid VRAM after", "device used before",
         "after", "back within 64 MiB", "released in s", "<= 1.5 s"],
        [[i + 1, r["placed"], mib(r["loaded_pid"]), mib(r["after_pid"]), mib(r["before"]),
          mib(r["after_used"]), abs(r["after_used"] - r["before"]) <= SLACK,
          round(r["released_s"], 3), r["released_s"] <= TARGET_S] for i, r in enumerate(ours)],
    )
    print_table(
        "in-process: del + gc.collect() + torch.cuda.empty_cache()",
        ["round", "pid VRAM loaded", "pid VRAM after", "device used before", "after",
         "left on the device MiB"],
        [[i + 1, mib(r["loaded_pid"]), mib(r["after_pid"]), mib(r["before"]),
          mib(r["after_used"]), mib(r["after_used"] - r["before"])]
         for i, r in enumerate(theirs)],
    )
    for row in ours[-1]["devices"]:
        print("server's view:", {k: row[k] for k in ("name", "total_bytes", "budget_bytes",
                                                     "used_by_models_bytes",
                                                     "used_by_others_bytes", "free_bytes")})


if __name__ == "__main__":
    main()
