"""The speech kinds' encoder: whole files and streams decode back to what was written."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from workers.audio import FORMATS, PROGRESSIVE_FORMATS, AudioStream, encode, to_pcm16

RATE = 24000


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decoded_frames(data: bytes, fmt: str) -> int:
    if fmt == "pcm":
        return len(data) // 2
    info = sf.info(io.BytesIO(data))
    assert info.samplerate == RATE and info.channels == 1
    return len(sf.read(io.BytesIO(data), dtype="int16")[0])


def test_pcm_is_clipped_16_bit_little_endian() -> None:
    pcm = to_pcm16([0.0, 1.0, -1.0, 2.0, -2.0])
    assert struct.unpack("<5h", pcm) == (0, 32767, -32767, 32767, -32767)


def test_whole_wav_is_a_valid_riff_file() -> None:
    data = encode(tone(0.5), RATE, "wav")
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        assert w.getnframes() == RATE // 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_file_decodes_to_the_same_length(fmt: str) -> None:
    frames = decoded_frames(encode(tone(1.0), RATE, fmt), fmt)
    # Lossy codecs pad to their frame size; never more than a few ms either way.
    assert abs(frames - RATE) <= (0 if fmt in ("wav", "pcm", "flac") else RATE // 10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stream_pieces_concatenate_to_a_decodable_file(fmt: str) -> None:
    stream = AudioStream(fmt, RATE)
    pieces = [stream.write(tone(0.5, f)) for f in (300.0, 400.0, 500.0)]
    pieces.append(stream.close())
    if fmt in PROGRESSIVE_FORMATS:
        assert pieces[0], "a progressive format must have bytes after the first sentence"
    else:
        assert pieces[:3] == [b"", b"", b""] and pieces[3]
    frames = decoded_frames(b"".join(pieces), fmt) if fmt != "wav" else None
    if fmt == "wav":
        # Streamed WAV says "unknown size"; count the samples after the 44-byte header.
        body = b"".join(pieces)
        assert body[:4] == b"RIFF" and struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF
        assert (len(body) - 44) // 2 == int(1.5 * RATE)
    else:
        assert frames is not None
        assert abs(frames - int(1.5 * RATE)) <= (0 if fmt in ("pcm", "flac") else RATE // 10)


def test_an_empty_wav_stream_is_still_a_valid_file() -> None:
    data = AudioStream("wav", RATE).close()
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnframes() == 0


def test_bad_format_and_bad_opus_rate_are_named() -> None:
    with pytest.raises(ValueError, match="response_format must be one of"):
        encode(tone(0.1), RATE, "aiff")
    with pytest.raises(ValueError, match="opus cannot encode 22050 Hz"):
        AudioStream("opus", 22050)
