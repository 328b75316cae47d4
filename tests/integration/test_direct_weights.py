"""The direct load of a folder this project converted (workers.direct_weights) gives the same
model as ``from_pretrained``, and anything it does not expect sends it back to
``from_pretrained``. Run in a child process with a tiny real Llama, so the test process never
imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from workers import direct_weights

    root = Path(sys.argv[1])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         attention_dropout=0.5)  # dropout shows a model left in training
    LlamaForCausalLM(config).save_pretrained(root / "good")
    direct = direct_weights.load(root / "good", AutoModelForCausalLM, torch.float32)
    assert direct is not None, "a folder of the model's own float32 keys loads directly"
    reference = AutoModelForCausalLM.from_pretrained(root / "good", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, reference(ids).logits), "same logits"
    assert direct.lm_head.weight.data_ptr() == direct.model.embed_tokens.weight.data_ptr()
    assert not direct.training, "in eval mode, as from_pretrained returns a model"
    assert direct_weights.load(root / "good", AutoModelForCausalLM, torch.bfloat16) is None

    def variant(name, change):
        folder = root / name
        LlamaForCausalLM(config).save_pretrained(folder)
        state = load_file(folder / "model.safetensors")
        change(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return direct_weights.load(folder, AutoModelForCausalLM, torch.float32)

    assert variant("extra", lambda s: s.update(stray=torch.zeros(2))) is None
    # An old export's copy of a non-persistent buffer (BERT's position_ids) is fine.
    buffer = next(n for n, b in direct.named_buffers() if n not in direct.state_dict())
    shape = dict(direct.named_buffers())[buffer].shape
    assert variant("buffer", lambda s: s.update({buffer: torch.zeros(shape)})) is not None
    assert variant("missing", lambda s: s.pop("model.norm.weight")) is None
    assert variant("half", lambda s: s.update(
        {k: v.half() for k, v in s.items() if k.endswith("norm.weight")})) is None
    print("ok")
''')


@pytest.mark.slow
def test_the_direct_load_matches_from_pretrained_and_refuses_the_unexpected(
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(root)})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
