"""The broker's signing key is checked on every use, also when its parse is remembered:
a key that expires while the broker runs stops signing at that moment."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from broker.crypto import pgp


def test_a_signing_key_that_expires_while_in_use_is_refused_from_then_on() -> None:
    private, public = pgp.generate_keypair("Broker", "broker@records.example",
                                           expires=timedelta(seconds=2))
    signature = pgp.sign_detached(b"review request", private)  # parsed and remembered
    assert pgp.verify_detached_any(b"review request", signature.encode(), [public])
    time.sleep(3)
    with pytest.raises(pgp.PGPError, match="expired"):
        pgp.sign_detached(b"review request", private)


def test_a_public_key_is_not_a_signing_key() -> None:
    _, public = pgp.generate_keypair("Broker", "broker@records.example")
    for _ in range(2):  # the refusal is remembered with the parse, and still refused
        with pytest.raises(pgp.PGPError, match="expected a private key"):
            pgp.sign_detached(b"x", public)
