"""The access/audit log writer: a bounded queue filled by the data path, drained by one thread.

``submit`` never blocks and never raises: a full queue drops the record and counts it. The writer
thread seals each record into the keyed chain (agent.audit.chain, keys from agent.audit.keys) and
appends it to the file (size-based rotation: FILE → FILE.1 → … → FILE.<backups>) or to stdout. A
failed write (disk full, I/O error) is logged (at most once a minute), counted, and the record is
lost; the next record that can be written is preceded by a ``gap`` record saying how many were lost
and why, so the chain stays verifiable and the loss stays visible.

On start (``start``, in the caller's thread) the key file is read, or created 0600 at first start; a
key file that cannot be used stops the start with an error naming it. Before the first append the
writer verifies the tail of the file (or of FILE.1) with the keys: an intact tail is continued; a
broken or forged one is never continued silently — it is logged, counted in
``tcpmesh_access_log_chain_breaks_total`` and named by a ``break`` record, which links to the last
record that verified. A key added to the key file (``tcpmesh audit rotate-key``) is picked up within
``KEY_POLL_SECONDS``: a ``key`` record sealed with the old key announces it, then the new one seals.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from typing import Any, Callable

from agent.audit.chain import BREAK_EVENT, FILE_EVENT, GENESIS, KEY_EVENT, Verification, parse_line, seal, \
    verify_entries
from agent.audit.keys import AuditKey, AuditKeyError, Keyring, ensure_keys, inside, read_keys, signature
from agent.audit.record import RECORD_VERSION, rfc3339

log = logging.getLogger("tcpmesh.audit")
STDOUT = "-"
DEFAULT_QUEUE = 65536
ERROR_LOG_INTERVAL = 60.0
TAIL_BYTES = 1 << 20  # how far back the chain is verified in an existing file on start
KEY_POLL_SECONDS = 1.0  # how often the key file is checked for an added key
MAX_BREAK_FINDINGS = 20  # findings named in one break record (the rest: counted in it)
BATCH_PAUSE = 0.005  # seconds the writer waits after emptying the queue, so records reach it in batches
_STOP = object()


class AccessLog:
    def __init__(self, target: str, *, key_path: str, node: str = "", max_bytes: int = 100 << 20,
                 backups: int = 5, metrics: Any = None, queue_size: int = DEFAULT_QUEUE,
                 enrich: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.target = target
        self.key_path = key_path
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
        self._keys: Keyring | None = None  # read by start()
        self._chain_key: AuditKey | None = None  # the key that sealed the last record (or seals the first)
        self._key_signature: tuple | None = None
        self._key_checked = 0.0
        self._pending_break: dict[str, Any] | None = None
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
        """Read (or at first start create) the key file, then start the writer thread.
        Raises AuditKeyError naming the file when the key cannot be used."""
        if self.target != STDOUT and inside(self.key_path, os.path.dirname(os.path.abspath(self.target))):
            raise AuditKeyError(f"the audit key {self.key_path} is inside the access log's directory "
                                f"{os.path.dirname(os.path.abspath(self.target))}: whoever can write the log could "
                                "replace it; set access_log.key to a root-only directory, e.g. "
                                "/var/lib/tcpmesh/audit.key")
        try:
            self._keys, created = ensure_keys(self.key_path)
        except OSError as exc:
            raise AuditKeyError(f"cannot create the audit key file {self.key_path}: {exc.strerror or exc}; "
                                "check access_log.key and that its directory is writable by the agent") from None
        if created:
            log.info("access log: created the audit key %s (mode 0600, key %s); keep it off the log's disk "
                     "backups and use it with `tcpmesh audit verify --key`", self.key_path, self._keys.current.id)
        self._key_signature = signature(self.key_path)
        self._key_checked = time.monotonic()
        self._chain_key = self._keys.current
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
        try:  # verify and resume the chain now, not at the first connection: a break is reported at start
            self._prepare()
        except OSError as exc:
            self._write_failed(exc)
        except Exception:  # a thread root: the records that follow still get their chance
            log.exception("access log: resuming the chain failed")
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
        self._poll_keys()
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
            assert self._keys is not None and self._chain_key is not None
            if self._chain_key.id != self._keys.current.id:
                self._append({"v": RECORD_VERSION, "event": KEY_EVENT, "time": rfc3339(time.time()),
                              "node": self.node, "next_key": self._keys.current.id})
                log.info("access log: key %s seals from seq %d on (key record at seq %d, sealed with key %s)",
                         self._keys.current.id, self._seq, self._seq - 1, self._chain_key.id)
                self._chain_key = self._keys.current
            self._append(record)
            return True
        except OSError as exc:
            self._write_failed(exc)
            return False

    def _append(self, record: dict[str, Any]) -> None:
        assert self._chain_key is not None
        line, mac = seal(record, self._seq, self._prev, self._chain_key)
        if self._needs_rotation(len(line)):
            self._rotate()
            line, mac = seal(record, self._seq, self._prev, self._chain_key)
        self._write(line, mac)

    def _poll_keys(self) -> None:
        """Pick up a key added to the key file (rotation); a key file that became unusable is logged and
        the keys in use stay."""
        now = time.monotonic()
        if now - self._key_checked < KEY_POLL_SECONDS:
            return
        self._key_checked = now
        current = signature(self.key_path)
        if current == self._key_signature:
            return
        self._key_signature = current
        try:
            keys = read_keys(self.key_path)
        except AuditKeyError as exc:
            log.error("access log: the key file changed and cannot be used (%s); records stay sealed with key %s",
                      exc, self._chain_key.id if self._chain_key else "?")
            return
        if self._chain_key is not None and keys.get(self._chain_key.id) is None:
            log.error("access log: the key file no longer holds key %s, which sealed the last record; keys are "
                      "rotated by adding one (`tcpmesh audit rotate-key`), not by replacing the file — records stay "
                      "sealed with key %s", self._chain_key.id, self._chain_key.id)
            return
        self._keys = keys

    def _write(self, line: bytes, mac: str) -> None:
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
        self._prev = mac
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
        if self._pending_break is not None:
            self._append(self._pending_break)
            self._pending_break = None

    def _open_file(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.target)), exist_ok=True)
        self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        status = os.fstat(self._fd)
        self._regular = stat.S_ISREG(status.st_mode)  # not a pipe or device: resume, rotate, mend torn lines
        self._size = status.st_size

    def _resume_chain(self) -> None:
        """Verify the tail of the existing log (this file, or FILE.1 when this one is empty) and continue
        its chain — or, when it is broken, report the break and resume after the last intact record."""
        path = self.target if self._size > 0 else f"{self.target}.1"
        result, lines = _verify_tail(path, self._keys)  # type: ignore[arg-type]
        if lines == 0:
            return
        if path == self.target:
            self._end_torn_line()
        if result.records == 0:
            self._report_break(path, result, None)
            if path == self.target:
                self._rotate_files()  # kept as FILE.1 for the operator; a new chain starts here
            return
        self._seq, self._prev = result.last_seq + 1, result.head  # type: ignore[operator]
        self._chain_key = self._keys.get(result.head_key)  # type: ignore[union-attr]
        if result.breaks:  # what comes before the writer's last break record was reported then
            reported = result.breaks[-1].line
            result.findings = [f for f in result.findings if f.entry.line > reported]
        if result.findings:
            self._report_break(path, result, result.last_seq)
        else:
            log.info("access log: the last %d record(s) of %s verify; continuing the chain at seq %d", result.records,
                     path, self._seq)

    def _report_break(self, path: str, result: Verification, resumed_after: int | None) -> None:
        findings = result.findings or []
        for finding in findings:
            if self._metrics is not None:
                self._metrics.access_log_chain_breaks.labels(finding.kind).inc()
        named = [{"kind": f.kind, "at": f.entry.where, "seq": f.entry.seq, "message": f.message}
                 for f in findings[:MAX_BREAK_FINDINGS]]
        if resumed_after is None:
            message = (f"{path} holds no record sealed by a key of {self.key_path} near its end (first problem: "
                       f"{findings[0].message if findings else 'none readable'}); it is kept as {self.target}.1 and "
                       "a new chain starts")
            if self._metrics is not None and not findings:
                self._metrics.access_log_chain_breaks.labels("invalid").inc()
        else:
            message = (f"the chain of {path} is broken: {'; '.join(f.message for f in findings[:3])}"
                       f"{f' (and {len(findings) - 3} more)' if len(findings) > 3 else ''}; it resumes after seq "
                       f"{resumed_after}, the last record that verified")
        log.error("access log: %s — a break record names it; check the whole log with `tcpmesh audit verify --key "
                  "%s`", message, self.key_path)
        self._pending_break = {"v": RECORD_VERSION, "event": BREAK_EVENT, "time": rfc3339(time.time()),
                               "node": self.node, "file": os.path.basename(path), "resumed_after": resumed_after,
                               "findings": named, "findings_total": len(findings), "message": message}

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
        line, mac = seal(record, self._seq, self._prev, self._chain_key)  # type: ignore[arg-type]
        self._write(line, mac)

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


def _verify_tail(path: str, keys: Keyring) -> tuple[Verification, int]:
    """Verify the last ``TAIL_BYTES`` of ``path`` (whole lines, named by their real line numbers); returns
    the verification and how many lines it read (0: no file or an empty one)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - TAIL_BYTES)
            f.seek(0)
            line = 1
            while f.tell() < start:  # count the lines before the window, for line numbers an operator can find
                line += f.read(min(1 << 20, start - f.tell())).count(b"\n")
            tail = f.read()
    except OSError:
        return Verification(), 0
    pieces = tail.split(b"\n")
    if start > 0:  # the window starts mid-line: that piece belongs to a line before it
        line += 1
        pieces = pieces[1:]
    if pieces and pieces[-1]:
        raws = [p + b"\n" for p in pieces[:-1]] + [pieces[-1]]  # a torn last line stays torn
    else:
        raws = [p + b"\n" for p in pieces[:-1]]
    entries = [parse_line(raw, path, line + i, keys) for i, raw in enumerate(raws)]
    return verify_entries(entries, mid_file=start > 0), len(entries)


def access_log_from_config(config: Any, metrics: Any = None,
                           enrich: Callable[[dict[str, Any]], None] | None = None) -> AccessLog | None:
    """The access log ``config.access_log`` asks for (agent.config.AccessLogConfig); None when ``off``."""
    settings = config.access_log
    if settings.path == "off":
        return None
    return AccessLog(settings.path, key_path=settings.key, node=config.node.name, max_bytes=settings.max_bytes,
                     backups=settings.backups, metrics=metrics, enrich=enrich)
