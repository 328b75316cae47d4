"""The ``kokoro`` worker kind: hexgrad's Kokoro-82M text-to-speech through the ``kokoro`` package.

The model lives only in this worker process, so unloading it (ending the process) returns
everything it held: weights, activations, the CUDA context and the allocator's cache.

Recipe options (all optional)::

    weights     "random" | path to a .pth state dict | a Hugging Face repo id
                ("hexgrad/Kokoro-82M"; only from the local HF cache unless HF_HUB_OFFLINE=0)
                default "random": the real Kokoro-82M architecture (81.8M parameters, same
                code path, memory and speed) with random weights, for machines without them
    config      path to Kokoro's config.json (default: next to the weights, else the shipped
                Kokoro-82M config in workers/data)
    voices_dir  folder of <voice>.pt style packs (default: "voices" next to the weights;
                with random weights, seeded random packs for Kokoro's English voice names)
    voice       the default voice (default "af_heart")
    lang        "a" American or "b" British English (default "a")
    g2p         "auto" | "misaki" | "espeak" (default "auto": misaki+spaCy if installed)
    seed        seed for random weights and voices (default 0)

Speech requests follow the contract shared with ``kokoro-onnx`` (see ``call``): text is cut
into sentences of at most 510 phonemes, each synthesised and, when streaming, encoded and
sent at once; a cancelled call stops before the next sentence.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from workers import recipe_options
from workers.base import (
    CallContext,
    LoadContext,
    LoadRequest,
    LoadResult,
    Model,
    ModelError,
    data_dir,
)
from workers.english_g2p import EnglishPhonemizer, shared_phonemizer
from workers.gpu_memory import torch_vram_bytes
from workers.option_values import bad_config as _bad_config
from workers.protocol import WARMUP_OP, ErrorCode
from workers.speech import SpeechRequest, deliver, parse_speech_args
from workers.voice_catalog import KOKORO_DEFAULT_VOICE
from workers.voice_catalog import KOKORO_ENGLISH_VOICES as ENGLISH_VOICES
from workers.voice_spec import parse_voice_spec

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
DEFAULT_VOICE = KOKORO_DEFAULT_VOICE
SHIPPED_CONFIG = Path(__file__).with_name("data") / "kokoro-82m-config.json"
#: A style pack holds one 256-float style per phoneme count (1..510).
_PACK_SHAPE = (510, 1, 256)
_OPTIONS = recipe_options.KOKORO  # the one list: the supervisor checks recipes with it too
_REPO_ID = "hexgrad/Kokoro-82M"


class KokoroModel(Model):
    kind: ClassVar[str] = "kokoro"
    zygote_imports: ClassVar[tuple[str, ...]] = (
        "torch", "kokoro", "misaki.en", "misaki.espeak", "spacy", "soundfile")

    @classmethod
    def prepare_zygote(cls) -> None:
        super().prepare_zygote()
        shared_phonemizer()  # the default front end, built once for every forked worker

    def __init__(self) -> None:
        self._model: Any = None
        self._phonemizer: EnglishPhonemizer | None = None
        self._voices: dict[str, Any] = {}  # name -> CPU pack, or None until first use
        self._voices_dir: Path | None = None
        self._default_voice = DEFAULT_VOICE
        self._device = "cpu"
        # One forward pass at a time: on a CPU they only fight over the same cores, and on a
        # GPU they would serialise anyway. Taken per sentence, so requests interleave.
        self._forward_lock = threading.Lock()

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = dict(request.options)
        _OPTIONS.check(options)
        lang = str(options.get("lang", "a"))
        if lang not in ("a", "b"):
            raise _bad_config(
                f'option lang: expected "a" (American) or "b" (British); got {lang!r}'
            )
        g2p = str(options.get("g2p", "auto"))
        if g2p not in ("auto", "misaki", "espeak"):
            raise _bad_config(f"option g2p: expected auto, misaki or espeak; got {g2p!r}")
        seed = options.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise _bad_config(f"option seed: expected an integer; got {seed!r}")
        weights = str(options.get("weights", "random"))
        config_path, weights_path, weights_label = self._locate(weights, options.get("config"))
        config = self._read_config(config_path)

        ctx.progress(0.05, "importing torch and kokoro")
        device = self._pick_device(request.device)
        import torch
        from kokoro import KModel

        ctx.progress(0.2, "building Kokoro-82M")
        if weights == "random":
            torch.manual_seed(seed)
            weights_path = self._empty_state_dict()
        started = time.monotonic()
        try:
            model = KModel(repo_id=_REPO_ID, config=config, model=str(weights_path))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise ModelError(ErrorCode.LOAD_FAILED,
                             f"could not load Kokoro weights from {weights_label}: {e}") from e
        if weights == "random":
            _natural_pace(model)
        self._model = model.to(device).eval()
        self._device = device
        log.info("Kokoro-82M built in %.2fs on %s", time.monotonic() - started, device)

        ctx.progress(0.7, "loading the English G2P")
        try:
            self._phonemizer = shared_phonemizer(british=lang == "b", backend=g2p)
        except RuntimeError as e:
            raise _bad_config(f"option g2p: {e}") from e

        ctx.progress(0.9, "finding voices")
        self._find_voices(weights_path if weights != "random" else None,
                          options.get("voices_dir"), seed)
        voice = str(options.get("voice", DEFAULT_VOICE))
        if voice not in self._voices:
            raise _bad_config(f"option voice: {voice!r} is not one of the voices found "
                              f"({', '.join(sorted(self._voices)) or 'none'})")
        self._default_voice = voice
        params = sum(p.numel() for p in self._model.parameters())
        return LoadResult(device=device, info={
            "weights": weights_label,
            "parameters": params,
            "g2p": self._phonemizer.backend,
            "voices": len(self._voices),
            "default_voice": voice,
            "sample_rate": SAMPLE_RATE,
        })

    @staticmethod
    def _pick_device(requested: str) -> str:
        if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
            raise _bad_config(
                f"device {requested!r}: the kokoro kind runs on auto, cpu or cuda[:N]"
            )
        if requested == "cpu":
            return "cpu"
        import torch

        if requested == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            raise _bad_config(f"device {requested!r}: this worker sees no CUDA device")
        return requested

    @staticmethod
    def _locate(weights: str, config: Any) -> tuple[Path, Path | None, str]:
        """(config file, weights file or None for random, a label for messages)."""
        if config is not None:
            config_path = Path(str(config)).expanduser()
            if not config_path.is_file():
                raise _bad_config(f"option config: no file at {config_path}")
        else:
            config_path = None
        if weights == "random":
            return config_path or SHIPPED_CONFIG, None, "random"
        path = Path(weights).expanduser()
        if path.suffix == ".pth" or os.sep in weights or weights.startswith("."):
            if not path.is_file():
                raise _bad_config(f"option weights: no file at {path} (use \"random\" to run "
                                  "without weights, or the path of kokoro-v1_0.pth)")
            if config_path is None:
                beside = path.with_name("config.json")
                config_path = beside if beside.is_file() else SHIPPED_CONFIG
            return config_path, path, str(path)
        # A hub repo id: only what the local Hugging Face cache holds (workers run offline).
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(repo_id=weights, filename="kokoro-v1_0.pth")
            if config_path is None:
                config_path = Path(hf_hub_download(repo_id=weights, filename="config.json"))
        except Exception as e:
            raise _bad_config(
                f"option weights: {weights!r} is not a file and could not be fetched from the "
                f"Hugging Face hub or its local cache ({type(e).__name__}); give a local path "
                "or \"random\""
            ) from e
        return config_path, Path(file), weights

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise _bad_config(f"option config: cannot read {path}: {e}") from e
        if not isinstance(config, dict) or "vocab" not in config:
            raise _bad_config(f"option config: {path} is not a Kokoro config (no vocab)")
        return config

    @staticmethod
    def _empty_state_dict() -> Path:
        """An empty state dict: KModel loads nothing and keeps its (seeded) random init."""
        import torch

        path = data_dir("kokoro") / "empty-state-dict.pth"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({}, tmp)
            tmp.replace(path)
        return path

    def _find_voices(self, weights_path: Path | None, voices_dir: Any, seed: int) -> None:
        """Real weights: packs from ``voices_dir`` or ``voices/`` beside the weights (read on
        first use). Random weights: seeded random packs for Kokoro's English voice names."""
        if voices_dir is not None:
            folder = Path(str(voices_dir)).expanduser()
            if not folder.is_dir():
                raise _bad_config(f"option voices_dir: no folder at {folder}")
        elif weights_path is not None and (weights_path.parent / "voices").is_dir():
            folder = weights_path.parent / "voices"
        else:
            folder = None
        if folder is not None:
            self._voices_dir = folder
            self._voices = {p.stem: None for p in sorted(folder.glob("*.pt"))}
            if not self._voices:
                raise _bad_config(f"option voices_dir: {folder} holds no <voice>.pt files")
            return
        if weights_path is not None:
            raise _bad_config("option voices_dir: real weights need their voice packs; give "
                              "the folder of <voice>.pt files")
        import torch

        for name in ENGLISH_VOICES:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            self._voices[name] = 0.1 * torch.randn(_PACK_SHAPE, generator=generator)

    def _pack(self, name: str) -> Any:
        pack = self._voices[name]
        if pack is None:
            import torch

            assert self._voices_dir is not None
            path = self._voices_dir / f"{name}.pt"
            try:
                pack = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ModelError(ErrorCode.INTERNAL, f"cannot read voice pack {path}: {e}") from e
            if tuple(pack.shape)[-1] != _PACK_SHAPE[-1]:
                raise ModelError(ErrorCode.INTERNAL, f"voice pack {path} has shape "
                                 f"{tuple(pack.shape)}, not (510, 1, 256)")
            self._voices[name] = pack
        return pack

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == "voices":
            return {"voices": sorted(self._voices), "default": self._default_voice}
        if op == WARMUP_OP:
            return self._speak({"input": "Warm up.", "response_format": "pcm"}, ctx,
                               emit=False)
        if op == "speech":
            return self._speak(args, ctx, emit=True)
        raise ModelError(ErrorCode.UNSUPPORTED, f"the kokoro kind has no op {op!r}")

    def _speak(self, args: Mapping[str, Any], ctx: CallContext, *, emit: bool) -> dict[str, Any]:
        request = parse_speech_args(args)
        blend = parse_voice_spec(request.voice or self._default_voice, self._voices)
        style = sum(weight * self._pack(name) for name, weight in blend)
        return deliver(self._synthesize(request, style, ctx), request, SAMPLE_RATE, ctx,
                       emit=emit)

    def _synthesize(self, request: SpeechRequest, style: Any, ctx: CallContext) -> Iterator[Any]:
        """Float samples per sentence-sized chunk; stops before the next one if cancelled."""
        import torch

        assert self._phonemizer is not None and self._model is not None
        for chunk in self._phonemizer.chunks(request.text):
            ctx.check_cancelled()
            ref = style[len(chunk.phonemes) - 1].to(self._device)
            with self._forward_lock, torch.inference_mode():
                ctx.check_cancelled()
                audio = self._model(chunk.phonemes, ref, request.speed)
            yield audio.float().cpu().numpy()

    def vram_bytes(self) -> int:
        return torch_vram_bytes(self._device)


#: Frames per phoneme that real Kokoro speech averages (about 12 phonemes a second).
_FRAMES_PER_PHONEME = 3.3


def _natural_pace(model: Any) -> None:
    """Give random weights the real model's speaking rate.

    Kokoro predicts each phoneme's length as the sum of ``max_dur`` sigmoids; random weights
    put each near 0.5, i.e. ~25 frames a phoneme, eight times slower speech than the real
    model, which would make audio length and synthesis time meaningless for tests and
    benchmarks. Zeroing the duration head's weights and setting its bias fixes the sum at a
    natural 3.3 frames; every other weight stays random.
    """
    import torch

    layer = model.predictor.duration_proj.linear_layer
    per_sigmoid = _FRAMES_PER_PHONEME / layer.out_features
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(math.log(per_sigmoid / (1 - per_sigmoid)))
