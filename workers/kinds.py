"""The one table of the worker kinds that ship with the project.

Each kind's name, the model type it serves, where its implementation and its option spec live
(``"module:attribute"``, imported only when needed), and whether it can run on an NVIDIA GPU.
Everything else that lists kinds derives its view from here: ``workers.protocol.BUILTIN_KINDS``
(name -> type, for the config), ``workers.registry.BUILTIN`` and ``BUILTIN_OPTIONS`` (what a
worker imports), and the GPU placement in ``supervisor/placement.py``. Stdlib only, so the
supervisor can read it without importing any model library. A new kind is one row here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Kind:
    type: str  # the model type it serves: llm, tts, asr, embedding
    model: str  # "module:attribute" of its workers.base.Model subclass
    options: str  # "module:attribute" of its workers.options.OptionSpec (a light module)
    gpu: bool = False  # can run on an NVIDIA GPU (torch or CTranslate2)


KINDS: Mapping[str, Kind] = MappingProxyType({
    "synthetic": Kind("tts", "workers.synthetic:SyntheticModel",
                      "workers.recipe_options:SYNTHETIC"),
    "kokoro": Kind("tts", "workers.kokoro_tts:KokoroModel", "workers.recipe_options:KOKORO",
                   gpu=True),
    "kokoro-onnx": Kind("tts", "workers.kokoro_onnx:KokoroOnnxModel",
                        "workers.recipe_options:KOKORO_ONNX"),
    "hibari": Kind("tts", "workers.hibari_tts:HibariModel", "workers.recipe_options:HIBARI"),
    "llm": Kind("llm", "workers.llm:CausalLMModel", "workers.recipe_options:LLM", gpu=True),
    "embedding": Kind("embedding", "workers.embedding:EmbeddingModel",
                      "workers.recipe_options:EMBEDDING", gpu=True),
    "asr": Kind("asr", "workers.asr:WhisperModel", "workers.recipe_options:ASR", gpu=True),
})
