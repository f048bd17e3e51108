"""The SMTP client that hands outbound copies to the configured relay.

One RelayClient keeps one connection open and reuses it for every copy, across outbox
rounds (the sender keeps the client); TLS (STARTTLS or implicit) is negotiated and the
login made once per connection, with one ssl.SSLContext per set of trust settings for
the whole process. A connection idle for a while is checked with NOOP before it is used
again, and a broken one is dropped and opened anew on the next copy.

Failures are sorted into temporary (4xx, refused, timeout: retry later) and permanent
(5xx to a copy: give up on this recipient). Failing to open a session at all is
RelayUnavailable (nothing was sent); when the cause is the operator's to fix (an
untrusted certificate, a refused login, a login that would go out unencrypted, a relay
without STARTTLS) it is RelayMisconfigured: still temporary, the copies stay queued.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import smtplib
import ssl
import threading
import time
from types import TracebackType

from broker.config import RelaySettings

log = logging.getLogger(__name__)

# A connection unused for longer than this is probed with NOOP before the next copy
# (relays drop idle sessions; a dead one is reopened instead of failing a copy).
PROBE_AFTER = 2.0
# AUTH mechanisms, in order of preference (both need TLS unless allow_plaintext_auth).
AUTH_MECHANISMS = ("PLAIN", "LOGIN")


class TemporaryFailure(Exception):
    """Try again later; the copy stays queued."""


class PermanentFailure(Exception):
    """The relay refused this copy for good."""


class RelayUnavailable(TemporaryFailure):
    """No session with the relay could be opened; nothing was sent."""


class RelayMisconfigured(RelayUnavailable):
    """The relay cannot be used as configured (certificate, login, TLS): the operator's
    problem, never the recipient's. The copies stay queued until it is fixed."""


