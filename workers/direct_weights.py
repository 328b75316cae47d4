"""Loading a plain local checkpoint without ``from_pretrained``'s machinery.

``from_pretrained`` is built for every checkpoint ever published: it resolves files, builds
key-renaming rules for old checkpoint layouts (about 1,200 regular expressions for a Llama or
a BERT), checks quantisation and sharding plans, then copies each tensor into a freshly
initialised model. On this 2-core machine that is ~0.2 s in a process that has loaded the
model before and 0.5-1 s in a fresh one (the regex cache is cold), most of a forked worker's
load. A local folder whose one ``model.safetensors`` holds exactly the model's own keys in
float32 (the GGUF conversions of :mod:`workers.gguf_cache`, plain exports such as the bundled
all-MiniLM-L6-v2) needs none of it: the model is built from its ``config.json`` with
initialisation skipped, and the memory-mapped tensors are assigned to it directly (~0.08 s
for SmolLM2-135M).

Anything unexpected makes :func:`load` return ``None`` and the caller uses
``from_pretrained``: a key the model does not have (other than a copy of one of its own
non-persistent buffers, which older exports carry), a parameter left without a tensor that is
not tied to one, a floating tensor that is not float32, another dtype asked for, or a helper
missing from this ``transformers``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def load(folder: Path, auto_class: Any, dtype: Any) -> Any | None:
    """The model in ``folder`` with its weights assigned, or None to use ``from_pretrained``."""
    import torch

    weights = folder / WEIGHTS
    if dtype != torch.float32 or not weights.is_file():
        return None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        log.debug("this transformers has no no_init_weights; using from_pretrained")
        return None
    import safetensors.torch
    from transformers import AutoConfig, GenerationConfig

    state = safetensors.torch.load_file(str(weights))
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in state.values()):
        return None
    config = AutoConfig.from_pretrained(str(folder))
    with no_init_weights():
        model = auto_class.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = {t.data_ptr() for t in state.values()}
    named = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in named or named[k].data_ptr() not in loaded]
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.device.type == "meta"]
    buffers = dict(model.named_buffers())
    unexpected = [k for k in unexpected
                  if k not in buffers or buffers[k].shape != state[k].shape]
    if unexpected or untied or on_meta:
        log.info("%s does not fit the direct load (unexpected %s, missing %s, on meta %s); "
                 "using from_pretrained", folder, unexpected[:3], untied[:3], on_meta[:3])
        return None
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()  # as from_pretrained returns it (dropout off)
