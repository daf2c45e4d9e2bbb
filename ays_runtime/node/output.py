"""Bounded capture of a job's output.

A job may write without limit; the node must not. `OutputBuffer` keeps at most `cap` bytes of
a stream however much is written to it: the first quarter (what the job set out to do) and the
last three quarters (where a failure shows), and counts every byte. `PipeReader` drains a
pipe into a buffer from the event loop, so a chatty job never blocks on a full pipe and never
grows the node's memory.
"""

from __future__ import annotations

import asyncio
import os

READ_CHUNK = 65_536
# Reads per wake-up of the event loop: a job writing faster than the node reads must not
# starve everything else on the loop (about 1 MiB, then the loop moves on and comes back).
READS_PER_WAKEUP = 16
_CONTINUATION = range(0x80, 0xC0)  # UTF-8 bytes that cannot start a character


class OutputBuffer:
    """Keeps the head and the tail of a byte stream, at most `cap` bytes in all.

    `write` is O(len(data)) amortised; memory stays below 2 x cap at any moment.
    """

    def __init__(self, cap: int) -> None:
        if cap < 4:
            raise ValueError(f"output cap {cap} is too small: at least 4 bytes")
        self.cap = cap
        self.total = 0  # every byte ever written, kept or not
        self._head_cap = cap // 4
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        if len(data) >= self._tail_cap:
            self._tail[:] = data[-self._tail_cap :]
            return
        self._tail += data
        # Trimmed lazily, so a stream of small writes does not move the tail every time.
        if len(self._tail) > 2 * self._tail_cap:
            del self._tail[: len(self._tail) - self._tail_cap]

    @property
    def kept(self) -> int:
        """Bytes held (after `compact`, at most `cap`)."""
        return len(self._head) + len(self._tail)

    @property
    def truncated(self) -> bool:
        """True when bytes were dropped: the stream was longer than `cap`."""
        return self.omitted > 0

    @property
    def omitted(self) -> int:
        """How many bytes between the kept head and the kept tail were dropped."""
        return self.total - len(self._head) - min(len(self._tail), self._tail_cap)

    def getvalue(self) -> bytes:
        """The kept output; when bytes were dropped, one marker line stands where they were."""
        tail = bytes(self._tail[-self._tail_cap :])
        if not self.omitted:
            return bytes(self._head) + tail
        marker = f"\n[ays: {self.omitted} bytes of output not kept]\n".encode()
        return bytes(self._head) + marker + tail

    def read_from(self, position: int) -> tuple[bytes, int]:
        """The kept bytes from stream position `position` on, and the position to read from
        next time (the stream's length so far).

        Positions count every byte ever written, kept or not, so a reader that follows a
        running job asks for `next` again and gets only what came since. A position inside
        the dropped middle gets the marker line, then the kept tail.
        """
        position = max(0, position)
        head_end = len(self._head)
        tail = bytes(self._tail[-self._tail_cap :])
        tail_start = self.total - len(tail)
        if position >= tail_start:
            return tail[position - tail_start :], self.total
        omitted = self.omitted
        marker = f"\n[ays: {omitted} bytes of output not kept]\n".encode() if omitted else b""
        if position < head_end:
            return bytes(self._head[position:]) + marker + tail, self.total
        return marker + tail, self.total

    def compact(self) -> None:
        """Drop what the lazy trimming of the tail still holds (once the stream has ended)."""
        if len(self._tail) > self._tail_cap:
            del self._tail[: len(self._tail) - self._tail_cap]

    def end(self) -> bytes:
        """The longest kept run of bytes that ends the stream, with no gap in it."""
        tail = bytes(self._tail[-self._tail_cap :])
        return tail if self.omitted else bytes(self._head) + tail

    def excerpt(self, limit: int) -> tuple[str, bool]:
        """The end of the output as text of at most `limit` UTF-8 bytes, and whether
        anything was left out.

        The end is kept rather than the start because that is where a failing job says why.
        When something is left out, the text starts with a line saying how much.
        """
        end = self.end()
        if len(end) == self.total and len(end) <= limit:
            text = end.decode("utf-8", "replace")
            if len(text.encode()) <= limit:
                return text, False
        budget = max(limit - 64, 0)  # room for the marker line
        raw = end[-budget:] if budget else b""
        skip = 0
        while skip < min(3, len(raw)) and raw[skip] in _CONTINUATION:
            skip += 1  # start on a character boundary
        raw = raw[skip:]
        text = raw.decode("utf-8", "replace")
        encoded = text.encode()
        if len(encoded) > budget:  # invalid bytes grew into 3-byte replacement characters
            text = encoded[-budget:].decode("utf-8", "ignore")
        hidden = self.total - len(raw)
        return f"[ays: first {hidden} bytes of output not shown]\n{text}", True


class PipeReader:
    """Reads the parent's end of a pipe into an `OutputBuffer` until end of file.

    Owns `fd` from construction: `close()` stops reading and closes it, whether or not end of
    file was reached (a process the job left behind may hold the pipe open for ever).
    Must be created on the event loop that will do the reading.
    """

    def __init__(self, fd: int, buffer: OutputBuffer) -> None:
        self._fd = fd
        self._buffer = buffer
        self._loop = asyncio.get_running_loop()
        self.eof: asyncio.Future[None] = self._loop.create_future()
        self._closed = False
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as err:  # EIO and the like: nothing more will come
                self._buffer.write(f"\n[ays: reading output failed: {err.strerror}]\n".encode())
                data = b""
            if not data:
                self._loop.remove_reader(self._fd)
                if not self.eof.done():
                    self.eof.set_result(None)
                return
            self._buffer.write(data)

    async def wait_eof(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for end of file; True when it came."""
        if not self.eof.done():
            await asyncio.wait({self.eof}, timeout=timeout)
        return self.eof.done()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        if not self.eof.done():
            self.eof.cancel()
