"""A TCP relay for outage tests: the processes under test reach Postgres or RabbitMQ through it,
and the test cuts it and restores it. The machine's shared servers are never touched.

    relay = Relay("127.0.0.1", 5432).start()     # listens on 127.0.0.1:<relay.port>
    url = f"postgres://postgres@127.0.0.1:{relay.port}/db"
    relay.cut()            # a server restart: every live connection cut, new ones refused
    relay.cut("blackhole") # a server that hangs: every live connection cut, new ones accepted
                           # and never answered
    relay.restore()        # the server is back, on the same address
    relay.close()

One thread accepts, two threads per connection copy bytes each way. Django-free.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Literal

Mode = Literal["refuse", "blackhole"]


def _hard_close(sock: socket.socket) -> None:
    """Close at once with a reset (SO_LINGER 0): the peer's next read fails, like a server
    process that died."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class Relay:
    """A threaded TCP proxy from a free local port to ``host:port`` that can be cut."""

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.host = listen_host
        self.port = 0
        self.mode: Mode | None = None  # None: relaying
        self.connections = 0  # connections relayed to the target since start()
        self.cuts = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()  # both ends of every relayed connection
        self._held: set[socket.socket] = set()  # accepted while black-holed
        self._listener: socket.socket | None = None
        self._closed = False

    # --- control ---------------------------------------------------------------------------

    def start(self) -> Relay:
        self._listen()
        return self

    def cut(self, mode: Mode = "refuse") -> None:
        """The server goes away: every live connection is reset; new ones are refused
        (``refuse``: nobody listens on the port) or accepted and never answered
        (``blackhole``)."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self.mode = mode
            self.cuts += 1
            live, self._live = self._live, set()
            listener = self._listener if mode == "refuse" else None
            if listener is not None:
                self._listener = None
        if listener is not None:
            self._stop_listening(listener)
        for sock in live:
            _hard_close(sock)

    def restore(self) -> None:
        """The server is back on the same address."""
        with self._lock:
            was, self.mode = self.mode, None
            held, self._held = self._held, set()
        for sock in held:
            _hard_close(sock)
        if was == "refuse":
            self._listen()

    def close(self) -> None:
        """Stop relaying for good: every connection closed, nobody listening."""
        self._closed = True
        self.cut("refuse")
        with self._lock:
            held, self._held = self._held, set()
        for sock in held:
            _hard_close(sock)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the threads -----------------------------------------------------------------------

    def _listen(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.host, self.port))  # port 0 the first time: a free one
                break
            except OSError:
                listener.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(128)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener,), name=f"relay-{self.port}", daemon=True
        ).start()

    @staticmethod
    def _stop_listening(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._closed:
                _hard_close(client)
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        with self._lock:
            if self.mode == "blackhole":
                self._held.add(client)
                return
            if self.mode == "refuse":
                _hard_close(client)
                return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _hard_close(client)
            return
        with self._lock:
            if self.mode is not None:  # cut while connecting
                cut = True
            else:
                cut = False
                self._live.update((client, upstream))
                self.connections += 1
        if cut:
            _hard_close(client)
            _hard_close(upstream)
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side closed: close the other (a cut closed both already)
            with self._lock:
                mine = src in self._live
                self._live.discard(src)
                self._live.discard(dst)
            if mine:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
