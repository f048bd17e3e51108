"""Outbound relay throughput: one persistent TLS + AUTH connection vs a new connection (and a
new ssl context) per message, measured in the same run.

A local aiosmtpd relay (STARTTLS required, or implicit TLS; AUTH required; discards what it
is given) runs as its own subprocess with a throwaway trustme CA. The client is the broker's
RelayClient:

  persistent   one RelayClient for every message: one context, one connection, one TLS
               handshake, one login (what OutboxSender does now, across rounds too)
  per-message  a new RelayClient per message with the context cache cleared: context, TCP
               connection, TLS handshake, AUTH, message, QUIT each time

The two are interleaved over several rounds (order alternating) so machine drift hits both.

    .venv/bin/python bench/relay.py [--count 300] [--rounds 3] [--size 10240] [--tls starttls]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

USER = "bench@records.example"
PASSWORD = "bench-password"


# -- the relay (subprocess) ----------------------------------------------------------------


def serve(tls: str, cert: str, key: str) -> None:
    import ssl

    from aiosmtpd.smtp import SMTP, AuthResult

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    class Discard:
        async def handle_DATA(self, server, session, envelope) -> str:
            return "250 2.0.0 Ok: discarded"

    def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    def factory() -> SMTP:
        kwargs: dict = {"authenticator": authenticate, "auth_required": True,
                        "hostname": "relay.bench", "decode_data": False}
        if tls == "starttls":
            kwargs.update(tls_context=ctx, require_starttls=True)
        else:
            kwargs.update(auth_require_tls=False)  # already encrypted from the first byte
        return SMTP(Discard(), **kwargs)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            factory, host="127.0.0.1", port=0, ssl=ctx if tls == "implicit" else None)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    import logging
    import warnings

    logging.getLogger("mail.log").setLevel(logging.ERROR)  # one deprecation line per login
    warnings.simplefilter("ignore")  # aiosmtpd: "AUTH without TLS" (implicit TLS is TLS)
    asyncio.run(main())


# -- the client ----------------------------------------------------------------------------


def message(size: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sam's records <sam@records.example>"
    msg["To"] = "park@school.example"
    msg["Subject"] = "bench"
    msg["Message-ID"] = make_msgid(domain="records.example")
    msg.set_content(("x" * 76 + "\n") * max(1, size // 77))
    from email import policy

    return msg.as_bytes(policy=policy.SMTP)


def run_persistent(settings, data: bytes, count: int) -> float:
    from broker.release.relay import RelayClient

    start = time.perf_counter()
    with RelayClient(settings, "records.example") as client:
        for n in range(count):
            client.send(f"bounces+{n}@records.example", "park@school.example", data)
        assert client.connections == 1
    return count / (time.perf_counter() - start)


def run_per_message(settings, data: bytes, count: int) -> float:
    from broker.release import relay

    start = time.perf_counter()
    for n in range(count):
        relay._cached_context.cache_clear()  # a new context each time, as before
        with relay.RelayClient(settings, "records.example") as client:
            client.send(f"bounces+{n}@records.example", "park@school.example", data)
    return count / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300, help="messages per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=10240, help="message size in bytes")
    ap.add_argument("--tls", choices=("starttls", "implicit"), default="starttls")
    ap.add_argument("--serve", nargs=3, metavar=("TLS", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0

    import trustme

    from broker.config import RelaySettings

    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        ca_file, cert, key = (os.path.join(tmp, n) for n in ("ca.pem", "cert.pem", "key.pem"))
        ca.cert_pem.write_to_path(ca_file)
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", args.tls, cert, key],
            stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY "):
                raise SystemExit(f"relay did not start: {line!r}")
            port = int(line.split()[1])
            settings = RelaySettings(host="127.0.0.1", port=port, tls=args.tls,
                                     ca_file=ca_file, username=USER, password=PASSWORD,
                                     timeout=30.0)
            data = message(args.size)
            run_persistent(settings, data, 20)  # warm up both paths
            run_per_message(settings, data, 5)
            persistent: list[float] = []
            per_message: list[float] = []
            for r in range(args.rounds):
                order = [(run_persistent, persistent), (run_per_message, per_message)]
                for fn, out in order if r % 2 == 0 else order[::-1]:
                    out.append(fn(settings, data, args.count))
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    p, m = statistics.median(persistent), statistics.median(per_message)
    print(f"relay {args.tls} + AUTH, {len(data)} byte messages, {args.count} per mode x "
          f"{args.rounds} rounds (median msg/s; rounds: persistent "
          f"{', '.join(f'{x:.0f}' for x in persistent)}; per-message "
          f"{', '.join(f'{x:.0f}' for x in per_message)})")
    print(f"  persistent connection:         {p:8.1f} msg/s")
    print(f"  new connection + context each: {m:8.1f} msg/s")
    print(f"  ratio persistent / per-message: {p / m:.1f}x")
    print(f"  (client machine: {socket.gethostname()}, python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
