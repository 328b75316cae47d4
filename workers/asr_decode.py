"""Decoding of uploaded audio for the ``asr`` kind, with the limits an upload needs.

faster-whisper's own ``decode_audio`` decodes the whole file into memory before anyone can
look at its length, so a small, highly compressed upload (25 MB of 6 kbit/s Opus is nine
hours) would cost gigabytes. This module decodes with PyAV frame by frame into 16 kHz mono,
stops as soon as the audio passes the allowed duration, and turns every way a file can be
unreadable into one ``invalid_request`` error that names the uploaded file.
"""

from __future__ import annotations

import io
from typing import Any

import av
import numpy as np

from workers.base import ModelError, invalid

#: Whisper's input rate.
SAMPLE_RATE = 16000


def describe(filename: str) -> str:
    """The uploaded file as error messages name it (bounded, printable)."""
    shown = "".join(c for c in filename if c.isprintable())[:120]
    return f"file {shown!r}" if shown else "file"


def decode_upload(data: bytes, filename: str, max_seconds: float) -> np.ndarray[Any, Any]:
    """Float32 samples at 16 kHz mono; ``invalid_request`` naming the file when unreadable."""
    what = describe(filename)
    if not data:
        raise invalid(f"{what} is empty; upload an audio file")
    max_samples = int(max_seconds * SAMPLE_RATE)
    pieces: list[np.ndarray[Any, Any]] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise invalid(f"{what} holds no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in _frames(container):
                frame.pts = None  # the resampler checks timestamps that broken files get wrong
                for out in resampler.resample(frame):
                    total += _take(out, pieces)
                if total > max_samples:
                    raise invalid(
                        f"{what} is longer than this model's limit of {max_seconds:g} seconds"
                    )
            for out in resampler.resample(None):  # flush what the resampler holds back
                total += _take(out, pieces)
    except ModelError:
        raise
    # PyAV raises its FFmpegError family (a ValueError) for bad data, and a few plain errors
    # (EOFError, IndexError, ...) for truncated containers; none of them is the server's fault.
    except (av.FFmpegError, ValueError, EOFError, IndexError, OSError) as e:
        raise invalid(f"{what} could not be decoded as audio: {_short(e)}") from None
    if total == 0:
        raise invalid(f"{what} holds no audio samples")
    if total > max_samples:
        raise invalid(f"{what} is longer than this model's limit of {max_seconds:g} seconds")
    pcm = np.concatenate(pieces)
    return pcm.astype(np.float32) / 32768.0


def _frames(container: Any) -> Any:
    """The first audio stream's frames, skipping the undecodable ones a damaged file has."""
    frames = container.decode(audio=0)
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _take(frame: Any, pieces: list[np.ndarray[Any, Any]]) -> int:
    array = frame.to_ndarray().reshape(-1)
    pieces.append(array)
    return int(array.shape[0])


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:200]
