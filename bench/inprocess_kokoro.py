"""The in-process architecture, for comparison: one long-lived server that keeps Kokoro in it.

Kokoro-FastAPI and similar servers hold the model in the server process and "unload" it with
``del model; gc.collect(); torch.cuda.empty_cache()``. Reloading is then only reading the
weights again (torch, kokoro and spaCy stay imported), but whatever the allocator keeps
stays with the process. ``bench/cold_start.py`` times a reload here against a worker that
Lemonade spawns or forks; ``bench/memory_returned.py`` measures what each way leaves behind.

This module is also what both benchmarks share: the weights file every arm reads
(:func:`ensure_weights`, random Kokoro-82M weights saved once), the request every arm is sent
(:data:`SPEECH`, timed with ``harness.stream_speech``), the recipe for ``lemonade serve``
(:func:`recipe`), a wait for a worker's exit (:func:`wait_gone`), and the two arms
(:class:`LemonadeKokoro`, :class:`InProcessKokoro`).

The server holds ``workers.kokoro_tts.KokoroModel`` itself, so both architectures run the
same load and synthesis code; only where the model lives differs. Routes:

- ``POST /v1/audio/speech``: (re)loads on demand from the ``.pth`` file, then streams the
  audio; the ``X-Load-Seconds`` header says how long the load took (0 when already loaded);
- ``POST /unload``: drops the model, ``gc.collect()``, ``torch.cuda.empty_cache()`` on CUDA;
- ``GET /status``: pid, whether loaded, RSS, the CUDA allocator's figures.

Run by hand: ``.venv/bin/python bench/inprocess_kokoro.py make-weights DIR`` writes
``DIR/kokoro-random.pth`` and ``DIR/voices/``; ``.venv/bin/python bench/inprocess_kokoro.py
serve --weights DIR/kokoro-random.pth [--device auto] [--port 0]`` serves it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import ServerProcess

MODEL = "kokoro"
WEIGHTS_NAME = "kokoro-random.pth"
#: One sentence: Kokoro streams sentence by sentence, so the first audio byte comes once the
#: whole first sentence is synthesised; more sentences would only lengthen each round.
TEXT = "Lemonade keeps each model in its own process, and unloading it ends that process."
#: The one request every arm gets: same text, voice, format; streamed.
SPEECH: dict[str, Any] = {"model": MODEL, "input": TEXT, "voice": "af_heart",
                          "response_format": "pcm", "stream": True}
_RECIPE = """
[server]
auto_unload_timer = "never"
[models.{model}]
recipe = "kokoro"
type = "tts"
device = "{device}"
[models.{model}.options]
weights = "{weights}"
"""


def recipe(weights: Path, device: str) -> str:
    """A ``lemonade.toml`` with one kokoro model reading ``weights`` (its voices beside it)."""
    return _RECIPE.format(model=MODEL, device=device, weights=weights)


# ====================================================================== the weights file


def ensure_weights(folder: Path) -> Path:
    """``folder/kokoro-random.pth`` (+ ``voices/``), written once by a child process.

    A child does it so that the benchmark process itself never imports torch: its memory
    would otherwise be part of every machine-wide reading.
    """
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        print(f"writing random Kokoro-82M weights to {path} ...", flush=True)
        subprocess.run([sys.executable, __file__, "make-weights", str(folder)], check=True)
    return path


def _write_weights(folder: Path, seed: int) -> None:
    """Build the real architecture with random weights and save it as kokoro-v1_0.pth is laid
    out: one state dict per top-level module (bert, bert_encoder, predictor, ...)."""
    # KokoroModel caches an empty state dict for its "random" mode under the data dir; keep
    # that in the work folder, not in the repository.
    os.environ["LEMONADE_DATA_DIR"] = str(folder / "data")
    import torch

    from workers.base import LoadContext, LoadRequest
    from workers.kokoro_tts import KokoroModel

    model = KokoroModel()
    model.load(LoadRequest(MODEL, "tts", "cpu", {"weights": "random", "seed": seed}),
               LoadContext(lambda _fraction, _message: None))
    # The kind's own random mode also sets a natural speaking pace (_natural_pace); saving
    # after load keeps that, so every arm synthesises the same amount of audio per sentence.
    kmodel = model._model  # a benchmark may look inside
    state = {name: module.state_dict() for name, module in kmodel.named_children()}
    voices = folder / "voices"
    voices.mkdir(parents=True, exist_ok=True)
    for name, pack in model._voices.items():  # seeded random packs
        torch.save(pack, voices / f"{name}.pt")
    tmp = folder / f"{WEIGHTS_NAME}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / WEIGHTS_NAME)  # the file appears whole or not at all


# ====================================================================== client side


def wait_gone(pid: int | None, timeout_s: float = 60.0) -> bool:
    """Wait until process ``pid`` has exited (a zombie counts: its memory is already free)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while pid is not None and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return pid is None


class InProcessServer(ServerProcess):
    """This module's ``serve`` as a child process, with the harness's log drain and requests."""

    def __init__(self, weights: Path, device: str, workdir: Path,
                 start_timeout_s: float = 120.0) -> None:
        # Not ServerProcess.__init__ (that one starts ``lemonade serve``); its start-up, log
        # drain, requests and stop are the same.
        self._start([sys.executable, __file__, "serve", "--weights", str(weights),
                     "--device", device, "--port", "0"], workdir,
                    {**os.environ, "LEMONADE_DATA_DIR": str(workdir / "data"),
                     "HF_HUB_OFFLINE": "1"}, start_timeout_s)

    def unload(self) -> dict[str, Any]:
        return self.request("POST", "/unload")

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/status")


