"""A loopback TCP relay in front of a gateway, to cut a client's connections (a dropped
network) without touching the gateway: ``cut()`` resets every open connection and keeps
listening, so the client can redial through it."""

from __future__ import annotations

import socket
import struct
import threading


class TcpRelay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        #: Connections accepted so far.
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._connections.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        """Drop every open connection (no WebSocket close frame: to the client it is a lost
        network); how many client connections were cut."""
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(connections) // 2

    def close(self) -> None:
        self._server.close()
        self.cut()
