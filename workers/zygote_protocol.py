"""The control language between the supervisor and a zygote (a per-kind template process).

A zygote has imported a kind's heavy modules once; the supervisor asks it to fork a fresh
worker instead of starting a new interpreter. The two talk over a ``SOCK_SEQPACKET`` socket
pair: every message is one record (so no length prefix is needed) holding one small msgpack
map, and a record can carry file descriptors (``SCM_RIGHTS``). File descriptors are the point:

* ``fork``   (supervisor -> zygote) carries the write ends of the new worker's stdout and
  stderr pipes, so its output reaches the supervisor exactly as a spawned worker's does;
* ``forked`` (zygote -> supervisor) carries a pidfd for the new worker, opened by its parent
  before it could be reaped, so the supervisor watches the right process even if the pid is
  reused later.

Messages, as ``{"t": type, ...}``::

    ready        zygote -> sup   pid, kind, import_s, threads, learned, unsafe (a reason, or None)
    fork         sup -> zygote   id, socket, max_threads            + fds [stdout, stderr]
    forked       zygote -> sup   id, pid                            + fds [pidfd]
    fork_failed  zygote -> sup   id, error
    exited       zygote -> sup   pid, code (like Popen.returncode: -N for signal N)
    learn        sup -> zygote   (a worker finished loading: import what its load learned)
    learned      zygote -> sup   modules, failed, seconds, unsafe (a reason, or None)

``learned`` in ``ready`` and ``modules`` in ``learned`` count the modules imported from the
kind's import manifest (:mod:`workers.import_manifest`).

Both ends trust each other less than fully: every field is type-checked on receipt and a
record that does not fit the schema raises :class:`ZygoteProtocolError`.
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack

#: One record's largest size; real messages are a few hundred bytes.
MAX_RECORD_BYTES = 64 * 1024
#: The most file descriptors one record carries (``fork`` has two).
MAX_FDS = 2

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"pid": int, "kind": str, "import_s": float, "threads": int, "learned": int,
              "unsafe": (str, type(None))},
    "fork": {"id": int, "socket": str, "max_threads": int},
    "forked": {"id": int, "pid": int},
    "fork_failed": {"id": int, "error": str},
    "exited": {"pid": int, "code": int},
    "learn": {},
    "learned": {"modules": int, "failed": int, "seconds": float, "unsafe": (str, type(None))},
}
_FDS_EXPECTED = {"fork": 2, "forked": 1}


class ZygoteProtocolError(Exception):
    """A record that is not one of the messages above (or carries the wrong fds)."""


def encode(message_type: str, /, **fields: Any) -> bytes:
    data: bytes = msgpack.packb({"t": message_type, **fields}, use_bin_type=True)
    return data


def decode(record: bytes, fds: list[int]) -> dict[str, Any]:
    """Check one record against the schema; closes ``fds`` itself when the record is bad."""
    try:
        message = msgpack.unpackb(record, raw=False, strict_map_key=True, max_bin_len=0,
                                  max_array_len=16, max_map_len=16, max_ext_len=0)
        if not isinstance(message, dict):
            raise ZygoteProtocolError(f"record is a {type(message).__name__}, not a map")
        kind = message.get("t")
        if not isinstance(kind, str) or kind not in _SCHEMA:
            raise ZygoteProtocolError(f"unknown message type {kind!r:.40}")
        schema = _SCHEMA[kind]
        if set(message) != {"t", *schema}:
            raise ZygoteProtocolError(f"{kind}: fields {sorted(message)} do not match")
        for name, expected in schema.items():
            value = message[name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = message[name] = float(value)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ZygoteProtocolError(f"{kind}.{name} has the wrong type")
        if len(fds) != _FDS_EXPECTED.get(kind, 0):
            raise ZygoteProtocolError(f"{kind} came with {len(fds)} file descriptors")
    except (ValueError, msgpack.UnpackException) as e:  # includes ExtraData, FormatError
        _close(fds)
        raise ZygoteProtocolError(f"undecodable record: {e}") from None
    except ZygoteProtocolError:
        _close(fds)
        raise
    return message


def send(sock: socket.socket, record: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one record (and fds); raises ``BlockingIOError`` on a full non-blocking socket."""
    if fds:
        socket.send_fds(sock, [record], list(fds))
    else:
        sock.send(record)


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One record and the fds that came with it; ``(b"", [])`` means the peer is gone."""
    record, fds, flags, _ = socket.recv_fds(sock, MAX_RECORD_BYTES, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close(fds)
        raise ZygoteProtocolError("record or its file descriptors were truncated")
    return record, fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            socket.close(fd)
        except OSError:
            pass
