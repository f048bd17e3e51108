"""Bare aiosmtpd sink for bench/intake.py: accepts everything, answers 250, keeps nothing.

Same SMTP settings as the broker intake (hostname, SIZE, raw bytes, SMTPUTF8) so the ratio
measures what the broker adds, not configuration differences.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session

SIZE_LIMIT = 25 * 1024 * 1024


class Sink:
    """Discard the message; the default handler would print it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok: discarded"


async def serve(host: str, port: int) -> None:
    """Listen until SIGTERM/SIGINT."""
    handler = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.example", data_size_limit=SIZE_LIMIT,
                     decode_data=False, enable_SMTPUTF8=True),
        host=host, port=port,
    )
    print(f"READY {host} {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
