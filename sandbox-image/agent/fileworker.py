"""One file operation, in a process of its own that runs as the sandbox user.

The agent (``agent.files``) starts this module through ``spawn.start_process`` for each
``/files`` HTTP request, exactly like a command, so the sandbox user's permissions apply to
every path it touches. It reads, on stdin, one JSON line describing the request (method,
target, the few headers that matter, the home directory), then the request body exactly as
the gateway framed it (``Content-Length`` or chunked); it writes a complete HTTP/1.1 response
on stdout (``Connection: close``; chunked when the length is not known in advance). The agent
only moves bytes between the socket and these pipes, with backpressure both ways, so neither
process ever holds a whole file.

Standard library only; imports nothing from the agent.
"""

from __future__ import annotations

import email.utils
import errno
import json
import os
import shutil
import signal
import stat
import sys
import tarfile
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, unquote

#: Bytes moved at a time.
CHUNK = 256 * 1024
#: The pipe size asked for on stdout (Linux lets any user go up to 1 MiB).
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
DEFAULT_HOME = "/home/sandbox"

_REASONS = {
    200: "OK",
    201: "Created",
    206: "Partial Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    507: "Insufficient Storage",
}


class Failed(Exception):
    """Answer ``status`` with ``{"error": message}`` (and ``extra`` fields)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


class BodyIncomplete(Exception):
    """The request body ended early: the gateway went away. Nothing is answered."""


def os_failure(e: OSError, path: str) -> Failed:
    """The HTTP answer for an OSError on ``path``."""
    code = e.errno
    if code == errno.ENOENT:
        return Failed(404, f"no such file or directory: {path}")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY):
        return Failed(409, f"{os.strerror(code)}: {path}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Failed(403, f"{os.strerror(code)}: {path}")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return Failed(507, f"no space left in the sandbox writing {path}")
    if code in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
        return Failed(400, f"{os.strerror(code)}: {path}")
    return Failed(500, f"{os.strerror(code or 0)}: {path}")


# -- output -------------------------------------------------------------------------------


class Output:
    """Stdout as an HTTP response: a head, then a body (chunked or of a known length)."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.chunked = False
        self.started = False
        self.pending = bytearray()
        try:
            import fcntl

            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def head(self, status: int, headers: list[tuple[str, str]], length: int | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if length is None:
            self.chunked = True
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {length}")
        lines.append("Connection: close")
        self._write_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.started = True

    def write(self, data: bytes) -> int:
        """Body bytes; a chunked body is gathered into chunks of ``CHUNK`` bytes (tarfile
        writes 10 KiB at a time)."""
        if not data:
            return 0
        if self.chunked:
            self.pending += data
            if len(self.pending) >= CHUNK:
                self._flush()
        else:
            self._write_all(data)
        return len(data)

    def _flush(self) -> None:
        if self.pending:
            self._write_all(b"%x\r\n" % len(self.pending) + self.pending + b"\r\n")
            self.pending = bytearray()

    def end(self) -> None:
        if self.chunked:
            self._flush()
            self._write_all(b"0\r\n\r\n")

    def json(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode("utf-8")
        self.head(status, [("Content-Type", "application/json")], len(raw))
        self._write_all(raw)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """``count`` bytes of the open file ``fd`` from ``offset`` (length-framed bodies)."""
        assert not self.chunked
        while count > 0:
            try:
                n = os.sendfile(self.fd, fd, offset, min(count, PIPE_SIZE))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                os.lseek(fd, offset, os.SEEK_SET)
                data = os.read(fd, min(count, CHUNK))
                if not data:
                    raise BodyIncomplete("the file shrank while being sent") from None
                self._write_all(data)
                n = len(data)
            if n == 0:
                raise BodyIncomplete("the file shrank while being sent")
            offset += n
            count -= n


# -- input --------------------------------------------------------------------------------


class Body:
    """The request body, as a file-like object read in order (``read(n)``), decoded from
    the gateway's framing: ``Content-Length`` or chunked. ``BodyIncomplete`` when stdin ends
    before the body does."""

    def __init__(self, fd: int, length: int | None, chunked: bool, buffered: bytes = b"") -> None:
        self.fd = fd
        self.buffer = bytearray(buffered)
        self.chunked = chunked
        self.remaining = 0 if (length is None and not chunked) else (length or 0)
        self.in_chunk = 0
        self.done = not chunked and self.remaining == 0
        self.received = 0

    def _fill(self) -> None:
        data = os.read(self.fd, CHUNK)
        if not data:
            raise BodyIncomplete("the request body ended early")
        self.buffer += data

    def _line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 2]
                return line
            if len(self.buffer) > 4096:
                raise Failed(400, "malformed chunked body")
            self._fill()

    def read(self, size: int = -1) -> bytes:
        """At most ``size`` bytes (at least one unless the body is over)."""
        if size < 0:
            size = CHUNK
        if self.done:
            return b""
        if self.chunked:
            if self.in_chunk == 0:
                try:
                    self.in_chunk = int(self._line().split(b";")[0].strip(), 16)
                except ValueError:
                    raise Failed(400, "malformed chunked body") from None
                if self.in_chunk == 0:
                    while self._line():  # trailers, up to the blank line
                        pass
                    self.done = True
                    return b""
            want = min(size, self.in_chunk)
        else:
            want = min(size, self.remaining)
            if not self.buffer:
                # The common case: straight from the pipe, no copy through the buffer.
                data = os.read(self.fd, want)
                if not data:
                    raise BodyIncomplete("the request body ended early")
                self.received += len(data)
                self.remaining -= len(data)
                self.done = self.remaining == 0
                return data
        if not self.buffer:
            self._fill()
        data = bytes(self.buffer[:want])
        del self.buffer[: len(data)]
        self.received += len(data)
        if self.chunked:
            self.in_chunk -= len(data)
            if self.in_chunk == 0:
                while len(self.buffer) < 2:
                    self._fill()
                del self.buffer[:2]
        else:
            self.remaining -= len(data)
            self.done = self.remaining == 0
        return data

    def chunks(self) -> Iterator[bytes]:
        while True:
            data = self.read(CHUNK)
            if not data:
                return
            yield data


# -- requests -----------------------------------------------------------------------------


class Request:
    """What the agent tells us about the HTTP request."""

    def __init__(self, meta: dict[str, Any], body: Body) -> None:
        self.method: str = meta["method"]
        target: str = meta["target"]
        path, _, query = target.partition("?")
        self.route = unquote(path)
        self.query = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        self.headers: dict[str, str] = meta.get("headers", {})
        self.home: str = meta.get("home") or DEFAULT_HOME
        self.body = body

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    def path(self, name: str = "path", default: str | None = None) -> str:
        """A container path from the query: absolute, or relative to the home directory."""
        raw = self.query.get(name, default)
        if raw is None or raw == "":
            raise Failed(400, f"'{name}' must name a path")
        if "\x00" in raw:
            raise Failed(400, f"'{name}' must not contain NUL")
        return os.path.normpath(os.path.join(self.home, raw))


def _type_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _entry(path: str, name: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "name": name,
        "path": path,
        "type": _type_of(st.st_mode),
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "mtime": st.st_mtime,
    }


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as (first, last) inclusive; None to send the whole file;
    ``Failed(416)`` when it cannot be satisfied."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_text == "":
            suffix = int(last_text)
            if suffix <= 0:
                raise Failed(416, "empty suffix range", size=size)
            return max(0, size - suffix), size - 1
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if first >= size:
        raise Failed(416, f"range starts beyond the file's {size} bytes", size=size)
    if first < 0 or last < first:
        return None
    return first, min(last, size - 1)


def get_file(request: Request, out: Output) -> None:
    path = request.path()
    try:
        # O_NONBLOCK: opening a fifo must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise os_failure(e, path) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Failed(409, f"is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise Failed(409, f"not a regular file: {path}")
        size = st.st_size
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)),
            ("Accept-Ranges", "bytes"),
            # The size again, for the gateway's HEAD answer (its HTTP client keeps no
            # Content-Length for a response without a body).
            ("X-File-Size", str(size)),
        ]
        status, first, count = 200, 0, size
        wanted = request.headers.get("range")
        if wanted and request.method == "GET":
            chosen = _parse_range(wanted, size)
            if chosen is not None:
                first, last = chosen
                status, count = 206, last - first + 1
                headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
        out.head(status, headers, count)
        if request.method == "GET":
            out.sendfile(fd, first, count)
    finally:
        os.close(fd)


