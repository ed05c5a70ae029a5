"""The access/audit log writer: a bounded queue filled by the data path, drained by one thread.

``submit`` never blocks and never raises: a full queue drops the record and counts it. The writer
thread seals each record into the hash chain (agent.audit.chain) and appends it to the file (size-
based rotation: FILE → FILE.1 → … → FILE.<backups>) or to stdout. A failed write (disk full, I/O
error) is logged (at most once a minute), counted, and the record is lost; the next record that can
be written is preceded by a ``gap`` record saying how many were lost and why, so the chain stays
verifiable and the loss stays visible. On start the chain resumes from the last record of the file
(or of FILE.1), so restarts do not break it.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from typing import Any, Callable

from agent.audit.chain import FILE_EVENT, GENESIS, parse_line, seal
from agent.audit.record import RECORD_VERSION, rfc3339

log = logging.getLogger("tcpmesh.audit")
STDOUT = "-"
DEFAULT_QUEUE = 65536
ERROR_LOG_INTERVAL = 60.0
TAIL_BYTES = 1 << 20  # how far back the chain is looked for in an existing file
BATCH_PAUSE = 0.005  # seconds the writer waits after emptying the queue, so records reach it in batches
_STOP = object()


class AccessLog:
    def __init__(self, target: str, *, node: str = "", max_bytes: int = 100 << 20, backups: int = 5,
                 metrics: Any = None, queue_size: int = DEFAULT_QUEUE,
                 enrich: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.target = target
        self.node = node
        self.max_bytes = max_bytes
        self.backups = backups
        self._metrics = metrics  # agent.telemetry.metrics.Metrics (access_log_* members) or None
        self._enrich = enrich
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="tcpmesh-access-log", daemon=True)
        self._fd: int | None = None
        self._size = 0
        self._seq = 0
        self._prev = GENESIS
        self._resumed = False
        self._regular = False
        self._suspect_tail = False  # a write failed: the file may end in a torn line
        self._queue_dropped = 0  # written by submit() only
        self._queue_dropped_seen = 0  # read by the writer thread only
        self._lost: dict[str, int] = {}  # reason → records lost and not yet reported by a gap record
        self._errors = 0
        self._last_error_log = 0.0
        self._os_write = os.write  # a seam for tests that simulate a failing disk

    # -- data path --------------------------------------------------------------------------------
    def submit(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._queue_dropped += 1
            self._count_dropped("queue_full")

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` s), then close."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("access log: queue still full at shutdown; records not yet written are lost")
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record submitted so far was handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    @property
    def sequence(self) -> int:
        """The seq the next record will get."""
        return self._seq

    # -- writer thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    self._close()
                    return
                self._handle(item)
            except Exception:  # a thread root: one bad record must not end the access log
                log.exception("access log: record not written")
                self._lose("internal_error")
            finally:
                self._queue.task_done()
            if self._queue.empty():  # let records gather: while this thread is not waiting in get(), the data
                time.sleep(BATCH_PAUSE)  # path's put() wakes no one (a wake-up per record cost ~6 % of its CPU)

    def _handle(self, record: dict[str, Any]) -> None:
        dropped = self._queue_dropped
        if dropped != self._queue_dropped_seen:
            self._lost["queue_full"] = self._lost.get("queue_full", 0) + dropped - self._queue_dropped_seen
            self._queue_dropped_seen = dropped
        if self._lost:
            gap = {"v": RECORD_VERSION, "event": "gap", "time": rfc3339(time.time()),
                   "dropped": sum(self._lost.values()), "reasons": dict(sorted(self._lost.items()))}
            if not self._emit(gap):
                self._lose("write_error")
                return
            self._lost.clear()
        record = {**record, "node": self.node}
        if self._enrich is not None:
            try:
                self._enrich(record)
            except Exception:  # noqa: BLE001 — enrichment is best effort; the record is written anyway
                log.debug("access log: enrich failed", exc_info=True)
        if not self._emit(record):
            self._lose("write_error")

    def _emit(self, record: dict[str, Any]) -> bool:
        """Seal and write one record; False (logged and counted) when the write failed."""
        try:
            self._prepare()
            line, digest = seal(record, self._seq, self._prev)
            if self._needs_rotation(len(line)):
                self._rotate()
                line, digest = seal(record, self._seq, self._prev)
            self._write(line, digest)
            return True
        except OSError as exc:
            self._write_failed(exc)
            return False

    def _write(self, line: bytes, digest: str) -> None:
        assert self._fd is not None
        view = memoryview(line)
        start = self._size
        try:
            while view:
                written = self._os_write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError:
            self._undo_partial(start)
            raise
        self._seq += 1
        self._prev = digest
        if self._metrics is not None:
            self._metrics.access_log_records.inc()
            self._metrics.access_log_sequence.set(self._seq - 1)

    def _undo_partial(self, start: int) -> None:
        """A full disk takes part of a line, then fails: cut the file back to where the record began,
        so no torn line is left in the middle of the log (verify would stop there)."""
        if self._regular and self._fd is not None and self._size > start:
            try:
                os.ftruncate(self._fd, start)
                self._size = start
            except OSError:
                pass  # left torn: _suspect_tail ends the line before the next record

    def _prepare(self) -> None:
        if self._fd is not None and not self._suspect_tail:
            return
        first = not self._resumed
        if self._fd is None:
            if self.target == STDOUT:
                self._fd = os.dup(1)
                self._size = 0
            else:
                self._open_file()
        if first:
            self._resumed = True
            if self._regular:
                self._resume_chain()
        if self._suspect_tail and self._regular:
            self._end_torn_line()
        self._suspect_tail = False
        if first and self._size == 0:
            self._write_file_record()

    def _open_file(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
        self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        status = os.fstat(self._fd)
        self._regular = stat.S_ISREG(status.st_mode)  # not a pipe or device: resume, rotate, mend torn lines
        self._size = status.st_size

    def _resume_chain(self) -> None:
        """Continue the chain of an existing log (this file, or the rotated FILE.1 when this one is empty)."""
        for path in (self.target, f"{self.target}.1"):
            last = _last_record(path)
            if last is not None:
                self._seq, self._prev = last.seq + 1, last.digest  # type: ignore[operator]
                log.info("access log: continuing the chain of %s at seq %d", path, self._seq)
                if path == self.target:
                    self._end_torn_line()
                return
            if path == self.target and self._size > 0:
                log.warning("access log: %s holds no readable record near its end; it is rotated away and a "
                            "new chain starts", path)
                self._rotate_files()
                return

    def _end_torn_line(self) -> None:
        """After a crash or failed write the file may end mid-line: end it, so the next record stands alone."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        self._size = size
        if size == 0:
            return
        with open(self.target, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                self._size += os.write(self._fd, b"\n")

    def _write_file_record(self) -> None:
        record = {"v": RECORD_VERSION, "event": FILE_EVENT, "time": rfc3339(time.time()), "node": self.node,
                  "file": os.path.basename(self.target) if self.target != STDOUT else "stdout"}
        line, digest = seal(record, self._seq, self._prev)
        self._write(line, digest)

    def _needs_rotation(self, length: int) -> bool:
        return self._regular and self._size > 0 and self._size + length > self.max_bytes

    def _rotate(self) -> None:
        self._rotate_files()
        self._write_file_record()

    def _rotate_files(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.backups <= 0:
            os.unlink(self.target) if os.path.exists(self.target) else None
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.target}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.target}.{i + 1}")
            if os.path.exists(self.target):
                os.replace(self.target, f"{self.target}.1")
        self._open_file()

    def _write_failed(self, exc: OSError) -> None:
        self._errors += 1
        self._suspect_tail = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self._metrics is not None:
            self._metrics.access_log_write_errors.inc()
        now = time.monotonic()
        if self._errors == 1 or now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error("access log %s: write failed (%s; %d failures so far); records are being lost and the "
                      "data path continues — free space or fix the path", self.target,
                      exc.strerror or exc, self._errors)

    def _lose(self, reason: str) -> None:
        self._lost[reason] = self._lost.get(reason, 0) + 1
        self._count_dropped(reason)

    def _count_dropped(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.access_log_dropped.labels(reason).inc()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def _last_record(path: str):
    """The last valid record near the end of ``path`` (an Entry), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None
    lines = tail.split(b"\n")
    for raw in reversed(lines[:-1]):  # the last piece is empty, or a torn line
        if not raw:
            continue
        entry = parse_line(raw + b"\n", path, 0)
        if not entry.error:
            return entry
    return None


def access_log_from_config(config: Any, metrics: Any = None,
                           enrich: Callable[[dict[str, Any]], None] | None = None) -> AccessLog | None:
    """The access log ``config.access_log`` asks for (agent.config.AccessLogConfig); None when ``off``."""
    settings = config.access_log
    if settings.path == "off":
        return None
    return AccessLog(settings.path, node=config.node.name, max_bytes=settings.max_bytes, backups=settings.backups,
                     metrics=metrics, enrich=enrich)
