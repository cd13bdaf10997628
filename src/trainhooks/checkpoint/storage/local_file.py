"""``LocalFile``: a new file on the local disk, written with ``O_DIRECT`` or through the cache.

Two ways to put a checkpoint's bytes on a local disk, chosen per write:

* **``O_DIRECT``** (a save that someone waits for: a synchronous save, or a background
  save that ``Saver.wait`` or the next save waits for). The bytes gather in an aligned
  bounce buffer and each full chunk goes straight to the disk, the last partial block
  padded with zeros and the file truncated back to its length. There is no copy into
  the page cache and no writeback afterwards: on the development VM a 1 GiB save
  takes 0.15 CPU-seconds instead of about 2, and finishes about twice as fast.
* **Through the page cache** (a background save nobody waits for, recognised by its
  thread's idle priority, see ``background.py``; a small file; a file system that
  refuses ``O_DIRECT``). ``os.writev`` from the caller's buffers, as any program
  writes. Its CPU cost lands on the idle-priority thread, which the training loop
  pre-empts, while ``O_DIRECT``'s request completions (interrupts, the file system's
  extent conversion) run at normal priority on whichever core they hit, often the
  loop's: measured on the development VM, a loop kept 63-75% of its speed beside a
  background ``O_DIRECT`` save and 91-99% beside an idle-priority cached one
  (``benchmarks/README.md``).

A save that is waited for in the middle switches to ``O_DIRECT`` at the next aligned
offset; the file's bytes are the same either way.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np

__all__ = ["DIRECT_CHUNK_BYTES", "LocalFile"]

# Linux takes at most IOV_MAX buffers per writev.
_IOV_MAX = 1024
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_SCHED_IDLE: int | None = getattr(os, "SCHED_IDLE", None)
# O_DIRECT wants buffer addresses, file offsets and lengths aligned to the logical
# block size: 512 or 4096 bytes on today's disks. Page alignment satisfies both.
_ALIGN = 4096
#: Bytes a :class:`LocalFile` gathers per ``O_DIRECT`` write (its bounce buffer).
DIRECT_CHUNK_BYTES = 8 * 2**20
# Buffers from this size are copied with NumPy, which releases the GIL.
_NUMPY_COPY_BYTES = 256 * 2**10
_HUGE_PAGE = 2 * 2**20
# Bounce buffers kept for reuse once their file is written (one per writing thread).
_KEEP_BOUNCES = 2


class LocalFile:
    """A new file on the local disk: bytes in order, then fsync, then close.

    See the module docstring for when bytes go out with ``O_DIRECT`` and when through
    the page cache. A file of at most one chunk (:data:`DIRECT_CHUNK_BYTES`, e.g. a
    manifest) is always written through the cache, when it is synced or closed.

    Args:
      path: the file to create; it must not exist.
      direct: allow ``O_DIRECT``; False writes every byte through the page cache.

    Example:
        >>> f = LocalFile("/tmp/example.bin")  # doctest: +SKIP
        >>> f.write([b"header", memoryview(bytearray(10))])  # doctest: +SKIP
        >>> f.fsync(); f.close()  # doctest: +SKIP
    """

    def __init__(self, path: str, *, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        self.path = path
        self._fd: int | None = os.open(path, flags, 0o644)
        self._direct_allowed = bool(direct and _O_DIRECT)
        self._fd_direct = False  # O_DIRECT is set on the descriptor now
        self._used_direct = False
        self._size = 0  # bytes accepted by write()
        self._pending = 0  # bytes in the bounce buffer, to go at offset _size - _pending
        self._bounce: _Bounce | None = None
        self._failed = False  # a write failed: close() drops what is pending

    @property
    def direct(self) -> bool:
        """True once some of the file was written with ``O_DIRECT``."""
        return self._used_direct

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is already closed")
        return self._fd

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        fd = self._require_fd()
        try:
            if not self._direct_allowed or (self._pending == 0 and _in_background()):
                self._plain(fd, buffers)
                return
            for b in buffers:
                self._gather(fd, b)
        except BaseException:
            self._failed = True
            raise

    def fsync(self) -> None:
        fd = self._require_fd()
        try:
            self._flush_pending(fd)
        except BaseException:
            self._failed = True
            raise
        os.fsync(fd)

    def close(self) -> None:
        if self._fd is None:
            return
        fd = self._fd
        try:
            if not self._failed:
                self._flush_pending(fd)
        finally:
            self._fd = None
            self._release_bounce()
            os.close(fd)

    def _plain(self, fd: int, buffers: Sequence[memoryview | bytes], *, new: bool = True) -> None:
        """Write ``buffers`` through the page cache; ``new``: bytes not yet counted."""
        if self._fd_direct:
            self._fd_direct = not _set_direct(fd, False)
        _write_all(fd, buffers)
        if new:
            self._size += sum(b.nbytes if type(b) is memoryview else len(b) for b in buffers)

    def _gather(self, fd: int, buffer: memoryview | bytes) -> None:
        """Copy ``buffer`` into the bounce buffer, writing out every chunk that fills."""
        source = buffer if type(buffer) is memoryview else memoryview(buffer)
        if not source.nbytes:
            return
        if source.format != "B" or source.ndim != 1:
            source = source.cast("B")
        if self._pending == 0 and not self._direct_allowed:  # O_DIRECT refused meanwhile
            self._plain(fd, [source])
            return
        done = 0
        if self._pending == 0 and self._size % _ALIGN:
            # Cached writes left the file at an unaligned length: write up to the
            # next aligned offset the same way, then gather from there.
            done = min(-self._size % _ALIGN, source.nbytes)
            self._plain(fd, [source[:done]])
        if self._bounce is None:
            self._bounce = _take_bounce()
        while done < source.nbytes:
            n = min(DIRECT_CHUNK_BYTES - self._pending, source.nbytes - done)
            self._bounce.copy_in(self._pending, source[done : done + n])
            self._pending += n
            self._size += n
            done += n
            if self._pending == DIRECT_CHUNK_BYTES:
                self._write_bounce(fd, DIRECT_CHUNK_BYTES)
                self._pending = 0
                if not self._direct_allowed:  # O_DIRECT refused: the rest goes straight out
                    self._plain(fd, [source[done:]])
                    return

    def _write_bounce(self, fd: int, nbytes: int) -> None:
        """Write the bounce buffer's first ``nbytes`` (aligned), with ``O_DIRECT`` if it works."""
        assert self._bounce is not None
        view = self._bounce.view[:nbytes]
        if not self._fd_direct and self._direct_allowed:
            self._fd_direct = self._direct_allowed = _set_direct(fd, True)
        done = 0
        while done < nbytes and self._fd_direct:
            try:
                done += os.write(fd, view[done:])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # The file system takes O_DIRECT opens but not these writes (alignment).
                self._fd_direct = self._direct_allowed = not _set_direct(fd, False)
            else:
                self._used_direct = True
                if done % _ALIGN and done < nbytes:  # a short write left us unaligned
                    self._fd_direct = self._direct_allowed = not _set_direct(fd, False)
        if done < nbytes:
            self._plain(fd, [view[done:]], new=False)

    def _flush_pending(self, fd: int) -> None:
        """Write what the bounce buffer holds; the file then has exactly ``_size`` bytes."""
        if self._pending:
            assert self._bounce is not None
            if self._fd_direct:
                padded = -(-self._pending // _ALIGN) * _ALIGN
                self._bounce.zero(self._pending, padded)
                self._write_bounce(fd, padded)
                os.ftruncate(fd, self._size)
                os.lseek(fd, self._size, os.SEEK_SET)
            else:  # a file of at most one chunk: through the cache
                self._plain(fd, [self._bounce.view[: self._pending]], new=False)
            self._pending = 0
        self._release_bounce()

    def _release_bounce(self) -> None:
        if self._bounce is not None:
            bounce, self._bounce = self._bounce, None
            _give_back_bounce(bounce)


def _in_background() -> bool:
    """True on a thread at idle priority: a background save that nobody waits for."""
    return _SCHED_IDLE is not None and os.sched_getscheduler(0) == _SCHED_IDLE


class _Bounce:
    """The aligned buffer that ``O_DIRECT`` writes come from.

    It is 2 MiB-aligned and asks for transparent huge pages, so that the kernel can
    send a chunk to the disk in fewer, larger requests. Buffers are reused (see
    :func:`_take_bounce`), so their pages are faulted in once per process.
    """

    def __init__(self, nbytes: int) -> None:
        self._map = mmap.mmap(-1, nbytes + _HUGE_PAGE)
        whole = np.frombuffer(self._map, np.uint8)
        skip = -whole.ctypes.data % _HUGE_PAGE
        advise = getattr(mmap, "MADV_HUGEPAGE", None)
        if advise is not None:
            try:
                self._map.madvise(advise, skip, nbytes)
            except OSError:  # kernels without transparent huge pages
                pass
        self.view = memoryview(self._map)[skip : skip + nbytes]
        self._array = whole[skip : skip + nbytes]

    def copy_in(self, offset: int, source: memoryview) -> None:
        n = source.nbytes
        if n >= _NUMPY_COPY_BYTES:
            np.copyto(self._array[offset : offset + n], np.frombuffer(source, np.uint8))
        else:
            self.view[offset : offset + n] = source

    def zero(self, start: int, end: int) -> None:
        self._array[start:end] = 0


_free_bounces: list[_Bounce] = []
_free_bounces_lock = threading.Lock()


def _take_bounce() -> _Bounce:
    """A bounce buffer for one file: a free one, or a new one."""
    with _free_bounces_lock:
        if _free_bounces:
            return _free_bounces.pop()
    return _Bounce(DIRECT_CHUNK_BYTES)


def _give_back_bounce(bounce: _Bounce) -> None:
    """Keep ``bounce`` for the next file, up to ``_KEEP_BOUNCES`` of them."""
    with _free_bounces_lock:
        if len(_free_bounces) < _KEEP_BOUNCES:
            _free_bounces.append(bounce)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False where the file system refuses it."""
    import fcntl  # POSIX only, as O_DIRECT is

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | _O_DIRECT) if on else (flags & ~_O_DIRECT))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _write_all(fd: int, buffers: Sequence[memoryview | bytes]) -> None:
    """``os.writev`` every byte of ``buffers`` in order, retrying short writes."""
    views = [b if type(b) is memoryview else memoryview(b) for b in buffers]
    while views:
        batch = views[:_IOV_MAX]
        written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
        # Drop what went out; keep the unwritten tail of a short write.
        done = 0
        while done < len(batch) and written >= batch[done].nbytes:
            written -= batch[done].nbytes
            done += 1
        if done < len(batch):
            batch[done] = batch[done].cast("B")[written:]
        views = batch[done:] + views[len(batch) :]
