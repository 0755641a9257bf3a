"""A fast static file server for the download benchmark: ``python -m tools.bench.fileserver``.

It answers ``GET /NAME`` with the file NAME of ``--dir`` (``Content-Length`` set) using
``sendfile(2)`` through asyncio's selector loop, so the server costs almost nothing and the
benchmark measures the client. Keep-alive; ``HEAD`` is answered too. 127.0.0.1 only; it exits
after ``--lifetime`` seconds whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _file_for(root: Path, target: bytes) -> Path | None:
    name = target.split(b"?", 1)[0].lstrip(b"/").decode(errors="replace")
    if not name or "/" in name or name.startswith("."):
        return None
    path = root / name
    return path if path.is_file() else None


async def _serve(root: Path, port: int, lifetime: float) -> None:
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                method, target = request.split(b" ", 2)[:2]
                path = _file_for(root, target)
                if path is None:
                    writer.write(NOT_FOUND)
                    await writer.drain()
                    continue
                writer.write(
                    (
                        "HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n"
                        f"Content-Length: {path.stat().st_size}\r\n\r\n"
                    ).encode()
                )
                await writer.drain()
                if method == b"GET":
                    with path.open("rb") as fh:
                        await loop.sendfile(writer.transport, fh)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.serve_forever(), lifetime)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.fileserver")
    parser.add_argument("--dir", required=True, type=Path, help="the files to serve")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--lifetime", type=float, default=900.0, help="exit after this long")
    args = parser.parse_args(argv)
    # The default selector loop: its transports support os.sendfile (uvloop's do not).
    asyncio.run(_serve(args.dir, args.port, args.lifetime))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
