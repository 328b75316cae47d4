"""LLM speed: the shipped ``smollm2`` through the ``llm`` kind and the server, against a plain
``transformers`` generate loop of the same weights.

Four arms, measured side by side in one run (each round times every arm once, in turn, so a
noisy neighbour hits all arms alike):

* **generate**: ``model.generate`` in this process on the folder the llm kind converted from
  the GGUF (same weights, the recipe's dtype, greedy, this process's torch threads), with a streamer
  that only notes the time of each token, for the time to the first token;
* **kind**: :class:`workers.llm.CausalLMModel` loaded and called in this process (``chat``,
  streamed, temperature 0), the code a worker runs, without the worker around it;
* **http stream** / **http whole**: ``lemonade serve`` on the shipped config, called with the
  ``openai`` client: ``chat.completions.create(stream=True)`` and without streaming;
* **kind float32**: the kind again with the recipe's ``dtype`` replaced by float32 (the kind's
  CPU default), to show what the recipe's dtype buys.

Every arm sends the same chat message through the same chat template and asks for the same
number of tokens at temperature 0 (with the recipe's repetition penalty), so they do the same
work; the greedy answers are compared
(they must be equal) and a run that stops before ``--tokens`` says so. Decode tokens/s is
``(tokens - 1) / (total - time to first token)``: the warm per-token rate, prefill excluded.
Round 0 warms everything up (the server's first request loads the model) and is not counted.

    .venv/bin/python bench/llm_speed.py                  # 5 counted rounds of 128 tokens
    .venv/bin/python bench/llm_speed.py --rounds 3 --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import ServerProcess, print_table, summary, work_folder

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "lemonade.toml"
MODEL = "smollm2"
#: Long enough an answer that greedy decoding runs past the token count without an EOS.
PROMPT = "Write a long story about a dragon who learns to bake bread."
ARMS = ("generate", "kind", "http stream", "http whole", "kind float32")


def shipped_recipe(config: Path) -> Any:
    from supervisor.config import load_settings

    settings = load_settings(cli={"config": str(config)}, env={})
    return settings.models[MODEL]


# ----------------------------------------------------------------- the in-process arms


class InProcess:
    """The plain generate loop and the llm kind, both on the kind's converted folder."""

    def __init__(self, recipe: Any, data_dir: Path) -> None:
        import os

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from workers.base import LoadContext, LoadRequest
        from workers.llm import CausalLMModel

        os.environ["LEMONADE_DATA_DIR"] = str(data_dir)  # the kind's cache, as a worker has it
        self.torch = torch
        self.kind = CausalLMModel()
        info = self.kind.load(LoadRequest(name=MODEL, type="llm", device="cpu",
                                          options=dict(recipe.options)),
                              LoadContext(lambda *_: None)).info
        # The same recipe in float32, the llm kind's CPU default (and smollm2's before it
        # asked for bfloat16): what the recipe's dtype buys, measured in the same run.
        self.kind_fp32 = CausalLMModel()
        self.kind_fp32.load(LoadRequest(name=MODEL, type="llm", device="cpu",
                                        options={**recipe.options, "dtype": "float32"}),
                            LoadContext(lambda *_: None))
        self.dtype = info["dtype"]
        # The recipe's repetition penalty applies to the kind's calls (they do not set one),
        # so generate gets it too: same work, and the same greedy text if both are right.
        self.penalty = float(recipe.options.get("repetition_penalty", 1.0))
        folder = info["path"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, info["dtype"])).eval()
        messages = [{"role": "user", "content": PROMPT}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        self.ids = self.tokenizer(text, add_special_tokens=False,
                                  return_tensors="pt")["input_ids"]
        self.threads = torch.get_num_threads()

    def generate(self, tokens: int) -> dict[str, Any]:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # type: ignore[misc]
            """Notes when each put arrives: the prompt first, then one per new token."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: Any) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        clock = Clock()
        started = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(self.ids, max_new_tokens=tokens, do_sample=False,
                                      repetition_penalty=self.penalty, streamer=clock,
                                      pad_token_id=self.tokenizer.eos_token_id)
        ended = time.perf_counter()
        new = out[0, self.ids.shape[1]:].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return _row(started, clock.times[1], ended, len(new), text)

    def call_kind(self, tokens: int, model: Any = None) -> dict[str, Any]:
        from workers.base import CallContext

        pieces: list[str] = []
        first: list[float] = []

        def emit(piece: Any) -> None:
            if not first:
                first.append(time.perf_counter())
            pieces.append(piece)

        started = time.perf_counter()
        result = (model or self.kind).call("chat", _args(tokens, stream=True),
                                           CallContext(emit, threading.Event()))
        ended = time.perf_counter()
        return _row(started, first[0], ended, result["completion_tokens"], "".join(pieces))


def _args(tokens: int, *, stream: bool) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "temperature": 0, "stream": stream}


def _row(started: float, first: float | None, ended: float, tokens: int,
         text: str) -> dict[str, Any]:
    return {"ttft": None if first is None else first - started, "total": ended - started,
            "tokens": tokens, "text": text}


# ----------------------------------------------------------------- the server arms


def http_stream(client: Any, tokens: int) -> dict[str, Any]:
    pieces: list[str] = []
    first = None
    usage = None
    started = time.perf_counter()
    stream = client.chat.completions.create(model=MODEL,
                                            stream_options={"include_usage": True},
                                            **_args(tokens, stream=True))
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter()
                pieces.append(choice.delta.content)
    ended = time.perf_counter()
    assert usage is not None, "the stream sent no usage"
    return _row(started, first, ended, usage.completion_tokens, "".join(pieces))


def http_whole(client: Any, tokens: int) -> dict[str, Any]:
    args = _args(tokens, stream=False)
    del args["stream"]
    started = time.perf_counter()
    answer = client.chat.completions.create(model=MODEL, **args)
    ended = time.perf_counter()
    return _row(started, None, ended, answer.usage.completion_tokens,
                answer.choices[0].message.content or "")


# ----------------------------------------------------------------- the report


def decode_rate(row: dict[str, Any]) -> float | None:
    if row["ttft"] is None or row["tokens"] < 2:
        return None
    return (row["tokens"] - 1) / (row["total"] - row["ttft"])


def report(results: dict[str, list[dict[str, Any]]], tokens: int, threads: int,
           dtype: str) -> None:
    rounds = len(results["generate"])
    base_rate = statistics.median(r for r in map(decode_rate, results["generate"]) if r)
    base_total = statistics.median(r["total"] for r in results["generate"])
    rows = []
    for arm in ARMS:
        measured = results[arm]
        rates = [r for r in map(decode_rate, measured) if r is not None]
        ttfts = [r["ttft"] for r in measured if r["ttft"] is not None]
        total, total_p99 = summary([r["total"] for r in measured])
        rate = statistics.median(rates) if rates else None
        rows.append([
            arm,
            "-" if rate is None else rate,
            "-" if not rates else f"{min(rates):.1f}-{max(rates):.1f}",
            "-" if rate is None else f"{rate / base_rate:.2f}x",
            "-" if not ttfts else statistics.median(ttfts),
            total, total_p99, f"{total / base_total:.2f}x",
            statistics.median(r["tokens"] for r in measured),
        ])
    print_table(f"Warm chat decode, {tokens} tokens at temperature 0, {dtype} (the recipe's; "
                f"the last arm float32), {threads} torch threads "
                f"({rounds} rounds, medians; p99 = the slowest of so few)",
                ["arm", "decode tok/s", "range", "vs generate", "first token s", "total s",
                 "p99", "vs generate", "tokens"], rows)
    # In float32 every arm gives generate's greedy text exactly; in bfloat16 two equivalent
    # computations (generate passes an attention mask and positions, the kind does not) round
    # differently and a near tie flips some tens of tokens in, so the shared prefix is shown.
    reference = results["generate"][-1]["text"]
    verdicts = [[arm, "all" if all(r["text"] == reference for r in results[arm]) else
                 f"{min(_shared(r['text'], reference) for r in results[arm])} of "
                 f"{len(reference)}",
                 "yes" if all(r["tokens"] == tokens for r in results[arm]) else "**no**"]
                for arm in ARMS if arm != "kind float32"]  # another dtype: other rounding
    print_table("Same work in every arm", ["arm", "characters of generate's greedy text shared",
                                           f"all {tokens} tokens"], verdicts)


def _shared(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer (128)")
    parser.add_argument("--config", default=str(SHIPPED), help="config (default: shipped)")
    parser.add_argument("--workdir", help="keep the server's files here")
    args = parser.parse_args()
    import openai

    config = Path(args.config).resolve()
    recipe = shipped_recipe(config)
    data_dir = ROOT / ".lemonade"  # the converted GGUF a user's own server builds and reuses
    local = InProcess(recipe, data_dir)
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    with work_folder(args.workdir, "lemonade-llm-speed-") as folder:
        server = ServerProcess(config.read_text(), folder,
                               ("--data-dir", str(data_dir), "--auto-unload-timer", "0"),
                               start_timeout_s=120)
        try:
            with openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                               max_retries=0, timeout=900) as client:
                arms = {"generate": local.generate, "kind": local.call_kind,
                        "http stream": lambda n: http_stream(client, n),
                        "http whole": lambda n: http_whole(client, n),
                        "kind float32": lambda n: local.call_kind(n, local.kind_fp32)}
                for round_no in range(args.rounds + 1):
                    started = time.monotonic()
                    for arm, run in arms.items():
                        row = run(args.tokens)
                        if round_no > 0:  # round 0 loads and warms everything once
                            results[arm].append(row)
                    print(f"round {round_no}{' (not counted)' if round_no == 0 else ''} "
                          f"took {time.monotonic() - started:.0f}s", flush=True)
                row = server.model_row(MODEL)
                info = row.get("info") or {}
        finally:
            server.stop()
    rss = (row.get("memory") or {}).get("rss_bytes") or 0
    print(f"worker: {info.get('threads', '?')} torch threads, {info.get('dtype')}, "
          f"RSS {rss / 2**20:.0f} MiB after the run; this process: {local.threads} threads")
    report(results, args.tokens, local.threads, local.dtype)


if __name__ == "__main__":
    main()
