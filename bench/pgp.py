"""OpenPGP throughput: broker.crypto.pgp (own armor, fast CRC-24) vs pgpy's stock armor path.

Both paths sign (Ed25519, SHA-256), compress (ZLIB), encrypt (Cv25519 + AES-256) and armor the
same data with the same keys in the same run; then decrypt, verify and check the plaintext.
Data is half random, half text (``--random``: all random, the worst case for armor).

    .venv/bin/python bench/pgp.py [--rounds 3] [--sizes 10240,1048576]

Target (issue 3): a 1 MB release signed, encrypted and armored in under 0.2 s.
"""

from __future__ import annotations

import argparse
import os
import time

from broker.crypto import pgp


def _data(size: int) -> bytes:
    text = b"Progress note: reading fluency improved; next review in spring.\n"
    half = size // 2
    return os.urandom(half) + (text * (size // len(text) + 1))[: size - half]


def _best(fn, rounds: int):
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="10240,1048576")
    ap.add_argument("--random", action="store_true", help="incompressible data (worst case)")
    args = ap.parse_args()
    sender_priv, sender_pub = pgp.generate_keypair("Broker", "broker@records.example")
    rcpt_priv, rcpt_pub = pgp.generate_keypair("Pat", "pat@family.example")
    rcpt = pgp.load_public_key(rcpt_pub)
    print(f"{'size':>9} {'path':<6} {'sign+enc+armor':>15} {'decrypt+verify':>15} {'armored':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        data = os.urandom(size) if args.random else _data(size)
        t_enc, armored = _best(
            lambda d=data: pgp.sign_and_encrypt(d, sender_priv, rcpt), args.rounds
        )
        t_dec, dec = _best(lambda a=armored: pgp.decrypt(a, rcpt_priv, [sender_pub]), args.rounds)
        assert dec.data == data and dec.signature.status == "good"
        print(f"{size:>9} {'ours':<6} {t_enc:>14.3f}s {t_dec:>14.3f}s {len(armored):>9}")
        s_enc, s_armored = _best(
            lambda d=data: pgp.stock_sign_and_encrypt(d, sender_priv, rcpt_pub), args.rounds
        )
        s_dec, (s_data, ok) = _best(
            lambda a=s_armored: pgp.stock_decrypt(a, rcpt_priv, sender_pub), args.rounds
        )
        assert s_data == data and ok
        # each path reads the other's output: same standard armor
        assert pgp.decrypt(s_armored, rcpt_priv, [sender_pub]).data == data
        print(f"{size:>9} {'stock':<6} {s_enc:>14.3f}s {s_dec:>14.3f}s {len(s_armored):>9}")
        t_crc, _ = _best(lambda d=data: pgp.crc24(d), args.rounds)
        print(f"{size:>9} crc24 alone: {t_crc * 1000:.1f} ms")
    target = 0.2
    print(f"target: 1 MB sign+encrypt+armor < {target} s")


if __name__ == "__main__":
    main()