_context_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _cached_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def ssl_context(settings: RelaySettings) -> ssl.SSLContext:
    """The one client context for these trust settings (built once: ~20 ms each)."""
    with _context_lock:
        try:
            return _cached_context(settings.verify, settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise RelayMisconfigured(
                f"relay ca_file {settings.ca_file!r} cannot be used: {exc}: "
                "check [relay] ca_file (a PEM bundle of CA certificates)") from exc


class RelayClient:
    def __init__(self, settings: RelaySettings, local_hostname: str | None = None) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None
        self._last_used = 0.0
        self._warned_unverified = False
        # Sessions opened so far (for the log and tests).
        self.connections = 0

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._smtp is not None

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    def _context(self) -> ssl.SSLContext:
        ctx = ssl_context(self.settings)
        if not self.settings.verify and not self._warned_unverified:
            self._warned_unverified = True
            log.warning("relay %s: certificate NOT verified ([relay] verify = false)",
                        self.where)
        return ctx

    def _connect(self) -> smtplib.SMTP:
        cfg = self.settings
        if cfg.username and cfg.tls == "none" and not cfg.allow_plaintext_auth:
            raise RelayMisconfigured(
                f"relay login refused: [relay] username is set but tls = \"none\" would send "
                f"the password to {self.where} unencrypted; set tls = \"starttls\" or "
                "\"implicit\" (or allow_plaintext_auth = true on a network you control)")
        ctx = self._context() if cfg.tls != "none" else None
        smtp: smtplib.SMTP | None = None
        try:
            if cfg.tls == "implicit":
                smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout,
                                        local_hostname=self.local_hostname, context=ctx)
            else:
                smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout,
                                    local_hostname=self.local_hostname)
            if cfg.tls == "starttls":
                self._starttls(smtp, ctx)
            if cfg.username:
                self._login(smtp)
        except BaseException as exc:
            if smtp is not None:
                smtp.close()
            if isinstance(exc, RelayUnavailable):
                raise
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise RelayMisconfigured(
                    f"relay certificate not trusted: {exc.verify_message} ({self.where}); "
                    "check [relay] host, or ca_file for a relay with a private CA") from exc
            if isinstance(exc, ssl.SSLError):
                raise RelayMisconfigured(
                    f"TLS with relay {self.where} failed ({exc.reason or exc}): check "
                    "[relay] tls and port (\"implicit\" is usually 465, \"starttls\" 587)"
                ) from exc
            if isinstance(exc, OSError | smtplib.SMTPException):
                raise RelayUnavailable(f"cannot reach relay {self.where}: {exc}") from exc
            raise
        self.connections += 1
        log.info("relay %s: connected (tls=%s%s)", self.where, cfg.tls,
                 ", logged in" if cfg.username else "")
        return smtp

    def _starttls(self, smtp: smtplib.SMTP, ctx: ssl.SSLContext | None) -> None:
        smtp.ehlo()
        if not smtp.has_extn("starttls"):
            raise RelayMisconfigured(
                f"relay {self.where} does not offer STARTTLS: check [relay] tls and port")
        try:
            smtp.starttls(context=ctx)
        except smtplib.SMTPResponseException as exc:
            raise RelayUnavailable(f"relay {self.where} refused STARTTLS "
                                   f"({_detail(exc.smtp_code, exc.smtp_error)})") from exc

    def _login(self, smtp: smtplib.SMTP) -> None:
        cfg = self.settings
        try:
            smtp.ehlo_or_helo_if_needed()
            if not smtp.has_extn("auth"):
                raise smtplib.SMTPNotSupportedError("no AUTH")
            offered = smtp.esmtp_features["auth"].upper().split()
            mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
            if mechanism is None:
                raise RelayMisconfigured(
                    f"relay {self.where} offers AUTH {' '.join(offered) or '(nothing)'}, "
                    f"none of {', '.join(AUTH_MECHANISMS)}")
            # One mechanism, one attempt (smtplib's login() would try each offered one
            # with a wrong password, twice the strikes against the account).
            smtp.user, smtp.password = cfg.username, cfg.password
            smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        except smtplib.SMTPAuthenticationError as exc:
            detail = _detail(exc.smtp_code, exc.smtp_error)
            if 400 <= exc.smtp_code < 500:
                raise RelayUnavailable(f"relay login failed for now ({detail})") from exc
            raise RelayMisconfigured(
                f"relay refused the login ({detail}): check [relay] username/password"
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise RelayMisconfigured(
                f"relay {self.where} does not offer AUTH on this connection: check [relay] "
                "tls, port and username") from exc

    def _session(self) -> smtplib.SMTP:
        """The open session, checked if it has idled; a new one if there is none."""
        if self._smtp is not None and time.monotonic() - self._last_used > PROBE_AFTER:
            try:
                code, _ = self._smtp.noop()
                if code != 250:
                    raise smtplib.SMTPServerDisconnected(f"NOOP answered {code}")
            except (OSError, smtplib.SMTPException):
                log.info("relay %s: idle connection gone; reconnecting", self.where)
                self.drop()
        if self._smtp is None:
            self._smtp = self._connect()
        return self._smtp

    def send(self, envelope_from: str, recipient: str, data: bytes) -> None:
        smtp = self._session()
        try:
            refused = smtp.sendmail(envelope_from, [recipient], data)
        except smtplib.SMTPRecipientsRefused as exc:
            self._last_used = time.monotonic()
            code, msg = exc.recipients.get(recipient, (550, b"refused"))
            raise _classify(code, msg) from exc
        except smtplib.SMTPServerDisconnected as exc:
            self.drop()
            raise TemporaryFailure(f"relay connection lost: {exc}") from exc
        except smtplib.SMTPSenderRefused as exc:
            self._reset_after_error()
            if _needs_operator(exc.smtp_code, exc.smtp_error):
                raise RelayMisconfigured(
                    f"relay refused the sender ({_detail(exc.smtp_code, exc.smtp_error)}): "
                    "check [relay] username/password and that the relay lets the broker "
                    "send as its domain") from exc
            raise _classify(exc.smtp_code, exc.smtp_error) from exc
        except smtplib.SMTPResponseException as exc:
            self._reset_after_error()
            raise _classify(exc.smtp_code, exc.smtp_error) from exc
        except (OSError, smtplib.SMTPException) as exc:
            self.drop()
            raise TemporaryFailure(f"relay connection failed: {exc}") from exc
        self._last_used = time.monotonic()
        if refused:
            code, msg = refused[recipient]
            raise _classify(code, msg)

    def _reset_after_error(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
                self._last_used = time.monotonic()
        except (OSError, smtplib.SMTPException):
            self.drop()

    def drop(self) -> None:
        """Forget a broken connection without talking to it."""
        if self._smtp is not None:
            with contextlib.suppress(OSError):
                self._smtp.close()
            self._smtp = None

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


def _detail(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return f"{code} {text}".strip()


def _needs_operator(code: int, msg: bytes | str) -> bool:
    """A refusal of the broker itself (authentication required, sender not permitted:
    530, 5.7.x), not of one copy."""
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return code == 530 or (500 <= code < 600 and text.lstrip().startswith("5.7."))


def _classify(code: int, msg: bytes | str) -> Exception:
    detail = _detail(code, msg)
    if 500 <= code < 600:
        return PermanentFailure(detail)
    return TemporaryFailure(detail)