def put_file(request: Request, out: Output) -> None:
    path = request.path()
    mode_text = request.query.get("mode", "0644")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise Failed(400, "'mode' must be octal, like 0644") from None
    if not 0 <= mode <= 0o777:
        raise Failed(400, "'mode' must be permission bits (at most 0777)")
    parent, name = os.path.split(path)
    if not name:
        raise Failed(400, "'path' must name a file")
    if request.flag("mkdirs"):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise os_failure(e, parent) from None
    elif not os.path.isdir(parent):
        if os.path.lexists(parent):
            raise Failed(409, f"not a directory: {parent}")
        raise Failed(404, f"no such directory: {parent}")
    if os.path.isdir(path):
        raise Failed(409, f"is a directory: {path}")
    temp = os.path.join(parent, f".{name}.upload-{os.urandom(6).hex()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise os_failure(e, path) from None
    try:
        try:
            size = 0
            for data in request.body.chunks():
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                size += len(data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as e:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_failure(e, path) from None
        raise
    out.json(201, {"path": path, "size": size})


def delete(request: Request, out: Output) -> None:
    path = request.path()
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            if request.flag("recursive"):
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except OSError as e:
        raise os_failure(e, path) from None
    out.json(200, {"deleted": path})


def list_dir(request: Request, out: Output) -> None:
    root = request.path(default=".")
    try:
        depth = int(request.query.get("depth", "1"))
    except ValueError:
        raise Failed(400, "'depth' must be an integer") from None
    if depth < 1:
        raise Failed(400, "'depth' must be at least 1")
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise Failed(409, f"not a directory: {root}")
        first = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise os_failure(e, root) from None
    out.head(200, [("Content-Type", "application/json")])
    sep = b"["

    def walk(entries: list[os.DirEntry[str]], level: int) -> Iterator[dict[str, Any]]:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield _entry(entry.path, entry.name, st)
            if level < depth and stat.S_ISDIR(st.st_mode):
                try:
                    below = sorted(os.scandir(entry.path), key=lambda e: e.name)
                except OSError:
                    continue
                yield from walk(below, level + 1)

    batch = bytearray()
    for item in walk(first, 1):
        batch += sep + json.dumps(item).encode("utf-8")
        sep = b","
        if len(batch) >= CHUNK:
            out.write(bytes(batch))
            batch.clear()
    batch += b"[]" if sep == b"[" else b"]"
    out.write(bytes(batch))
    out.end()


def mkdir(request: Request, out: Output) -> None:
    path = request.path()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise os_failure(e, path) from None
    out.json(201, {"path": path})


class _Cached:
    """``pwd``/``grp`` for tarfile with the answers remembered: tarfile looks the owner's
    name up for every file, and each lookup reads /etc/passwd (10,000 files: most of the
    time of a tar)."""

    def __init__(self, module: Any, lookup: str) -> None:
        self._module = module
        self._lookup = lookup
        self._cache: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name != self._lookup:
            return getattr(self._module, name)
        return self._get

    def _get(self, key: int) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = getattr(self._module, self._lookup)(key)
            except KeyError as e:
                self._cache[key] = e
        found = self._cache[key]
        if isinstance(found, KeyError):
            raise found
        return found


def _cache_owner_names() -> None:
    import grp
    import pwd

    tar_module: Any = tarfile
    if not isinstance(getattr(tar_module, "pwd", None), _Cached):
        tar_module.pwd = _Cached(pwd, "getpwuid")
        tar_module.grp = _Cached(grp, "getgrgid")


def get_archive(request: Request, out: Output) -> None:
    root = request.path(default=".")
    gz = request.query.get("format", "tar") in ("tar.gz", "tgz")
    if request.query.get("format", "tar") not in ("tar", "tar.gz", "tgz"):
        raise Failed(400, "'format' must be tar or tar.gz")
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise Failed(409, f"not a directory: {root}")
        names = sorted(os.listdir(root))
    except OSError as e:
        raise os_failure(e, root) from None
    kind = "application/gzip" if gz else "application/x-tar"
    _cache_owner_names()
    out.head(200, [("Content-Type", kind)])
    # GNU format: long names and big files, without a PAX header per entry (PAX would carry
    # sub-second mtimes, and costs as much again per entry).
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=out, mode="w|gz" if gz else "w|", format=tarfile.GNU_FORMAT
    ) as tar:
        for name in names:
            tar.add(os.path.join(root, name), arcname=name)
    out.end()


def _refuse(name: str, why: str) -> Failed:
    return Failed(400, f"refused tar entry {name!r}: {why}", entry=name)


def _checked_name(member: tarfile.TarInfo) -> str:
    """The member's name relative to the destination, or ``Failed`` naming the entry."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refuse(name, "absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(name, "'..' in the name")
    if "\x00" in name:
        raise _refuse(name, "NUL in the name")
    if member.ischr() or member.isblk():
        raise _refuse(name, "device node")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise _refuse(name, "special file (fifo or unknown type)")
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise _refuse(name, "setuid or setgid bit")
    relative = "/".join(parts)
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            raise _refuse(name, f"symlink to an absolute path {target!r}")
        resolved = os.path.normpath(os.path.join(os.path.dirname(relative), target))
        if resolved == ".." or resolved.startswith("../"):
            raise _refuse(name, f"symlink pointing outside the directory ({target!r})")
    if member.islnk():
        target = member.linkname
        tparts = [p for p in target.split("/") if p not in ("", ".")]
        if target.startswith("/") or ".." in tparts:
            raise _refuse(name, f"hard link pointing outside the directory ({target!r})")
    return relative


Locate = Callable[[str, tarfile.TarInfo], tuple[str, str]]


def _extract(tar: tarfile.TarFile, staging: str | Locate) -> int:
    """Extract ``tar`` into ``staging`` (a directory, or a function giving the staging
    directory and the name below it for each entry's checked name), refusing what
    ``_checked_name`` refuses; the number of entries extracted.

    Few system calls per entry (10,000 small files are the common case): directories known
    to exist and names already extracted are remembered, not looked up."""
    umask = os.umask(0o022)
    os.umask(umask)
    made: set[str] = set()
    extracted: set[str] = set()
    count = 0
    for member in tar:
        relative = _checked_name(member)
        if not relative:
            continue
        if callable(staging):
            base, relative = staging(relative, member)
        else:
            base = staging
        if not relative:
            continue
        made.add(base)
        dest = os.path.join(base, relative)
        parent = os.path.dirname(dest)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        count += 1
        if member.isdir():
            if dest not in made:
                if not os.path.isdir(dest):
                    os.mkdir(dest, (member.mode & 0o777) | 0o700)
                made.add(dest)
            continue
        if dest in made:
            raise _refuse(member.name, "a directory of that name came earlier")
        if dest in extracted:
            os.unlink(dest)  # a later entry of the same name wins, as with tar
        extracted.add(dest)
        if member.issym():
            os.symlink(member.linkname, dest)
        elif member.islnk():
            target = "/".join(p for p in member.linkname.split("/") if p not in ("", "."))
            if callable(staging):
                link_base, target = staging(target, member)
                if link_base != base:
                    raise _refuse(member.name, "hard link across directories")
            os.link(os.path.join(base, target), dest, follow_symlinks=False)
        else:
            source = tar.extractfile(member)
            assert source is not None
            mode = member.mode & 0o777
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            try:
                remaining = member.size
                while remaining > 0:
                    data = source.read(min(remaining, CHUNK))
                    if not data:
                        break
                    remaining -= len(data)
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                if mode & umask:
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.utime(dest, (member.mtime, member.mtime), follow_symlinks=False)
    return count


def _merge(source: str, dest: str) -> None:
    """Move what ``source`` holds into ``dest``: files replace files, directories merge."""
    for name in os.listdir(source):
        src = os.path.join(source, name)
        dst = os.path.join(dest, name)
        src_dir = os.path.isdir(src) and not os.path.islink(src)
        dst_dir = os.path.isdir(dst) and not os.path.islink(dst)
        if src_dir and dst_dir:
            _merge(src, dst)
            os.rmdir(src)
        elif dst_dir:
            raise Failed(409, f"a directory is in the way of a file: {dst}")
        else:
            os.replace(src, dst)


def put_archive(request: Request, out: Output) -> None:
    root = request.path(default=".")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise os_failure(e, root) from None
    try:
        staging = os.path.join(root, f".archive-upload-{os.urandom(6).hex()}")
        os.mkdir(staging, 0o700)
    except OSError as e:
        raise os_failure(e, root) from None
    count = 0
    try:
        try:
            # tarfile's default stream buffer (10 KiB): its stream joins and slices that buffer
            # for every 512-byte header, so a large one costs a copy of itself per entry.
            with tarfile.open(fileobj=request.body, mode="r|*") as tar:  # type: ignore[call-overload]
                count = _extract(tar, staging)
        except tarfile.TarError as e:
            raise Failed(400, f"not a tar archive: {e}") from None
        except OSError as e:
            raise os_failure(e, root) from None
        try:
            _merge(staging, root)
        except OSError as e:
            raise os_failure(e, root) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out.json(201, {"path": root, "entries": count})


def _add_tree(tar: tarfile.TarFile, path: str, arcname: str) -> None:
    """Add ``path`` and what is below it, skipping what the user cannot read (other users'
    files in /tmp) and upload staging directories."""
    try:
        tar.add(path, arcname=arcname, recursive=False)
    except OSError:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        for name in names:
            if not name.startswith(".archive-upload-"):
                _add_tree(tar, os.path.join(path, name), f"{arcname}/{name}")


def snapshot_roots(request: Request) -> list[str]:
    """The writable directories a snapshot holds: the home directory and the tmpfs ones."""
    return [request.home, "/tmp", "/var/tmp"]


def get_snapshot(request: Request, out: Output) -> None:
    """The writable state as one tar, names relative to ``/`` (``home/sandbox/...``)."""
    _cache_owner_names()
    out.head(200, [("Content-Type", "application/x-tar")])
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=out, mode="w|", format=tarfile.GNU_FORMAT
    ) as tar:
        for root in snapshot_roots(request):
            if os.path.isdir(root):
                names = sorted(os.listdir(root))
                for name in names:
                    if not name.startswith(".archive-upload-"):
                        _add_tree(tar, os.path.join(root, name), f"{root.strip('/')}/{name}")
    out.end()


def put_snapshot(request: Request, out: Output) -> None:
    """Restore a snapshot tar: each entry below one of the snapshot roots, extracted (with
    the checks of any tar upload) into a staging directory in that root, then merged."""
    roots = {root.strip("/"): root for root in snapshot_roots(request)}
    stagings: dict[str, str] = {}

    def locate(relative: str, member: tarfile.TarInfo) -> tuple[str, str]:
        for prefix, root in roots.items():
            if relative == prefix:
                return root, ""
            if relative.startswith(prefix + "/"):
                if root not in stagings:
                    staging = os.path.join(root, f".archive-upload-{os.urandom(6).hex()}")
                    os.mkdir(staging, 0o700)
                    stagings[root] = staging
                return stagings[root], relative[len(prefix) + 1 :]
        raise _refuse(member.name, "not below the home directory, /tmp or /var/tmp")

    try:
        try:
            # tarfile's default stream buffer (10 KiB): its stream joins and slices that buffer
            # for every 512-byte header, so a large one costs a copy of itself per entry.
            with tarfile.open(fileobj=request.body, mode="r|*") as tar:  # type: ignore[call-overload]
                _extract(tar, locate)
        except tarfile.TarError as e:
            raise Failed(400, f"not a tar archive: {e}") from None
        except OSError as e:
            raise os_failure(e, "/") from None
        for root, staging in stagings.items():
            try:
                _merge(staging, root)
            except OSError as e:
                raise os_failure(e, root) from None
    finally:
        for staging in stagings.values():
            shutil.rmtree(staging, ignore_errors=True)
    out.json(201, {"restored": sorted(stagings)})


ROUTES = {
    ("GET", "/files"): get_file,
    ("HEAD", "/files"): get_file,
    ("PUT", "/files"): put_file,
    ("DELETE", "/files"): delete,
    ("GET", "/files/list"): list_dir,
    ("POST", "/files/mkdir"): mkdir,
    ("GET", "/files/archive"): get_archive,
    ("PUT", "/files/archive"): put_archive,
    ("GET", "/files/snapshot"): get_snapshot,
    ("PUT", "/files/snapshot"): put_snapshot,
}


def _read_meta(fd: int) -> tuple[dict[str, Any], bytes]:
    buffer = bytearray()
    while b"\n" not in buffer:
        data = os.read(fd, CHUNK)
        if not data:
            raise BodyIncomplete("no request description")
        buffer += data
        if len(buffer) > 64 * 1024 and b"\n" not in buffer:
            raise BodyIncomplete("request description too long")
    line, _, rest = bytes(buffer).partition(b"\n")
    meta = json.loads(line)
    if not isinstance(meta, dict):
        raise BodyIncomplete("bad request description")
    return meta, rest


def serve(stdin: int = 0, stdout: int = 1) -> int:
    """Handle the one request on stdin; the exit status is 0 when it was answered."""
    # The agent sends SIGTERM when the gateway goes away: unwind, so temp files go too.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        meta, rest = _read_meta(stdin)
    except (BodyIncomplete, ValueError):
        return 2
    headers = meta.get("headers", {})
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    try:
        length: int | None = int(headers.get("content-length", "0") or 0)
    except ValueError:
        length = None
    out = Output(stdout)
    body = Body(stdin, length, chunked, rest)
    request = Request(meta, body)
    try:
        handler = ROUTES.get((request.method, request.route))
        if handler is None:
            raise Failed(404 if request.route not in {r for _, r in ROUTES} else 405, "no route")
        handler(request, out)
    except BodyIncomplete:
        return 3
    except Failed as e:
        if out.started:
            return 4
        out.json(e.status, {"error": e.message, **e.extra})
    except BrokenPipeError:
        return 5
    except OSError as e:
        if out.started:
            return 4
        failure = os_failure(e, getattr(e, "filename", None) or "")
        out.json(failure.status, {"error": failure.message})
    return 0


# -- watching -----------------------------------------------------------------------------

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED, IN_ISDIR = 0x400, 0x800, 0x8000, 0x40000000
IN_Q_OVERFLOW = 0x4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)


def _emit(**fields: Any) -> None:
    os.write(1, json.dumps(fields).encode("utf-8") + b"\n")


def watch(path: str, recursive: bool) -> int:
    """Watch ``path`` with inotify, as the sandbox user; one JSON line per event on stdout
    (``{"ready": path}`` first, ``{"error": ...}`` if it cannot), until killed."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(IN_CLOEXEC)
    if fd < 0:
        _emit(error=f"inotify: {os.strerror(ctypes.get_errno())}")
        return 1
    dirs: dict[int, str] = {}

    def add(target: str) -> bool:
        wd = libc.inotify_add_watch(fd, os.fsencode(target), WATCH_MASK)
        if wd < 0:
            return False
        dirs[wd] = target
        return True

    def add_tree(top: str) -> None:
        for current, subdirs, _ in os.walk(top):
            for name in subdirs:
                add(os.path.join(current, name))

    if not add(path):
        _emit(error=f"cannot watch {path}: {os.strerror(ctypes.get_errno())}")
        return 1
    if recursive and os.path.isdir(path):
        add_tree(path)
    _emit(ready=path)
    header = struct.Struct("iIII")
    moved = IN_MOVED_FROM | IN_MOVED_TO | IN_MOVE_SELF
    while True:
        data = os.read(fd, 64 * 1024)
        offset = 0
        while offset + header.size <= len(data):
            wd, mask, _cookie, length = header.unpack_from(data, offset)
            raw = data[offset + header.size : offset + header.size + length]
            offset += header.size + length
            if mask & IN_Q_OVERFLOW:
                _emit(event="overflow", path=path)
                continue
            base = dirs.get(wd)
            if base is None:
                continue
            name = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
            where = os.path.join(base, name) if name else base
            if mask & IN_IGNORED:
                dirs.pop(wd, None)
                if not dirs:
                    _emit(gone=path)
                    return 0
                continue
            if mask & IN_CREATE:
                kind = "created"
                if recursive and mask & IN_ISDIR:
                    add(where)
                    add_tree(where)
            elif mask & (IN_DELETE | IN_DELETE_SELF):
                kind = "deleted"
            elif mask & moved:
                kind = "moved"
                if recursive and mask & IN_MOVED_TO and mask & IN_ISDIR:
                    add(where)
                    add_tree(where)
            else:
                kind = "modified"
            _emit(event=kind, path=where)


def _terminated(signum: int, frame: Any) -> None:
    raise BodyIncomplete("terminated by the agent")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "watch":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            return watch(args[1], args[2] == "recursive")
        except (BrokenPipeError, KeyboardInterrupt):
            return 0
    return serve()


if __name__ == "__main__":
    sys.exit(main())
