"""Memory returned: after a Kokoro unload, how much of what the load took is back?

Lemonade unloads a model by ending its worker process, so everything the worker held (heap,
weights, the allocator's caches, a CUDA context) goes back to the OS and the driver. Servers
that keep the model in-process (Kokoro-FastAPI's ``/dev/unload``: ``del model; gc.collect();
torch.cuda.empty_cache()``) keep whatever their allocators do not give back. This measures
both, side by side, against the issue's target: 100% of the worker's memory is back after
unload (the in-process arm shows what that design leaves).

Arms (both servers alive for the whole run; only one holds a model at a time):

- process exit: ``lemonade serve`` with one kokoro model (``--zygotes off`` by default, so
  nothing but the worker holds the model's libraries; ``--zygotes eager`` measures with the
  kokoro zygote resident, which is then part of every reading, "before" included);
- in-process: ``bench/inprocess_kokoro.py``, a long-lived server holding
  ``workers.kokoro_tts.KokoroModel`` itself, with torch, kokoro and spaCy imported at start
  as such a server would have them.

Each round, for each arm, three points: before the load; loaded (after a load and one
streamed speech request); after the unload (Lemonade: once the worker's pid is gone;
in-process: once ``/unload`` returned), each after ``--settle`` seconds. At each point:

- machine used = total - available (psutil), the median of ``--samples`` readings: the
  machine is shared, so this figure carries other people's noise;
- process RSS: the arm's own processes (Lemonade: the server and all its children; in-process:
  the one server process): the quieter figure;
- with ``--device cuda`` and ``nvidia-ml-py`` importable with a device present: NVML's used
  device memory and the GPU memory NVML lists for the arm's pids.

"returned %" = (loaded - after) / (loaded - before). "kept" = after - the arm's first
"before": what the process has gained over the whole run.

Run: ``.venv/bin/python bench/memory_returned.py [--rounds 3] [--device auto]
[--zygotes off] [--samples 5] [--settle 2] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from harness import print_table, stream_speech, work_folder
from inprocess_kokoro import (
    SPEECH,
    InProcessKokoro,
    LemonadeKokoro,
    ensure_weights,
)

MIB = 2**20
POINTS = ("before", "loaded", "after")


# ====================================================================== readings


class Nvml:
    """NVML's device and per-process memory, when ``pynvml`` and a device are there."""

    def __init__(self, pynvml: Any, index: int) -> None:
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.index = index

    @classmethod
    def open(cls, device: str) -> tuple[Nvml | None, str]:
        """(reader, why not) for ``cuda`` / ``cuda:N``; NVML indexes ignore
        CUDA_VISIBLE_DEVICES, so ``cuda:N`` is NVML's device N."""
        if not device.startswith("cuda"):
            return None, "not asked (--device cuda reads NVML)"
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            return None, "pynvml is not importable (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
            index = int(device.partition(":")[2] or 0)
            if index >= pynvml.nvmlDeviceGetCount():
                return None, f"NVML sees no device {index}"
            return cls(pynvml, index), ""
        except pynvml.NVMLError as e:
            return None, f"NVML: {e}"

    def used_bytes(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def pids_bytes(self, pids: set[int]) -> int:
        """GPU memory NVML lists for ``pids`` (0 inside a pid namespace NVML cannot see)."""
        total = 0
        for get in (self.nvml.nvmlDeviceGetComputeRunningProcesses,
                    self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in get(self.handle):
                if proc.pid in pids and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
        return total


@dataclass(frozen=True)
class Reading:
    used: float  # machine used bytes (median of samples)
    rss: int  # the arm's processes
    gpu_used: int | None = None
    gpu_pids: int | None = None


def machine_used(samples: int, interval_s: float) -> float:
    """Median of ``samples`` readings of total - available: a single reading on a shared
    machine catches someone else's compile or test run."""
    values = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        memory = psutil.virtual_memory()
        values.append(memory.total - memory.available)
    return statistics.median(values)


def process_tree(root: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            total += proc.memory_info().rss
    return total


def read(root: int, args: argparse.Namespace, nvml: Nvml | None) -> Reading:
    time.sleep(args.settle)  # let an exit or a free finish before reading
    used = machine_used(args.samples, args.interval)
    processes = process_tree(root)
    if nvml is None:
        return Reading(used, tree_rss(processes))
    pids = {p.pid for p in processes}
    return Reading(used, tree_rss(processes), nvml.used_bytes(), nvml.pids_bytes(pids))


# ====================================================================== arms


class ProcessExitArm(LemonadeKokoro):
    """``lemonade serve``: an unload ends the worker process."""

    name = "process-exit"

    def __init__(self, weights: Path, device: str, zygotes: str, workdir: Path) -> None:
        super().__init__(weights, device, zygotes, workdir)
        self.root = self.server.pid
        self.worker_gone: list[bool] = []
        if zygotes == "eager":
            self._wait_for_zygote()

    def _wait_for_zygote(self, timeout_s: float = 180.0) -> None:
        """With eager zygotes "before" must already include the zygote."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            zygotes = self.server.request("GET", "/api/v1/status")["server"]["zygotes"]
            if any(z.get("kind") == "kokoro" and z.get("state") != "stopped" and z.get("pid")
                   for z in zygotes):
                return
            time.sleep(0.5)
        print("NOTE: no kokoro zygote came up; readings are without one")

    def load(self) -> None:
        stream_speech(self.server.port, SPEECH)

    def unload(self) -> bool:
        gone = super().unload()
        self.worker_gone.append(gone)
        return gone


class InProcessArm(InProcessKokoro):
    """The in-process server: an unload is ``del`` + ``gc`` (+ ``empty_cache``)."""

    def __init__(self, weights: Path, device: str, workdir: Path) -> None:
        super().__init__(weights, device, workdir)
        self.root = self.server.pid

    def load(self) -> None:
        stream_speech(self.server.port, SPEECH)


Arm = ProcessExitArm | InProcessArm


def one_round(arm: Arm, args: argparse.Namespace, nvml: Nvml | None) -> dict[str, Reading]:
    readings = {"before": read(arm.root, args, nvml)}
    arm.load()
    readings["loaded"] = read(arm.root, args, nvml)
    arm.unload()
    readings["after"] = read(arm.root, args, nvml)
    return readings


# ====================================================================== report


def returned(before: float, loaded: float, after: float) -> float | None:
    grown = loaded - before
    return None if grown <= 0 else 100 * (loaded - after) / grown


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def report(results: dict[str, list[dict[str, Reading]]], nvml: Nvml | None) -> None:
    figures: list[tuple[str, Any]] = [("machine used", lambda r: r.used),
                                      ("process RSS", lambda r: r.rss)]
    if nvml is not None:
        figures += [("GPU used (NVML)", lambda r: r.gpu_used),
                    ("GPU of the pids (NVML)", lambda r: r.gpu_pids)]
    for title, value in figures:
        rows = []
        for name, rounds in results.items():
            start = value(rounds[0]["before"])
            for number, readings in enumerate(rounds, 1):
                before, loaded, after = (value(readings[p]) for p in POINTS)
                rows.append([name, number, before / MIB, loaded / MIB, after / MIB,
                             _percent(returned(before, loaded, after)), (after - start) / MIB])
        print_table(f"{title} (MiB)", ["arm", "round", "before", "loaded", "after", "returned",
                                       "kept"], rows)


def check_target(results: dict[str, list[dict[str, Reading]]], exit_arm: Arm | None) -> None:
    print("\nTarget: 100% of the worker's memory is back after unload "
          "(the in-process path shows what it leaves).")
    for name, rounds in results.items():
        by_rss = [returned(*(r[p].rss for p in POINTS)) for r in rounds]
        by_used = [returned(*(r[p].used for p in POINTS)) for r in rounds]
        kept = (rounds[-1]["after"].rss - rounds[0]["before"].rss) / MIB
        print(f"  {name}: returned (process RSS) median "
              f"{_percent(_median(by_rss))}, (machine used) median {_percent(_median(by_used))}; "
              f"kept over {len(rounds)} round(s) {kept:+.0f} MiB RSS")
    if isinstance(exit_arm, ProcessExitArm):
        gone = all(exit_arm.worker_gone)
        rss = [returned(*(r[p].rss for p in POINTS)) for r in results[exit_arm.name]]
        # The worker's own memory is back when its process is gone; the process-RSS figure
        # also covers the supervisor's own growth, allowed a 1% slack for its bookkeeping.
        met = gone and all(v is not None and v >= 99.0 for v in rss)
        print(f"  process exit: worker pid gone after every unload: {'yes' if gone else 'NO'}; "
              f"target {'met' if met else 'NOT met'}")


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ====================================================================== main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (both arms)")
    parser.add_argument("--zygotes", choices=("off", "lazy", "eager"), default="off",
                        help="the Lemonade server's zygote mode (default off: see the docstring)")
    parser.add_argument("--arms", default="process-exit,in-process",
                        help="comma-separated subset of: process-exit, in-process")
    parser.add_argument("--samples", type=int, default=5, help="machine readings per point")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between them")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait before each point's readings")
    parser.add_argument("--workdir", help="keep the weights and server folders here "
                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or set(args.arms) - {ProcessExitArm.name, InProcessArm.name}:
        parser.error("--arms: choose from process-exit, in-process")
    return args


def main() -> None:
    args = parse_args()
    nvml, why_not = Nvml.open(args.device)
    results: dict[str, list[dict[str, Reading]]] = {}
    exit_arm: Arm | None = None
    with work_folder(args.workdir, "lemonade-memory-") as workdir:
        weights = ensure_weights(workdir / "weights")
        arms: list[Arm] = []
        try:
            for name in args.arms:
                if name == ProcessExitArm.name:
                    exit_arm = ProcessExitArm(weights, args.device, args.zygotes,
                                              workdir / "process-exit")
                    arms.append(exit_arm)
                else:
                    arms.append(InProcessArm(weights, args.device, workdir / "in-process"))
            for number in range(1, args.rounds + 1):
                for arm in arms:
                    readings = one_round(arm, args, nvml)
                    results.setdefault(arm.name, []).append(readings)
                    print(f"round {number}/{args.rounds} {arm.name:12} process RSS MiB "
                          + " / ".join(f"{readings[p].rss / MIB:.0f}" for p in POINTS)
                          + "  machine used MiB "
                          + " / ".join(f"{readings[p].used / MIB:.0f}" for p in POINTS),
                          flush=True)
        finally:
            for arm in arms:
                arm.stop()
    total = psutil.virtual_memory().total / 2**30
    print(f"\nKokoro-82M from a .pth (random weights), device={args.device}, "
          f"zygotes={args.zygotes}, {args.rounds} rounds, {total:.0f} GiB machine, "
          f"{args.samples} samples per machine reading; NVML: "
          f"{f'device {nvml.index}' if nvml else why_not}")
    report(results, nvml)
    check_target(results, exit_arm)


if __name__ == "__main__":
    main()
