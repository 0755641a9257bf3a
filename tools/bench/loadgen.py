"""A small HTTP/1.1 load generator, run as its own process: ``python -m tools.bench.loadgen``.

It opens ``--concurrency`` keep-alive connections to 127.0.0.1 and sends the requests of a
spec file (JSON: ``{"requests": [[method, path, body], ...], "headers": {...}, "cycle": bool}``)
one at a time per connection, each connection taking the next request from a shared cursor.
It stops after the last request (or, with ``cycle``, never runs out) or when ``--duration``
seconds have passed, whichever comes first, and writes its figures as JSON to ``--out``.

Responses are parsed by hand on a raw ``asyncio.Protocol`` (uvloop when installed), which keeps
the generator's own cost per request far below the servers' it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from tools.procs import percentile

__all__ = ["main"]

CONNECT_TIMEOUT = 10.0
# A request with no answer after this long counts as an error and its connection is dropped.
REQUEST_TIMEOUT = 30.0


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends raw bytes and waits for one response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._need: int | None = None
        self._status = 0
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._waiter is not None and not self._waiter.done():
            if self._need is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self._buffer[:end]).lower()
                self._status = int(head[9:12])
                length = 0
                marker = head.find(b"\r\ncontent-length:")
                if marker >= 0:
                    stop = head.find(b"\r\n", marker + 2)
                    length = int(head[marker + 17 : stop if stop >= 0 else None].strip())
                elif b"transfer-encoding: chunked" in head:
                    self._waiter.set_exception(ValueError("chunked responses are not supported"))
                    return
                self._need = end + 4 + length
            if len(self._buffer) < self._need:
                return
            del self._buffer[: self._need]
            self._need = None
            self._waiter.set_result(self._status)

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await asyncio.wait_for(self._waiter, REQUEST_TIMEOUT)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _build(host: str, port: int, requests: list[list[str]], headers: dict[str, str]) -> list[bytes]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    built = []
    for method, path, body in requests:
        payload = body.encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        built.append(head.encode() + payload)
    return built


async def _run(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    raw = _build(args.host, args.port, spec["requests"], spec.get("headers", {}))
    cycle = bool(spec.get("cycle", False))
    limit = args.max_requests if args.max_requests > 0 else (10**12 if cycle else len(raw))
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Connection, args.host, args.port), CONNECT_TIMEOUT
        )
        return proto

    connections = [await connect() for _ in range(args.concurrency)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    cursor = 0
    started = time.perf_counter()
    deadline = started + args.duration
    last_done = started

    async def worker(conn: _Connection) -> None:
        nonlocal cursor, errors, last_done
        while True:
            now = time.perf_counter()
            if cursor >= limit or now >= deadline:
                break
            index = cursor
            cursor += 1
            if args.rate > 0:  # paced: request i starts no earlier than i / rate seconds in
                await asyncio.sleep(max(0.0, started + index / args.rate - now))
            t0 = time.perf_counter()
            try:
                if conn.closed:
                    conn = await connect()
                    t0 = time.perf_counter()
                status = await conn.request(raw[index % len(raw)])
            except (ConnectionError, OSError, ValueError, TimeoutError):
                errors += 1
                conn.close()
                continue
            t1 = time.perf_counter()
            last_done = t1
            latencies.append(t1 - t0)
            key = str(status)
            statuses[key] = statuses.get(key, 0) + 1
            if status not in args.ok_status:
                errors += 1
        conn.close()

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker(c) for c in connections))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = max(last_done - started, 1e-9)
    latencies.sort()
    answered = len(latencies)
    ok = answered - sum(n for s, n in statuses.items() if int(s) not in args.ok_status)
    return {
        "concurrency": args.concurrency,
        "sent": cursor,
        "answered": answered,
        "ok": ok,
        "errors": errors,
        "statuses": statuses,
        "elapsed_s": elapsed,
        "rps": ok / elapsed,
        "p50_ms": _ms(latencies, 50),
        "p90_ms": _ms(latencies, 90),
        "p99_ms": _ms(latencies, 99),
        "max_ms": (latencies[-1] * 1000) if latencies else 0.0,
        "loadgen_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
    }


def _ms(latencies: Sequence[float], q: float) -> float:
    """Percentile ``q`` of ``latencies`` (seconds) in milliseconds; 0.0 when none answered."""
    value = percentile(latencies, q)
    return 0.0 if value is None else value * 1000


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", required=True, help="JSON file of requests")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="hard stop, seconds")
    parser.add_argument("--max-requests", type=int, default=0, help="0: the spec's count")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="requests per second in all; 0: as fast as possible"
    )
    parser.add_argument(
        "--ok-status", type=int, nargs="+", default=[200, 201, 202, 204], help="2xx to accept"
    )
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the load generator only targets this machine (127.0.0.1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvicorn[standard] ships uvloop
        runner = asyncio.Runner()
    with runner:
        result = runner.run(_run(args, json.loads(Path(args.spec).read_text())))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
