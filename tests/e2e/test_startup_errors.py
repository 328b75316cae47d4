"""Mistakes that ``lemonade serve`` finds before it serves, each told in one line.

Through the real installed command, as a user meets them: a typo or a wrong type in a
recipe's options fails the start naming the file, the model and the key (it used to be a 503
and a cooldown at first use); a port already in use and a data dir that cannot be written
are one line on stderr and a non-zero exit, no traceback; a server started where no config
file exists warns where it looked and still starts (titled ``lemonade serve`` in ``ps``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import (
    LISTENING_RE,
    STARTUP_TIMEOUT_S,
    Server,
    _drain,
    dedent_config,
    run_cli,
    server_env,
)

# The command ends by itself on every mistake here; the limit only catches a hang.
EXIT_TIMEOUT_S = 60.0

TONE = """
[models.tone]
recipe = "synthetic"
"""


def serve_once(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "lemonade.toml"
    path.write_text(dedent_config(config))
    return run_cli("serve", "--config", str(path), *args, timeout=EXIT_TIMEOUT_S)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def test_a_typo_in_the_options_fails_the_start_naming_file_model_and_key(
        tmp_path: Path) -> None:
    line = one_line(serve_once(tmp_path, TONE + '[models.tone.options]\nlatency_msx = 5\n',
                               "--port", "0"))
    path = tmp_path / "lemonade.toml"
    assert line.startswith(f"lemonade: {path}: [models.tone] options: "), line
    assert "unknown synthetic option 'latency_msx' (did you mean 'latency_ms'?)" in line
    assert "allowed: type, load_seconds" in line


def test_a_wrong_type_fails_the_start_saying_what_is_allowed(tmp_path: Path) -> None:
    line = one_line(serve_once(tmp_path, TONE + '[models.tone.options]\nchunks = "four"\n',
                               "--port", "0"))
    assert f"{tmp_path / 'lemonade.toml'}: [models.tone] options: " in line
    assert "synthetic option 'chunks' must be an integer in 1..1000, got 'four'" in line


def test_a_bad_choice_in_a_real_kind_is_found_without_loading_it(tmp_path: Path) -> None:
    config = ('[models.voice]\nrecipe = "kokoro-onnx"\n'
              '[models.voice.options]\ng2p = "misake"\n')
    line = one_line(serve_once(tmp_path, config, "--port", "0"))
    assert "[models.voice] options: kokoro-onnx option 'g2p' must be one of" in line
    assert "got 'misake' (did you mean 'misaki'?)" in line


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_in_use_is_one_line_and_a_failed_exit(tmp_path: Path, taken_port: int) -> None:
    line = one_line(serve_once(tmp_path, TONE, "--port", str(taken_port)))
    assert line == (f"lemonade: cannot listen on 127.0.0.1:{taken_port}: address already in "
                    "use (is another server running? pick another with --port)")


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line(serve_once(tmp_path, TONE, "--port", "0",
                               "--data-dir", str(blocker / "data")))
    assert line == (f"lemonade: cannot create the data dir {blocker / 'data'}: not a directory "
                    "(pick another with --data-dir or LEMONADE_DATA_DIR)")


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot make a file in (root ignores mode bits: try /sys)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no folder here refuses this user a new file")


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    folder = _unwritable_folder(tmp_path)
    try:
        line = one_line(serve_once(tmp_path, TONE, "--port", "0", "--data-dir", str(folder)))
    finally:
        (tmp_path / "read-only").chmod(0o700)
    assert line.startswith(f"lemonade: cannot write in the data dir {folder}: "), line
    assert line.endswith("(pick another with --data-dir or LEMONADE_DATA_DIR)"), line


def test_no_config_file_warns_where_it_looked_and_still_starts(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "serve", "--port", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=server_env(), cwd=tmp_path,
    )
    lines: list[str] = []
    ready = threading.Event()
    assert proc.stdout is not None
    thread = threading.Thread(target=_drain, args=(proc.stdout, lines, ready), daemon=True)
    thread.start()
    server = Server(proc, "", tmp_path / "lemonade.toml", lines, thread)
    try:
        assert ready.wait(STARTUP_TIMEOUT_S), "no output from the server"
        listening = [line for line in lines if LISTENING_RE.search(line)]
        assert listening, "\n".join(lines)
        assert "(0 configured: no models)" in listening[0]
        warnings = [line for line in lines if "WARNING" in line]
        assert len(warnings) == 1, "\n".join(lines)
        assert warnings[0].endswith(
            f"no config file found: no --config, no LEMONADE_CONFIG, and no "
            f"{tmp_path.resolve() / 'lemonade.toml'}; starting with no models"), warnings[0]
        assert lines.index(warnings[0]) < lines.index(listening[0])
        # The server is titled too, and the retitling left its environment readable.
        me = psutil.Process(proc.pid)
        assert " ".join(part for part in me.cmdline() if part) == "lemonade serve"
        assert me.name() == "lemonade"
        assert me.environ().get("PYTHONUNBUFFERED") == "1"
    finally:
        problems = server.stop()
    assert not problems, problems
    assert proc.returncode == 0


def test_a_ray_head_that_does_not_answer_is_one_line_at_once(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = one_line(serve_once(tmp_path, TONE, "--cluster", f"127.0.0.1:{port}"))
    assert line.startswith(f"lemonade: cannot join the Ray cluster '127.0.0.1:{port}'")
    assert "nothing answers there" in line and "ray start --head" in line