class LemonadeKokoro:
    """``lemonade serve`` with the one kokoro recipe; an unload ends the worker process."""

    def __init__(self, weights: Path, device: str, zygotes: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.server = ServerProcess(recipe(weights, device), workdir, ["--zygotes", zygotes])

    def unload(self) -> bool:
        """Unload; True once the worker's pid is gone."""
        pid = self.server.model_row(MODEL).get("pid")
        self.server.request("POST", "/api/v1/unload", {"model_name": MODEL})
        return wait_gone(pid)

    def stop(self) -> None:
        self.server.stop()


class InProcessKokoro:
    """The in-process server: an unload is ``del`` + ``gc`` (+ ``empty_cache``)."""

    name = "in-process"

    def __init__(self, weights: Path, device: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.server = InProcessServer(weights, device, workdir)

    def unload(self) -> None:
        self.server.unload()

    def stop(self) -> None:
        self.server.stop()


# ====================================================================== server side


class Holder:
    """The one model of the in-process server, loaded on demand and dropped on unload."""

    def __init__(self, weights: Path, device: str) -> None:
        self.weights = weights
        self.device = device
        self.model: Any = None
        self.loaded_device: str | None = None
        self.load_seconds: float | None = None
        self.loads = 0

    def load(self) -> None:
        from workers.base import LoadContext, LoadRequest
        from workers.kokoro_tts import KokoroModel

        started = time.perf_counter()
        model = KokoroModel()
        result = model.load(LoadRequest(MODEL, "tts", self.device, {"weights": str(self.weights)}),
                            LoadContext(lambda _fraction, _message: None))
        self.model = model
        self.loaded_device = result.device
        self.load_seconds = time.perf_counter() - started
        self.loads += 1

    def unload(self) -> bool:
        """What Kokoro-FastAPI's ``/dev/unload`` does: drop the reference, collect, empty the
        CUDA cache. The process, its imports and its allocator's free lists stay."""
        import gc

        import torch

        was_loaded = self.model is not None
        self.model = None  # the only reference: the same as ``del model``
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return was_loaded


def _build_app(holder: Holder) -> Any:
    import asyncio

    from aiohttp import web

    lock = asyncio.Lock()  # one load or unload at a time; speech waits for a load in progress
    end = object()

    async def speech(request: web.Request) -> web.StreamResponse:
        from workers.base import CallContext

        args = await request.json()
        async with lock:
            load_s = 0.0
            if holder.model is None:
                await asyncio.to_thread(holder.load)
                load_s = holder.load_seconds or 0.0
            model = holder.model
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        ctx = CallContext(lambda chunk: loop.call_soon_threadsafe(queue.put_nowait, chunk),
                          cancelled)
        call = loop.run_in_executor(None, model.call, "speech", args, ctx)
        del model  # the call holds it while it runs; an unload afterwards must free it
        # The executor sets the result with call_soon_threadsafe after the last emit was
        # queued the same way, so this marker arrives after every chunk.
        call.add_done_callback(lambda _f: queue.put_nowait(end))
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm",
                                               "X-Load-Seconds": f"{load_s:.4f}",
                                               "X-Device": str(holder.loaded_device)})
        await response.prepare(request)
        try:
            while (chunk := await queue.get()) is not end:
                if isinstance(chunk, bytes | bytearray):
                    await response.write(bytes(chunk))
            call.result()  # raise what the model raised
        finally:
            cancelled.set()
        await response.write_eof()
        return response

    async def unload(_request: web.Request) -> web.Response:
        async with lock:
            started = time.perf_counter()
            was_loaded = await asyncio.to_thread(holder.unload)
        return web.json_response({"unloaded": was_loaded,
                                  "seconds": round(time.perf_counter() - started, 4)})

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(_status(holder))

    app = web.Application()
    app.add_routes([web.post("/v1/audio/speech", speech), web.post("/unload", unload),
                    web.get("/status", status)])
    return app


def _status(holder: Holder) -> dict[str, Any]:
    import psutil
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "pid": os.getpid(), "loaded": holder.model is not None, "loads": holder.loads,
        "load_seconds": holder.load_seconds, "device": holder.loaded_device or holder.device,
        "rss_bytes": psutil.Process().memory_info().rss,
        "cuda_allocated_bytes": torch.cuda.memory_allocated() if cuda else None,
        "cuda_reserved_bytes": torch.cuda.memory_reserved() if cuda else None,
    }


def _die_with_parent() -> None:
    """Linux: SIGKILL this server when the benchmark that started it dies, so a crashed or
    interrupted benchmark leaves no server behind."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent was already gone before prctl took effect
        os._exit(1)


def _serve(weights: Path, device: str, port: int) -> None:
    import asyncio
    import signal

    from aiohttp import web

    from workers.kokoro_tts import KokoroModel

    _die_with_parent()
    # Import everything a load needs before serving, as a long-lived server would have: a
    # reload then pays only for reading and building the model, and the memory baseline
    # already holds the libraries.
    KokoroModel.prepare_zygote()
    holder = Holder(weights, device)

    async def run() -> None:
        runner = web.AppRunner(_build_app(holder), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        host, bound = runner.addresses[0][:2]
        print(f"in-process kokoro server (pid {os.getpid()}) listening on "
              f"http://{host}:{bound}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-weights", help="write random weights + voices to DIR")
    make.add_argument("folder", type=Path)
    make.add_argument("--seed", type=int, default=0)
    serve = commands.add_parser("serve", help="serve Kokoro in-process")
    serve.add_argument("--weights", type=Path, required=True)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.command == "make-weights":
        args.folder.mkdir(parents=True, exist_ok=True)
        _write_weights(args.folder, args.seed)
    else:
        _serve(args.weights, args.device, args.port)


if __name__ == "__main__":
    main()
