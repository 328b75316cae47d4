"""Swap speed: a model swapped into a forked worker against the same model reloaded in a warm
process, and against a fresh spawn, for every model of the shipped ``lemonade.toml``.

Four arms, measured side by side in one run (each round visits every model in turn, and
each model is timed in every arm before the next model, so a noisy neighbour hits all arms
alike):

* **fork**: ``lemonade serve`` on the shipped config with ``--max-loaded-models 1 --zygotes
  eager``: each request for a model that is not loaded evicts the loaded one and forks a
  worker from the kind's zygote (the swap-in); the same request again is the **warm** time;
* **spawn**: the same server with ``--zygotes off`` (a fresh interpreter per load);
* **in-process**: one long-lived Python process that holds one model at a time and reloads
  the next in place (``del`` + ``gc``, then the kind's ``load`` and, where the recipe asks,
  its warmup): the design of Kokoro-FastAPI and other single-process servers, running the
  same ``workers`` code as the real workers.

Every time is to the request's first result (see :mod:`bench.swap_requests`). Round 0 only
loads everything once (zygote imports, caches, page cache) and is not counted. The phase
table splits the fork arm's swap-in (from the server's status): the fork to the worker's
hello, the socket handshake and the supervisor's own bookkeeping, the kind's ``load``, the
warmup call, and what is left: retiring the previous model plus the first request itself
(a warm request is shown beside it, for scale).

    .venv/bin/python bench/swap.py                 # 5 counted rounds, every shipped model
    .venv/bin/python bench/swap.py --rounds 2 --models minilm,whisper
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import ServerProcess, print_table, summary, work_folder
from swap_requests import http_first_result, inprocess_first_result

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "lemonade.toml"
#: Issue 11's targets: the forked swap-in's first result within 1.3x the in-process reload;
#: swap penalty (swap-in minus warm) at most these seconds (the kokoro torch kind has none).
RATIO_TARGET = 1.3
PENALTY_TARGETS = {"minilm": 0.5, "whisper": 0.5, "smollm2": 0.5, "kokoro-onnx": 1.0}
SERVER_ARGS = ("--max-loaded-models", "1", "--auto-unload-timer", "0",
               "--zygote-idle-timeout", "0")


def recipes(config: Path, names: list[str] | None) -> list[Any]:
    from supervisor.config import load_settings

    settings = load_settings(cli={"config": str(config)}, env={})
    found = [r for r in settings.models.values() if names is None or r.name in names]
    if names is not None and len(found) != len(names):
        missing = set(names) - {r.name for r in found}
        raise SystemExit(f"not in {config}: {', '.join(sorted(missing))}")
    return found


# ----------------------------------------------------------------- the in-process arm


def serve_inprocess(config: Path) -> None:
    """Child process: read one model name per line, swap it in, answer with its timings."""
    import threading

    from workers import registry
    from workers.base import CallContext, LoadContext, LoadRequest
    from workers.protocol import WARMUP_OP

    by_name = {r.name: r for r in recipes(config, None)}
    current: Any = None
    for line in sys.stdin:
        recipe = by_name[line.strip()]
        started = time.perf_counter()
        current = None
        gc.collect()
        freed = time.perf_counter()
        model = registry.resolve(recipe.kind)()
        model.load(LoadRequest(name=recipe.name, type=recipe.type, device=recipe.device,
                               options=dict(recipe.options)), LoadContext(lambda *_: None))
        loaded = time.perf_counter()
        if recipe.warmup:
            try:
                model.call(WARMUP_OP, {}, CallContext(lambda _d: None, threading.Event()))
            except Exception:  # a kind without warmup
                pass
        warmed = time.perf_counter()
        current = model
        first = inprocess_first_result(current, recipe.type)
        warm = inprocess_first_result(current, recipe.type)
        print(json.dumps({"swap": warmed - started + first, "warm": warm,
                          "free": freed - started, "load": loaded - freed,
                          "warmup": warmed - loaded, "first": first}), flush=True)


class InProcess:
    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-inprocess", "--config", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def swap(self, name: str) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the in-process arm died while swapping in {name}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


# ----------------------------------------------------------------- the server arms


def server_swap(server: ServerProcess, recipe: Any) -> dict[str, float]:
    swap = http_first_result(server.port, recipe.name, recipe.type)
    row = server.model_row(recipe.name)
    warm = http_first_result(server.port, recipe.name, recipe.type)
    info = row.get("info") or {}
    return {"swap": swap, "warm": warm, "load_total": row.get("load_seconds") or 0.0,
            "hello": info.get("hello_seconds") or 0.0,
            "load": info.get("load_seconds") or 0.0,
            "warmup": info.get("warmup_seconds") or 0.0, "start": info.get("worker_start")}


def wait_for_zygotes(server: ServerProcess, kinds: set[str], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = server.request("GET", "/api/v1/status")["server"].get("zygotes") or []
        if kinds <= {r["kind"] for r in rows if r["state"] == "ready"}:
            return
        time.sleep(0.5)
    raise SystemExit(f"zygotes for {sorted(kinds)} were not ready within {timeout_s:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--config", default=str(SHIPPED), help="config (default: shipped)")
    parser.add_argument("--workdir", help="keep the servers' files here")
    parser.add_argument("--serve-inprocess", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = Path(args.config).resolve()
    if args.serve_inprocess:
        serve_inprocess(config)
        return
    chosen = recipes(config, args.models.split(",") if args.models else None)
    text = config.read_text()
    data_dir = ROOT / ".lemonade"  # the caches a user's own server builds (and reuses)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        r.name: {"fork": [], "spawn": [], "inprocess": []} for r in chosen}
    with work_folder(args.workdir, "lemonade-swap-") as folder:
        (folder / "fork").mkdir(exist_ok=True)
        (folder / "spawn").mkdir(exist_ok=True)
        common = (*SERVER_ARGS, "--data-dir", str(data_dir))
        fork = ServerProcess(text, folder / "fork", (*common, "--zygotes", "eager"),
                             start_timeout_s=120)
        spawn = ServerProcess(text, folder / "spawn", (*common, "--zygotes", "off"),
                              start_timeout_s=120)
        inprocess = InProcess(config)
        try:
            wait_for_zygotes(fork, {r.kind for r in chosen})
            for round_no in range(args.rounds + 1):
                started = time.monotonic()
                for recipe in chosen:
                    measured = {"fork": server_swap(fork, recipe),
                                "spawn": server_swap(spawn, recipe),
                                "inprocess": inprocess.swap(recipe.name)}
                    if round_no > 0:  # round 0 loads everything once and is not counted
                        for arm, value in measured.items():
                            results[recipe.name][arm].append(value)
                print(f"round {round_no}{' (not counted)' if round_no == 0 else ''} "
                      f"took {time.monotonic() - started:.0f}s", flush=True)
            zygotes = zygote_memory(fork, chosen)
        finally:
            inprocess.stop()
            fork.stop()
            spawn.stop()
    report(chosen, results)
    print_table("What the fork arm's zygotes hold after unloading everything (MiB), and what "
                "each model's forked worker was charged (its USS)", ["zygote kind", "RSS",
                "unique (USS)", "learned modules", "workers charged (MiB)"], zygotes)


def zygote_memory(server: ServerProcess, chosen: list[Any]) -> list[list[Any]]:
    """Per kind: the zygote's RSS and USS with no worker left, and the measured cost (USS)
    of each of its models' last forked worker."""
    import psutil

    charged: dict[str, list[str]] = {}
    for recipe in chosen:
        row = server.model_row(recipe.name)
        cost = row.get("memory_estimate_bytes")  # the measured cost once it has loaded
        if cost:
            charged.setdefault(recipe.kind, []).append(f"{recipe.name} {cost / 2**20:.0f}")
    server.request("POST", "/api/v1/unload", {})
    rows = []
    for zygote in server.request("GET", "/api/v1/status")["server"].get("zygotes") or []:
        if zygote["pid"] is None:
            continue
        try:
            info = psutil.Process(zygote["pid"]).memory_full_info()
        except psutil.Error:
            continue
        rows.append([zygote["kind"], info.rss / 2**20, info.uss / 2**20,
                     zygote.get("learned_modules", 0),
                     ", ".join(charged.get(zygote["kind"], [])) or "-"])
    return rows


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(chosen: list[Any], results: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    rounds = len(next(iter(results.values()))["fork"])
    swap_rows, phase_rows, verdicts = [], [], []
    for recipe in chosen:
        arms = results[recipe.name]
        fork_swap, fork_p99 = summary([r["swap"] for r in arms["fork"]])
        fork_warm = _median(arms["fork"], "warm")
        inproc_swap, inproc_p99 = summary([r["swap"] for r in arms["inprocess"]])
        spawn_swap, spawn_p99 = summary([r["swap"] for r in arms["spawn"]])
        penalty = statistics.median(r["swap"] - r["warm"] for r in arms["fork"])
        ratio = fork_swap / inproc_swap
        # The stricter floor: the in-process reload without freeing the previous model.
        strict = fork_swap / statistics.median(r["swap"] - r["free"] for r in arms["inprocess"])
        swap_rows.append([recipe.name, fork_swap, fork_p99, fork_warm, penalty, inproc_swap,
                          inproc_p99, _median(arms["inprocess"], "warm"), f"{ratio:.2f}x",
                          f"{strict:.2f}x", spawn_swap, spawn_p99])
        hello, load = _median(arms["fork"], "hello"), _median(arms["fork"], "load")
        warmup, total = _median(arms["fork"], "warmup"), _median(arms["fork"], "load_total")
        phase_rows.append([recipe.name, hello, max(0.0, total - hello - load - warmup), load,
                           warmup, fork_swap - total, fork_warm, fork_swap])
        starts = {r["start"] for r in arms["fork"]}
        verdicts.append([f"{recipe.name}: fork swap-in <= {RATIO_TARGET}x in-process reload",
                         f"{ratio:.2f}x", "yes" if ratio <= RATIO_TARGET else "**no**"])
        if recipe.name in PENALTY_TARGETS:
            limit = PENALTY_TARGETS[recipe.name]
            verdicts.append([f"{recipe.name}: swap penalty <= {limit:g} s", f"{penalty:.2f} s",
                             "yes" if penalty <= limit else "**no**"])
        if starts != {"fork"}:
            verdicts.append([f"{recipe.name}: every fork-arm worker was forked",
                             ", ".join(sorted(map(str, starts))), "**no**"])
    print_table(f"Swap-in vs warm, seconds to the first result ({rounds} rounds, medians; "
                "p99 = the slowest of so few)",
                ["model", "fork swap-in", "p99", "warm", "penalty", "in-process reload", "p99",
                 "in-process warm", "fork/in-process", "same, no free", "spawn swap-in",
                 "p99"], swap_rows)
    print_table("Where a forked swap-in goes (medians, seconds)",
                ["model", "fork to hello", "handshake + supervisor", "kind load", "warmup",
                 "evict + first request", "(a warm request)", "swap-in"], phase_rows)
    print_table("Where an in-process reload goes (medians, seconds)",
                ["model", "free the previous", "kind load", "warmup", "first request",
                 "reload"],
                [[r.name, *(_median(results[r.name]["inprocess"], k)
                            for k in ("free", "load", "warmup", "first", "swap"))]
                 for r in chosen])
    print_table("Targets", ["target", "measured", "met"], verdicts)


if __name__ == "__main__":
    main()
