"""A private Postfix for tests: its own config, queue and log in a temporary directory.

It leaves the system's Postfix alone (which may not even be running): ``postfix -c DIR``
and ``master -c DIR`` read only DIR/main.cf and DIR/master.cf. It listens for SMTP on
127.0.0.1:<free port>, relays one domain (records.example) and hands that domain to the
broker's intake with the transport map entry the test asks for (``smtp:[127.0.0.1]:PORT``
or ``lmtp:inet:127.0.0.1:PORT``), as deploy/postfix/ does in production.

The master runs in the foreground as the test's own child (``master -s``: ``postfix
start-fg`` would exec it only as PID 1), so the test owns its process id and stops it with
SIGTERM. Needs root (the master binds its port and drops to mail_owner = postfix itself).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
DOMAIN = "records.example"


def _daemon_directory() -> str:
    try:
        out = subprocess.run([POSTCONF, "-dh", "daemon_directory"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "/usr/lib/postfix/sbin"
    return out or "/usr/lib/postfix/sbin"


def unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None if it can (worth trying)."""
    if not (os.path.exists(POSTFIX) and os.access(POSTFIX, os.X_OK)):
        return "postfix is not installed (apt-get install postfix)"
    if not os.path.exists("/etc/postfix/master.cf"):
        return "postfix is installed but /etc/postfix/master.cf is missing"
    if os.geteuid() != 0:
        return "a private Postfix master needs root"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "no `postfix` user (mail_owner) on this system"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def master_cf(system_master_cf: str, port: int) -> str:
    """The system's master.cf with smtpd on 127.0.0.1:``port`` instead of port 25, every
    service out of the chroot (column 5 = n: the temp dir has no chroot jail), and the
    postlog service present (maillog_file needs it)."""
    out: list[str] = []
    for line in system_master_cf.splitlines():
        fields = line.split()
        if line[:1].isspace() or line.startswith("#") or len(fields) < 8:
            out.append(line)
            continue
        name, kind = fields[0], fields[1]
        if kind == "inet" and name in ("smtp", "25"):
            name = f"127.0.0.1:{port}"
        elif kind == "inet":  # submission, smtps, ... if enabled: not in a test
            out.append("#" + line)
            continue
        fields[0], fields[4] = name, "n"
        out.append("  ".join(fields[:8]) + (" " + " ".join(fields[8:]) if fields[8:] else ""))
    if not any(re.match(r"postlog\s+unix-dgram\s", line) for line in out):
        out.append("postlog   unix-dgram n  -       n       -       1       postlogd")
    return "\n".join(out) + "\n"


def main_cf(root: Path, *, size_limit: int) -> str:
    """Every setting this test instance depends on; the rest are Postfix's defaults."""
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery here
alias_maps =
alias_database =
relay_domains = {DOMAIN}
transport_maps = texthash:{root}/conf/transport
message_size_limit = {size_limit}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = none
lmtp_tls_security_level = none
smtp_dns_support_level = disabled
maillog_file = {root}/log/maillog
maillog_file_prefixes = {root}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
"""


def with_overrides(main: str, extra: str) -> str:
    """``main`` without the parameters ``extra`` sets, then ``extra`` (Postfix warns about
    a parameter set twice)."""
    if not extra.strip():
        return main
    keys = set(re.findall(r"(?m)^([A-Za-z0-9_]+)\s*=", extra))
    kept = [line for line in main.splitlines()
            if (m := re.match(r"([A-Za-z0-9_]+)\s*=", line)) is None or m.group(1) not in keys]
    return "\n".join(kept) + "\n" + extra.rstrip("\n") + "\n"


class PrivatePostfix:
    """``with PrivatePostfix(next_hop) as pf: pf.send(...)``; ``pf.log()`` for failures."""

    def __init__(self, next_hop: str, *, size_limit: int = 25 * 1024 * 1024,
                 extra_main: str = "") -> None:
        self.next_hop = next_hop  # e.g. "smtp:[127.0.0.1]:2525" or "lmtp:inet:127.0.0.1:2525"
        self.size_limit = size_limit
        # main.cf settings replacing (or adding to) the test's own, e.g. a deploy snippet.
        self.extra_main = extra_main
        # Short and outside pytest's tree: the queue's sockets live under it.
        self.root = Path(tempfile.mkdtemp(prefix="pf-"))
        self.conf = self.root / "conf"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self) -> None:
        root, conf = self.root, self.conf
        # Root-owned and not group/other writable, as `postfix check` wants; the queue
        # outside the config directory (its check walks that looking for non-root files).
        os.chmod(root, 0o755)
        for sub in ("conf", "queue", "log"):
            (root / sub).mkdir(mode=0o755)
        (conf / "main.cf").write_text(
            with_overrides(main_cf(root, size_limit=self.size_limit), self.extra_main))
        system = Path("/etc/postfix/master.cf").read_text()
        (conf / "master.cf").write_text(master_cf(system, self.port))
        (conf / "transport").write_text(f"{DOMAIN}  {self.next_hop}\n")

    def _postfix(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self, timeout: float = 15.0) -> None:
        """Configure, check (creates the queue directories), run the master, wait for smtpd.
        Raises RuntimeError with Postfix's own words when it will not come up."""
        self.configure()
        check = self._postfix("check")
        if check.returncode != 0:
            raise RuntimeError(f"postfix -c {self.conf} check failed: "
                               f"{(check.stderr or check.stdout).strip()} {self.log()[-2000:]}")
        master = os.path.join(_daemon_directory(), "master")
        self.proc = subprocess.Popen(
            [master, "-c", str(self.conf), "-s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "MAIL_CONFIG": str(self.conf)},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"postfix master exited ({self.proc.returncode}): "
                                   f"{err.strip()} {self.log()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as sock:
                sock.settimeout(5)
                if sock.recv(512).startswith(b"220"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"postfix smtpd did not answer on 127.0.0.1:{self.port} "
                           f"within {timeout:.0f}s: {self.log()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the master stops its children and exits
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostfix:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        path = self.root / "log" / "maillog"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def send(self, data: bytes, mail_from: str, rcpt: str | list[str]) -> None:
        """Hand a message to Postfix's smtpd, as a family's sender's server would."""
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="mail.clinic.example",
                          timeout=30) as smtp:
            smtp.sendmail(mail_from, [rcpt] if isinstance(rcpt, str) else rcpt, data)

    def wait_log(self, pattern: str, timeout: float = 20.0) -> str:
        """The first maillog line matching ``pattern`` (a regex), waiting for it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(f"no maillog line matching {pattern!r} within "
                                     f"{timeout:.0f}s; maillog:\n{self.log()[-4000:]}")
            time.sleep(0.1)
