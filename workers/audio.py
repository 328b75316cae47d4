"""Audio encoding for the speech kinds: whole files and streams in OpenAI's formats.

Text-to-speech kinds produce float samples in [-1, 1], sentence by sentence. A non-streamed
request wants one complete file; a streamed one wants bytes on the wire as soon as the first
sentence is ready, in a form that still decodes when concatenated. Formats differ in how far
that is possible, which is why this module exists instead of each kind calling soundfile:

- ``pcm``: raw 16-bit little-endian mono; streams trivially.
- ``wav``: a complete RIFF file when whole; when streamed, a header whose sizes say "unknown"
  (0xFFFFFFFF, as ffmpeg and browsers write for live audio) followed by raw samples.
- ``opus`` (in Ogg): libsndfile writes Ogg pages strictly forward, so it streams.
- ``flac`` and ``mp3``: libsndfile seeks back at the end to fill in the length (FLAC's
  STREAMINFO, the MP3 Xing header), and a stream without that fix-up decodes short or not at
  all. Streamed, they are therefore sent once, complete, when the last sentence is done.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import soundfile as sf

from workers import speech_formats

#: What this module encodes, and what of it streams sentence by sentence (the one table both
#: the kinds and the routes read: workers.speech_formats).
FORMATS: tuple[str, ...] = speech_formats.ENCODED_FORMATS
PROGRESSIVE_FORMATS: frozenset[str] = speech_formats.PROGRESSIVE_FORMATS
_SOUNDFILE: dict[str, tuple[str, str]] = {
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "opus": ("OGG", "OPUS"),
}
#: Opus only runs at these rates; other rates are rejected rather than resampled silently.
OPUS_RATES = frozenset({8000, 12000, 16000, 24000, 48000})
_UNKNOWN_SIZE = 0xFFFFFFFF


def to_pcm16(samples: Any) -> bytes:
    """Float samples in [-1, 1] (clipped) to 16-bit little-endian mono PCM."""
    array = np.asarray(samples, dtype=np.float32).reshape(-1)
    return (np.clip(array, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM WAV header; ``data_bytes=None`` writes the streaming "unknown" sizes."""
    data_size = _UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = _UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI", b"RIFF", riff_size, b"WAVE", b"fmt ", 16, 1, 1,
        sample_rate, sample_rate * 2, 2, 16, b"data", data_size,
    )


def check_format(fmt: str, sample_rate: int) -> None:
    """Raise ValueError naming the problem when ``fmt`` cannot be produced at this rate."""
    if fmt not in FORMATS:
        raise ValueError(f"response_format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "opus" and sample_rate not in OPUS_RATES:
        raise ValueError(f"opus cannot encode {sample_rate} Hz audio")


def encode(samples: Any, sample_rate: int, fmt: str) -> bytes:
    """One complete file of ``samples`` in ``fmt``."""
    check_format(fmt, sample_rate)
    pcm = to_pcm16(samples)
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        return wav_header(sample_rate, len(pcm)) + pcm
    container, subtype = _SOUNDFILE[fmt]
    out = io.BytesIO()
    data = np.frombuffer(pcm, dtype="<i2")
    sf.write(out, data, sample_rate, format=container, subtype=subtype)
    return out.getvalue()


class _Spool(io.RawIOBase):
    """A seekable in-memory file for libsndfile that hands out what was appended so far."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._pos = 0
        self._sent = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        end = self._pos + len(chunk)
        if end > len(self._buf):
            self._buf.extend(bytes(end - len(self._buf)))
        self._buf[self._pos:end] = chunk
        self._pos = end
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buf)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self._buf[self._pos:self._pos + len(buffer)]
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def take_new(self) -> bytes:
        new = bytes(self._buf[self._sent:])
        self._sent = len(self._buf)
        return new


class AudioStream:
    """Encodes sentence after sentence; each ``write`` returns the bytes ready to send.

    Concatenating every returned piece, ``close()``'s included, gives a file that decodes to
    all the samples written. Empty results are normal (nothing ready yet).
    """

    def __init__(self, fmt: str, sample_rate: int) -> None:
        check_format(fmt, sample_rate)
        self.format = fmt
        self.sample_rate = sample_rate
        self._started = False
        self._held: list[bytes] = []  # flac/mp3: PCM kept until the end
        self._spool: _Spool | None = None
        self._file: sf.SoundFile | None = None
        if fmt == "opus":
            self._spool = _Spool()
            self._file = sf.SoundFile(self._spool, "w", samplerate=sample_rate, channels=1,
                                      format="OGG", subtype="OPUS")

    def write(self, samples: Any) -> bytes:
        pcm = to_pcm16(samples)
        if self.format == "pcm":
            return pcm
        if self.format == "wav":
            if self._started:
                return pcm
            self._started = True
            return wav_header(self.sample_rate, None) + pcm
        if self._file is not None and self._spool is not None:
            self._file.write(np.frombuffer(pcm, dtype="<i2"))
            return self._spool.take_new()
        self._held.append(pcm)
        return b""

    def close(self) -> bytes:
        """The remaining bytes; the stream is finished afterwards."""
        if self.format == "wav" and not self._started:
            self._started = True
            return wav_header(self.sample_rate, 0)
        if self._file is not None and self._spool is not None:
            self._file.close()
            self._file = None
            return self._spool.take_new()
        if self.format in ("flac", "mp3"):
            pcm = b"".join(self._held)
            self._held.clear()
            return encode(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32767.0,
                          self.sample_rate, self.format)
        return b""
