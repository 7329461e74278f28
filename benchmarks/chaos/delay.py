"""A TCP proxy that delays every byte by a fixed time each way: etcd across regions.

This kernel has no ``tc netem``, so the chaos benchmark adds latency in user space: one
proxy per producer host and etcd member, in the host's namespace, listening on loopback
and forwarding to the member. Order is kept per direction; a closed side closes the other
after the delayed bytes are out. Faults still apply: the proxy's own traffic to etcd goes
over the host's control link, so a cut of that link cuts etcd as before.

    python -m benchmarks.chaos.delay --listen 127.0.0.1:23790 --to 10.X.0.1:2379 --delay 0.025
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*target), timeout=5.0)
        except (TimeoutError, OSError):
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer, delay),
                             _pump(up_reader, writer, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos.delay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    p.add_argument("--to", type=_address, required=True, metavar="HOST:PORT")
    p.add_argument("--delay", type=float, required=True, help="seconds added each way")
    args = p.parse_args(argv)
    asyncio.run(_serve(args.listen, args.to, args.delay))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
