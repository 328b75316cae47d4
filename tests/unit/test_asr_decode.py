"""Uploaded audio decoding for the ``asr`` kind: real files decode, damaged ones are 400s.

A worker answers any exception other than a ``ModelError`` as an internal failure (502), so
every way an upload can be broken must come out of :func:`decode_upload` as
``invalid_request`` naming the file. Hypothesis damages a real FLAC recording (truncation,
flipped bytes, spliced garbage) and throws random bytes at the decoder to check exactly that.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.asr_decode import SAMPLE_RATE, decode_upload
from workers.base import ModelError
from workers.protocol import ErrorCode

SPEECH = (Path(__file__).resolve().parent.parent / "data" / "quick_brown_fox.flac").read_bytes()


def test_a_real_recording_decodes_to_16khz_mono_float() -> None:
    samples = decode_upload(SPEECH, "fox.flac", 60)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert 3.0 < len(samples) / SAMPLE_RATE < 4.0
    assert 0.05 < np.abs(samples).max() <= 1.0


def test_stereo_44k_wav_is_resampled_and_mixed_down() -> None:
    t = np.arange(44100 * 2) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, np.stack([tone, tone], axis=1), 44100, format="WAV")
    samples = decode_upload(out.getvalue(), "stereo.wav", 60)
    assert abs(len(samples) - 2 * SAMPLE_RATE) < 200


@pytest.mark.parametrize(("data", "needle"), [
    (b"", "is empty"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "could not be decoded"),
    (SPEECH[:200], "holds no audio samples|could not be decoded"),
])
def test_broken_uploads_name_the_file(data: bytes, needle: str) -> None:
    with pytest.raises(ModelError) as caught:
        decode_upload(data, "take 2.wav", 60)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "file 'take 2.wav'" in caught.value.message
    assert any(n in caught.value.message for n in needle.split("|")), caught.value.message


def test_audio_past_the_duration_limit_is_refused() -> None:
    with pytest.raises(ModelError) as caught:
        decode_upload(SPEECH, "fox.flac", 1.0)
    assert "longer than this model's limit of 1 seconds" in caught.value.message


damaged = st.one_of(
    st.integers(1, len(SPEECH) - 1).map(lambda n: SPEECH[:n]),
    st.lists(st.tuples(st.integers(0, len(SPEECH) - 1), st.integers(0, 255)),
             min_size=1, max_size=20).map(
        lambda flips: bytes(_flip(bytearray(SPEECH), flips))),
    st.binary(min_size=1, max_size=4096).map(lambda junk: SPEECH[:4096] + junk),
    st.binary(min_size=1, max_size=4096),
)


def _flip(data: bytearray, flips: list[tuple[int, int]]) -> bytearray:
    for index, value in flips:
        data[index] = value
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged)
def test_damaged_uploads_decode_or_are_invalid_requests(data: bytes) -> None:
    try:
        samples = decode_upload(data, "damaged.flac", 10)
    except ModelError as e:
        assert e.code == ErrorCode.INVALID_REQUEST and "damaged.flac" in e.message
    else:
        assert samples.dtype == np.float32 and 0 < len(samples) <= 10 * SAMPLE_RATE
