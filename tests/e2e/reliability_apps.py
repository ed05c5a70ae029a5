"""Load and fault workloads the reliability tests run inside lab pods
(``python tests/e2e/reliability_apps.py <role> ...``). Plain asyncio sockets (uvloop when present),
no tcpmesh code: they play applications. Every client prints one JSON line at the end.

    server --port P --digest-port Q    echo on P; on Q read to EOF, answer "<sha256 hex> <length>\\n"
    hold   --connect IP:P --count N --interval S
           open N connections (200 connects in flight at a time); each exchanges a 16-byte message,
           then again every S seconds (spread over the interval) until stdin closes. Prints
           {"held": ...} once all are open, and the totals at the end.
    crr    --connect IP:P --count N --parallel C
           N short connections, C at a time: connect, send 16 bytes, read the echo, close.
    bulk   --connect IP:Q --flows F --bytes B
           F parallel flows of B random bytes each; each compares the far end's sha256 with its own.
    stream --connect IP:P --interval S
           one connection echoing a 1 KiB message every S seconds until stdin closes or the
           connection fails; reports when it failed and how (the fault tests time resets with it).
    probe  --connect IP:P --timeout T
           one connection: send 16 bytes, read the echo; reports "ok" or the error, and how long it took.
    idle   --connect IP:P --timeout T
           one connection that sends nothing; reports how and when the other side ended it.

Raises its own RLIMIT_NOFILE soft limit to the hard limit first (thousands of sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import resource
import sys
import threading
import time

MESSAGE = 16
CONNECT_WINDOW = 200
BULK_CHUNK = 256 * 1024


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def error_name(exc: BaseException) -> str:
    return type(exc).__name__ if not getattr(exc, "errno", None) else f"{type(exc).__name__}({exc.errno})"


async def stdin_closed() -> None:
    """Returns once stdin is closed. A daemon thread reads it: asyncio.run would wait for an executor's."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def read() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=read, daemon=True).start()
    await done


# ------------------------------------------------------------------------------------------ server

async def serve(port: int, digest_port: int) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h, total = hashlib.sha256(), 0
        try:
            while data := await reader.read(BULK_CHUNK):
                h.update(data)
                total += len(data)
            writer.write(f"{h.hexdigest()} {total}\n".encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096),
               await asyncio.start_server(digest, "0.0.0.0", digest_port, backlog=4096)]
    print(json.dumps({"listening": [port, digest_port], "pid": os.getpid()}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# -------------------------------------------------------------------------------------------- hold

async def hold(target: tuple[str, int], count: int, interval: float) -> dict:
    window = asyncio.Semaphore(CONNECT_WINDOW)
    stop = asyncio.Event()
    totals = {"opened": 0, "open_failed": 0, "exchanges": 0, "bad_exchanges": 0, "lost": 0}
    errors: dict[str, int] = {}
    all_open = asyncio.Event()
    pending = [count]

    def opened_one() -> None:
        pending[0] -= 1
        if pending[0] == 0:
            all_open.set()

    async def exchange(reader, writer, tag: bytes) -> None:
        writer.write(tag)
        await writer.drain()
        if await asyncio.wait_for(reader.readexactly(MESSAGE), 30) != tag:
            totals["bad_exchanges"] += 1
        else:
            totals["exchanges"] += 1

    async def one(index: int) -> None:
        tag = index.to_bytes(8, "big") * 2
        try:
            async with window:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 30)
                await exchange(reader, writer, tag)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            totals["open_failed"] += 1
            errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
            opened_one()
            return
        totals["opened"] += 1
        opened_one()
        try:
            await asyncio.sleep(random.random() * interval)  # spread the periodic echoes over the interval
            while not stop.is_set():
                await exchange(reader, writer, tag)
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, RuntimeError) as exc:
            totals["lost"] += 1
            errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
        finally:
            writer.close()

    started = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    await all_open.wait()
    print(json.dumps({"held": totals["opened"], "failed": totals["open_failed"],
                      "open_seconds": round(time.monotonic() - started, 3)}), flush=True)
    await stdin_closed()
    stop.set()
    await asyncio.gather(*tasks)
    return {**totals, "errors": errors, "seconds": round(time.monotonic() - started, 3)}


# --------------------------------------------------------------------------------------------- crr

