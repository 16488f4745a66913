"""A unix socket in front of a redis-server's that forwards both ways and can say which
processes wait for an answer: a test that stalls Redis waits until the pool's processes are stuck
in a call, instead of sleeping and hoping they are."""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Connection:
    pid: int  # the process at the other end (SO_PEERCRED)
    client: socket.socket
    server: socket.socket
    asked: int = 0  # the moment (a counter) of the last request in, and of the last answer out
    answered: int = 0
    ended: bool = field(default=False)


class WatchingProxy:
    def __init__(self, target: str, directory: str):
        self.target = target
        self.path = os.path.join(directory, "proxy.sock")
        self.lock = threading.Lock()
        self.clock = 0
        self.connections: list[Connection] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(128)
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"unix://{self.path}?db={db}"

    def waiting(self) -> set[int]:
        """The pids with a request in and no answer out since."""
        with self.lock:
            return {c.pid for c in self.connections if not c.ended and c.asked > c.answered}

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for connection in self.connections:
                for end in (connection.client, connection.server):
                    end.close()

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            credentials = client.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            pid = struct.unpack("3i", credentials)[0]
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.target)
            connection = Connection(pid, client, server)
            with self.lock:
                self.connections.append(connection)
            threading.Thread(target=self._pump, args=(connection, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(connection, False), daemon=True).start()

    def _pump(self, connection: Connection, asking: bool) -> None:
        source, sink = (
            (connection.client, connection.server)
            if asking
            else (connection.server, connection.client)
        )
        try:
            while data := source.recv(65536):
                with self.lock:
                    if asking:
                        connection.asked = self._tick()
                    else:
                        connection.answered = self._tick()
                sink.sendall(data)
        except OSError:
            pass
        with self.lock:
            connection.ended = True
        for end in (connection.client, connection.server):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
