"""The README's tour, run as written against the shipped ``lemonade.toml``.

A newcomer copies the tour's commands from the README into a terminal. This test takes them
from README.md itself, so the README cannot drift from what works: the first ``curl`` (its
request body, sent with the standard library so the test does not depend on curl being
installed) returns a WAV from the default English voice, and the tour's Python block runs
unchanged with this venv's interpreter (the venv ``./setup.sh`` made, which must therefore
have the ``openai`` client the block imports), against a server on the port the README names.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import launch_server
from tests.helpers import shared_data_dir

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def tour() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### A tour")
    return text[start:text.index("\n## ", start)]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def first_curl(section: str) -> tuple[str, dict[str, object]]:
    command = next(b for b in blocks(section, "sh") if "curl" in b)
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    url = next(w for w in words if "/v1/" in w)
    body = json.loads(words[words.index("-d") + 1])
    return url, body


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_tour_names_the_default_speech_model() -> None:
    section = tour()
    url, body = first_curl(section)
    assert url.startswith("localhost:8000/") and body["model"] == "hibari", (url, body)
    assert "from openai import OpenAI" in blocks(section, "python")[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_tour_runs_as_written(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    section = tour()
    url, body = first_curl(section)
    python = blocks(section, "python")[0]
    port = int(re.search(r"127\.0\.0\.1:(\d+)", python).group(1))  # type: ignore[union-attr]
    if not port_is_free(port):
        pytest.skip(f"port {port}, which the README's tour uses, is taken on this machine")
    env = {"LEMONADE_DATA_DIR": str(shared_data_dir(tmp_path_factory))}
    server = launch_server((ROOT / "lemonade.toml").read_text(), tmp_path, env=env,
                           args=["--port", str(port)])
    try:
        request = urllib.request.Request("http://" + url, data=json.dumps(body).encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=300) as answer:
            audio = answer.read()
        assert audio[:4] == b"RIFF" and len(audio) > 24000, audio[:64]

        run = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True,
                             text=True, timeout=800)
        assert run.returncode == 0, run.stderr[-3000:]
        transcript, _, chat = run.stdout.partition("\n")
        assert "quick brown fox" in transcript.lower(), run.stdout
        assert chat.strip(), run.stdout
        assert (tmp_path / "fox.wav").stat().st_size > 24000
        rows = {r["name"]: r for r in server.status()["models"]}
        assert rows["hibari"]["last_eviction"]["reason"] == "lru", rows["hibari"]
    finally:
        problems = server.stop()
    assert not problems, problems
