"""Which English front end should drive the ``kokoro-onnx`` kind: misaki + spaCy, or hibari's?

Both write Kokoro's phoneme alphabet; hibari's is a port of misaki's rules with a perceptron
tagger in place of spaCy and a small ONNX net in place of espeak-ng. Measured side by side:

* **build**: a fresh interpreter imports the front end and builds it (what a zygote, or a
  spawned worker, pays once), with the RSS that adds;
* **phonemize**: warm time for the test sentences, and how often the two agree exactly
  (and their character-level similarity where they do not);
* **heard back**: the int8 Kokoro ONNX model speaks each sentence (voice ``jf_alpha``, the
  shipped default) from each front end's phonemes and whisper tiny.en transcribes it; the
  share of the sentence's words it hears back. The ``hibari`` kind's own voice is measured
  the same way, for scale.

    .venv/bin/python bench/g2p_compare.py
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please bring the green umbrella to the station before seven.",
    "On the 3rd of March, 1,250 people paid $9.99 each to hear it read.",
    "She read the letter twice, then wrote a short reply to her brother.",
    "Dr. Smith will present the quarterly results at 4:30 pm on Tuesday.",
    "Our new kubernetes cluster autoscales whenever the queue grows.",
    "Can you record the meeting and send everyone the minutes?",
    "The wind was cold, but the children kept playing in the park.",
]

_BUILD = r"""
import json, resource, sys, time
t = time.perf_counter()
from workers.english_g2p import EnglishPhonemizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
g2p = EnglishPhonemizer(backend=sys.argv[1])
list(g2p.chunks("Hello."))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(backend: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _BUILD, backend], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace(",", ""))


def heard_share(said: str, heard: str) -> float:
    want, got = words(said), set(words(heard))
    return sum(1 for w in want if w in got) / len(want)


class _Ctx:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.cancelled = threading.Event()


def main() -> None:
    os.environ.setdefault("LEMONADE_DATA_DIR", str(Path(".lemonade").resolve()))
    from faster_whisper import WhisperModel

    from workers.asr import bundled_model_dir
    from workers.base import CallContext, LoadContext, LoadRequest
    from workers.english_g2p import EnglishPhonemizer
    from workers.hibari_tts import HibariModel
    from workers.kokoro_onnx import KokoroOnnxModel

    backends = ["misaki", "hibari"]
    builds = {b: [build(b) for _ in range(3)] for b in backends}
    phonemizers = {b: EnglishPhonemizer(backend=b) for b in backends}
    phonemes: dict[str, list[str]] = {b: [] for b in backends}
    warm: dict[str, float] = {}
    for b, g2p in phonemizers.items():
        list(g2p.chunks("Warm up."))
        t = time.perf_counter()
        for s in SENTENCES:
            phonemes[b].append(" ".join(c.phonemes for c in g2p.chunks(s)))
        warm[b] = (time.perf_counter() - t) / len(SENTENCES)
    same = sum(a == b for a, b in zip(*phonemes.values(), strict=True))
    similarity = sum(difflib.SequenceMatcher(None, a, b).ratio()
                     for a, b in zip(*phonemes.values(), strict=True)) / len(SENTENCES)

    whisper = WhisperModel(str(bundled_model_dir()), device="cpu", compute_type="int8",
                           cpu_threads=2)

    def transcribe(wav: bytes) -> str:
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(wav)
            f.flush()
            segments, _ = whisper.transcribe(f.name, language="en", beam_size=1)
            return " ".join(s.text for s in segments)

    def speak_all(model: Any, options: dict[str, Any], kind: str) -> list[float]:
        model.load(LoadRequest(kind, "tts", "cpu", options), LoadContext(lambda f, m: None))
        shares = []
        for s in SENTENCES:
            ctx = _Ctx()
            model.call("speech", {"input": s, "response_format": "wav"},
                       CallContext(ctx.out.append, ctx.cancelled))
            shares.append(heard_share(s, transcribe(b"".join(ctx.out))))
        return shares

    heard = {b: speak_all(KokoroOnnxModel(), {"g2p": b, "threads": 2}, "kokoro-onnx")
             for b in backends}
    heard["hibari kind (heart)"] = speak_all(HibariModel(), {}, "hibari")

    print("\n## Front end build in a fresh interpreter (3 runs) and warm phonemize")
    print("| g2p | build s (min-max) | RSS after build MiB | warm ms/sentence |")
    print("|---|---|---|---|")
    for b in backends:
        secs = [r["seconds"] for r in builds[b]]
        rss = [r["rss_mib"] for r in builds[b]]
        print(f"| {b} | {min(secs):.2f}-{max(secs):.2f} | {sum(rss) / len(rss):.0f} | "
              f"{warm[b] * 1000:.1f} |")
    print(f"\nidentical phonemes: {same}/{len(SENTENCES)} sentences; mean character "
          f"similarity {similarity:.3f}")
    for s, a, b in zip(SENTENCES, *phonemes.values(), strict=True):
        if a != b:
            print(f"  {s}\n    misaki: {a}\n    hibari: {b}")
    print("\n## Heard back by whisper tiny.en (share of words, per sentence)")
    print("| speaker | mean | min |")
    print("|---|---|---|")
    for name, shares in heard.items():
        label = name if name.startswith("hibari kind") else f"kokoro-onnx jf_alpha, g2p={name}"
        print(f"| {label} | {sum(shares) / len(shares):.2f} | {min(shares):.2f} |")


if __name__ == "__main__":
    main()