async def crr(target: tuple[str, int], count: int, parallel: int) -> dict:
    totals = {"completed": 0, "failed": 0}
    errors: dict[str, int] = {}
    next_index = [0]
    latencies: list[float] = []

    async def worker() -> None:
        while next_index[0] < count:
            index = next_index[0]
            next_index[0] += 1
            tag = index.to_bytes(16, "big")
            started = time.monotonic()
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 30)
                writer.write(tag)
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(MESSAGE), 30)
                writer.write_eof()
                await asyncio.wait_for(reader.read(), 30)  # the server's FIN: a clean close on both sides
                if got != tag:
                    raise ValueError("echo mismatch")
                totals["completed"] += 1
                if index % 97 == 0:
                    latencies.append(time.monotonic() - started)
            except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                totals["failed"] += 1
                errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
            finally:
                if writer is not None:
                    writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    seconds = time.monotonic() - started
    latencies.sort()
    return {**totals, "errors": errors, "seconds": round(seconds, 3), "rate": round(count / seconds, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None}


def crr_sequential(target: tuple[str, int], count: int) -> dict:
    """``crr`` with one connection at a time, on blocking sockets (the client's own cost stays small)."""
    import socket

    totals = {"completed": 0, "failed": 0}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    started = time.monotonic()
    for index in range(count):
        tag = index.to_bytes(16, "big")
        begun = time.monotonic()
        try:
            with socket.create_connection(target, timeout=30) as sock:
                sock.sendall(tag)
                got = b""
                while len(got) < MESSAGE:
                    chunk = sock.recv(MESSAGE - len(got))
                    if not chunk:
                        break
                    got += chunk
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # the server's FIN: a clean close on both sides
                    pass
            if got != tag:
                raise ValueError("echo mismatch")
            totals["completed"] += 1
            if index % 97 == 0:
                latencies.append(time.monotonic() - begun)
        except (OSError, ValueError) as exc:
            totals["failed"] += 1
            errors[error_name(exc)] = errors.get(error_name(exc), 0) + 1
    seconds = time.monotonic() - started
    latencies.sort()
    return {**totals, "errors": errors, "seconds": round(seconds, 3), "rate": round(count / seconds, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None}


# -------------------------------------------------------------------------------------------- bulk

async def bulk(target: tuple[str, int], flows: int, size: int) -> dict:
    results: list[dict] = []

    async def flow(index: int) -> None:
        h, sent = hashlib.sha256(), 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 30)
            while sent < size:
                chunk = os.urandom(min(BULK_CHUNK, size - sent))
                h.update(chunk)
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            writer.write_eof()
            reply = (await asyncio.wait_for(reader.read(), 120)).decode().split()
            writer.close()
            results.append({"ok": reply == [h.hexdigest(), str(size)], "reply": reply[:2]})
        except (OSError, asyncio.TimeoutError) as exc:
            results.append({"ok": False, "error": error_name(exc), "sent": sent})

    started = time.monotonic()
    await asyncio.gather(*(flow(i) for i in range(flows)))
    seconds = time.monotonic() - started
    return {"flows": flows, "matched": sum(r["ok"] for r in results), "bytes": flows * size,
            "seconds": round(seconds, 3), "mbit_s": round(flows * size * 8 / seconds / 1e6, 1),
            "failures": [r for r in results if not r["ok"]][:5]}


# ------------------------------------------------------------------------------------------ stream

async def stream(target: tuple[str, int], interval: float) -> dict:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 30)
    print(json.dumps({"connected": time.time()}), flush=True)
    closed = asyncio.ensure_future(stdin_closed())
    exchanges, message = 0, os.urandom(1024)
    last_ok = time.time()
    try:
        while not closed.done():
            writer.write(message)
            await writer.drain()
            echoed = await reader.readexactly(len(message))  # no timeout: a hang is what the test looks for
            if echoed != message:
                return {"error": "mismatch", "exchanges": exchanges}
            exchanges += 1
            last_ok = time.time()
            await asyncio.sleep(interval)
    except (OSError, asyncio.IncompleteReadError, RuntimeError) as exc:  # uvloop: RuntimeError writing to a closed one
        return {"error": error_name(exc), "failed_at": time.time(), "last_ok": last_ok, "exchanges": exchanges}
    writer.close()
    return {"error": None, "exchanges": exchanges, "last_ok": last_ok}


async def probe(target: tuple[str, int], timeout: float) -> dict:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), timeout)
        writer.write(b"p" * MESSAGE)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(MESSAGE), timeout)
        writer.close()
        result = "ok" if echoed == b"p" * MESSAGE else "mismatch"
    except asyncio.TimeoutError:
        result = "hung"
    except (OSError, asyncio.IncompleteReadError) as exc:
        result = error_name(exc)
    return {"result": result, "seconds": round(time.monotonic() - started, 3)}


async def idle(target: tuple[str, int], timeout: float) -> dict:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), 30)
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
        result = "eof" if not data else "data"
    except asyncio.TimeoutError:
        result = "still open"
    except OSError as exc:
        result = error_name(exc)
    writer.close()
    return {"result": result, "seconds": round(time.monotonic() - started, 3)}


def main() -> int:
    raise_nofile()
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--digest-port", type=int, required=True)
    p = sub.add_parser("hold")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--interval", type=float, default=5.0)
    p = sub.add_parser("crr")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--parallel", type=int, default=1)
    p = sub.add_parser("bulk")
    p.add_argument("--connect", required=True)
    p.add_argument("--flows", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p = sub.add_parser("stream")
    p.add_argument("--connect", required=True)
    p.add_argument("--interval", type=float, default=0.05)
    for role in ("probe", "idle"):
        p = sub.add_parser(role)
        p.add_argument("--connect", required=True)
        p.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if args.role == "server":
        asyncio.run(serve(args.port, args.digest_port))
        return 0
    target = address(args.connect)
    if args.role == "hold":
        result = asyncio.run(hold(target, args.count, args.interval))
    elif args.role == "crr" and args.parallel == 1:
        result = crr_sequential(target, args.count)
    elif args.role == "crr":
        result = asyncio.run(crr(target, args.count, args.parallel))
    elif args.role == "bulk":
        result = asyncio.run(bulk(target, args.flows, args.bytes))
    elif args.role == "probe":
        result = asyncio.run(probe(target, args.timeout))
    elif args.role == "idle":
        result = asyncio.run(idle(target, args.timeout))
    else:
        result = asyncio.run(stream(target, args.interval))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
