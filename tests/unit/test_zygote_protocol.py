"""The zygote control records: what passes, what is refused, and that refused records never
leak the file descriptors they carried; plus the zygote's own fork-safety verdict."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest

from workers.zygote import fork_hazard
from workers.zygote_protocol import ZygoteProtocolError, decode, encode, receive, send


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_fork_request_travels_with_its_two_pipes() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        send(ours, encode("fork", id=7, socket="/run/x.sock", max_threads=4), (r, w))
        record, fds = receive(theirs)
        message = decode(record, fds)
        assert message == {"t": "fork", "id": 7, "socket": "/run/x.sock", "max_threads": 4}
        assert len(fds) == 2
        os.write(fds[1], b"hi")  # the received descriptors are the same pipe
        assert os.read(r, 2) == b"hi"
        for fd in fds:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)
        ours.close()
        theirs.close()


def test_a_closed_peer_reads_as_an_empty_record() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    assert receive(theirs) == (b"", [])
    theirs.close()


@pytest.mark.parametrize("record", [
    msgpack.packb([1, 2]),
    msgpack.packb({"t": "launch", "id": 1}),
    msgpack.packb({"t": "exited", "pid": 5}),  # a field missing
    msgpack.packb({"t": "exited", "pid": 5, "code": 0, "extra": 1}),
    msgpack.packb({"t": "exited", "pid": "5", "code": 0}),
    msgpack.packb({"t": "exited", "pid": True, "code": 0}),
    msgpack.packb({"t": "fork_failed", "id": 1, "error": b"bytes"}),
    b"\xc1",
    msgpack.packb({"t": "exited", "pid": 5, "code": 0}) + b"\x00",
])
def test_records_that_break_the_schema_are_refused(record: bytes) -> None:
    with pytest.raises(ZygoteProtocolError):
        decode(record, [])


def test_a_refused_record_closes_the_descriptors_it_brought() -> None:
    r, w = os.pipe()
    with pytest.raises(ZygoteProtocolError, match="file descriptors"):
        decode(encode("exited", pid=5, code=0), [r, w])  # exited carries none
    assert not _fd_open(r) and not _fd_open(w)


def test_a_forked_reply_without_its_pidfd_is_refused() -> None:
    with pytest.raises(ZygoteProtocolError):
        decode(encode("forked", id=1, pid=123), [])


def test_whole_seconds_are_accepted_where_a_float_is_expected() -> None:
    message = decode(encode("ready", pid=1, kind="k", import_s=2, threads=1, learned=0,
                            unsafe=None), [])
    assert message["import_s"] == 2.0 and isinstance(message["import_s"], float)


@pytest.mark.parametrize(("threads", "cuda", "verdict"), [
    (1, False, None),
    (2, False, "1 Python thread(s) were started while importing"),
    (1, True, "CUDA was initialised while importing"),
])
def test_a_zygote_forks_only_single_threaded_and_without_cuda(
    threads: int, cuda: bool, verdict: str | None
) -> None:
    assert fork_hazard(threads, cuda) == verdict
