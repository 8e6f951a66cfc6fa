"""A stdlib-only WebSocket echo server, uploaded into sandboxes by the preview tests.

``python3 wsecho.py PORT`` listens on 127.0.0.1:PORT. A WebSocket upgrade (the handshake and
the frames written here by hand) echoes every text and binary message back and answers
pings and close; any other request gets its own request head back as ``text/plain``, so a
test can see what the server was sent, followed by the length and SHA-256 of its body
(``Content-Length`` or chunked).
"""

import base64
import hashlib
import socket
import struct
import sys
import threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Reader:
    def __init__(self, conn, buffered):
        self.conn = conn
        self.buf = buffered

    def take(self, n):
        while len(self.buf) < n:
            data = self.conn.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def read_body(reader, headers):
    """The body's length and SHA-256, read as it comes (never held whole)."""
    digest = hashlib.sha256()
    total = 0
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            line = b""
            while not line.endswith(b"\r\n"):
                line += reader.take(1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while reader.take(2) != b"\r\n":  # trailers, if any, end with a blank line
                    pass
                break
            while size:
                part = reader.take(min(size, 65536))
                digest.update(part)
                total += len(part)
                size -= len(part)
            reader.take(2)
    else:
        left = int(headers.get(b"content-length", b"0"))
        while left:
            part = reader.take(min(left, 65536))
            digest.update(part)
            total += len(part)
            left -= len(part)
    return total, digest.hexdigest()


def frame(opcode, payload):
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def echo(conn, reader):
    while True:
        b0, b1 = reader.take(2)
        opcode = b0 & 0x0F
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", reader.take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", reader.take(8))
        mask = reader.take(4) if b1 & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(reader.take(n)))
        if opcode == 8:
            conn.sendall(frame(8, payload[:2]))
            return
        if opcode == 9:
            conn.sendall(frame(10, payload))
        elif opcode in (1, 2):
            conn.sendall(frame(opcode, payload))


def handle(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"upgrade", b"").lower() != b"websocket":
            length, sha = read_body(Reader(conn, rest), headers)
            body = head + b"\r\n\r\nbody %d %s" % (length, sha.encode())
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body) + body
            )
            return
        accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        try:
            echo(conn, Reader(conn, rest))
        except (EOFError, OSError):
            pass


def main():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(sys.argv[1])))
    server.listen(16)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
