"""``/v1/audio/transcriptions`` end to end: a real server, a real Whisper worker, real clients.

One server (module scope) with the bundled whisper tiny.en loaded once: the official
``openai`` client gets every response format, and each kind of bad upload gets a 4xx that
names the field while the same worker process keeps serving. The worker is loaded in the
fixture, before the per-test leak guard looks, and stays loaded to the end of the module.
"""

from __future__ import annotations

import contextlib
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from tests.e2e.conftest import HttpResult, Server, launch_server

SPEECH = Path(__file__).resolve().parent.parent / "data" / "quick_brown_fox.flac"
SPOKEN = "the quick brown fox jumps over the lazy dog"
UPLOAD_LIMIT = 25 * 1000 * 1000

CONFIG = """
[server]
auto_unload_timer = "never"
[models.whisper]
recipe = "asr"
device = "cpu"
[models.whisper.options]
threads = 2
beam_size = 1
[models.tone]
recipe = "synthetic"
type = "tts"
"""

pytestmark = pytest.mark.slow


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def heard_most(text: str, spoken: str = SPOKEN) -> bool:
    got = set(words(text))
    said = words(spoken)
    return sum(w in got for w in said) >= 0.8 * len(said)


@pytest.fixture(scope="module")
def asr_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch_server(CONFIG, Path(tmp_path_factory.mktemp("asr")))
    try:
        server.load("whisper")
        yield server
        assert server.alive(), server.log_text()
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.fixture
def client(asr_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=asr_server.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def worker_pid(server: Server) -> int:
    pid = server.model("whisper")["pid"]
    assert isinstance(pid, int)
    return pid


def form(fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n").encode()
    if file is not None:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{file[0]}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode()
        out += file[1] + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def post_form(server: Server, fields: dict[str, str],
              file: tuple[str, bytes] | None) -> HttpResult:
    body, content_type = form(fields, file)
    return server.request("POST", "/v1/audio/transcriptions", data=body,
                          headers={"Content-Type": content_type})


# ======================================================================= the openai client


def test_every_response_format_through_the_openai_client(
    asr_server: Server, client: openai.OpenAI
) -> None:
    pid = worker_pid(asr_server)
    with SPEECH.open("rb") as f:
        plain = client.audio.transcriptions.create(model="whisper", file=f)
    assert heard_most(plain.text), plain.text

    audio = ("fox.flac", SPEECH.read_bytes(), "audio/flac")
    verbose = client.audio.transcriptions.create(
        model="whisper", file=audio, response_format="verbose_json", language="en",
        temperature=0.0, timestamp_granularities=["word", "segment"],
    )
    assert heard_most(verbose.text) and verbose.language == "en"
    assert 2.0 < verbose.duration < 6.0
    assert verbose.segments and verbose.segments[0].id == 0
    assert verbose.segments[-1].end <= verbose.duration + 0.5
    assert verbose.words and {"fox", "dog"} <= set(words(" ".join(w.word for w in verbose.words)))

    text = client.audio.transcriptions.create(model="whisper", file=audio,
                                              response_format="text")
    assert isinstance(text, str) and heard_most(text)

    srt = client.audio.transcriptions.create(model="whisper", file=audio, response_format="srt")
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n\S", srt), srt
    assert heard_most(srt)

    raw = post_form(asr_server, {"model": "whisper", "response_format": "vtt"},
                    ("fox.flac", SPEECH.read_bytes()))
    assert raw.status == 200 and raw.headers.get_content_type() == "text/vtt"
    vtt = raw.body.decode()
    assert vtt.startswith("WEBVTT\n\n00:00:00.") and heard_most(vtt), vtt
    assert worker_pid(asr_server) == pid


# ======================================================================= bad input

@pytest.mark.parametrize(("fields", "file", "status", "needle"), [
    ({"model": "whisper"}, None, 400, "'file' is required"),
    ({"model": "whisper"}, ("empty.wav", b""), 400, "'file' is empty"),
    ({"model": "whisper"}, ("notes.wav", b"not audio, just text " * 40), 400,
     "file 'notes.wav' could not be decoded"),
    ({}, ("fox.flac", SPEECH.read_bytes()), 400, "'model' is required"),
    ({"model": "whisper", "response_format": "mp3"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "'response_format' must be one of json, text, srt, verbose_json, vtt"),
    ({"model": "whisper", "language": "de"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "language 'de' is not supported: this model is English-only"),
    ({"model": "whisper", "language": "German"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "'language' must be an ISO-639-1 code"),
    ({"model": "whisper", "temperature": "hot"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "'temperature' must be a number"),
    ({"model": "whisper", "temperature": "1.5"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "'temperature' must be between 0 and 1"),
    ({"model": "tone"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "model 'tone' is a tts model; /v1/audio/transcriptions needs an asr model"),
    ({"model": "nope"}, ("fox.flac", SPEECH.read_bytes()), 404, "nope"),
    ({"model": "whisper", "keep_alive": "soon"}, ("fox.flac", SPEECH.read_bytes()), 400,
     "keep_alive"),
])
def test_bad_uploads_get_a_4xx_naming_the_field(
    asr_server: Server, fields: dict[str, str], file: tuple[str, bytes] | None,
    status: int, needle: str,
) -> None:
    pid = worker_pid(asr_server)
    result = post_form(asr_server, fields, file)
    assert result.status == status, result.body
    assert needle in result.error["message"], result.error
    assert worker_pid(asr_server) == pid
    assert asr_server.model("tone")["state"] == "unloaded"  # type checks come before loads


def test_a_json_body_is_refused_with_a_pointer_to_multipart(asr_server: Server) -> None:
    result = asr_server.post("/v1/audio/transcriptions", {"model": "whisper"})
    assert result.status == 400
    assert "multipart/form-data" in result.error["message"]


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response (headers and a Content-Length body) without waiting for close."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        while length and len(body) < int(length.group(1)) and (chunk := sock.recv(65536)):
            body += chunk
        answer = head + b"\r\n\r\n" + body
    return answer


def test_an_upload_past_the_limit_is_refused_while_it_is_read(asr_server: Server) -> None:
    """413 comes back although the client declared and started a much larger body."""
    pid = worker_pid(asr_server)
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="huge.wav"\r\n\r\n').encode()
    declared = len(head) + 200 * 1000 * 1000  # 200 MB promised, far more than we send
    url = urlsplit(asr_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {url.netloc}\r\n"
             f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
             f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode() + head)
        sent = 0
        block = b"\0" * (1024 * 1024)
        sock.settimeout(0.5)
        # Send until the server answers; it must answer once it has seen the limit, long
        # before the 200 MB the headers promised.
        while sent < UPLOAD_LIMIT + 8 * 1024 * 1024:
            try:
                sock.sendall(block)
                sent += len(block)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
        sock.settimeout(30)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"'file' is larger than the upload limit of 25000000 bytes" in answer
    assert worker_pid(asr_server) == pid
