"""The SMTP client that hands outbound copies to the configured relay.

One connection is reused for a batch. Failures are sorted into temporary (4xx,
refused, timeout: retry later) and permanent (5xx: give up on this recipient).
"""

from __future__ import annotations

import smtplib
import ssl
from types import TracebackType

from broker.config import RelaySettings


class TemporaryFailure(Exception):
    """Try again later; the copy stays queued."""


class PermanentFailure(Exception):
    """The relay refused this copy for good."""


class RelayClient:
    def __init__(self, settings: RelaySettings, local_hostname: str | None = None) -> None:
        self.settings = settings
        self.local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self) -> smtplib.SMTP:
        cfg = self.settings
        try:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout,
                                local_hostname=self.local_hostname)
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if cfg.username:
                smtp.login(cfg.username, cfg.password)
        except smtplib.SMTPAuthenticationError as exc:
            raise TemporaryFailure(f"relay refused the login: {exc.smtp_code}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise TemporaryFailure(f"cannot reach relay {cfg.host}:{cfg.port}: {exc}") from exc
        return smtp

    def send(self, envelope_from: str, recipient: str, data: bytes) -> None:
        if self._smtp is None:
            self._smtp = self._connect()
        try:
            refused = self._smtp.sendmail(envelope_from, [recipient], data)
        except smtplib.SMTPRecipientsRefused as exc:
            code, msg = exc.recipients.get(recipient, (550, b"refused"))
            raise _classify(code, msg) from exc
        except smtplib.SMTPResponseException as exc:
            self._reset_after_error()
            raise _classify(exc.smtp_code, exc.smtp_error) from exc
        except (TimeoutError, OSError, smtplib.SMTPException) as exc:
            self.close()
            raise TemporaryFailure(f"relay connection failed: {exc}") from exc
        if refused:
            code, msg = refused[recipient]
            raise _classify(code, msg)

    def _reset_after_error(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.close()

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


def _classify(code: int, msg: bytes | str) -> Exception:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    detail = f"{code} {text}".strip()
    if 500 <= code < 600:
        return PermanentFailure(detail)
    return TemporaryFailure(detail)
