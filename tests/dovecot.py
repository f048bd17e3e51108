"""A private Dovecot IMAP server for tests: ``dovecot`` fixture (skips when not installed).

Everything lives in one temporary directory: the configuration (``dovecot -F -c FILE``),
base_dir, state_dir, the log and the maildirs. Authentication is a static passdb (any user,
password ``secret``); mail belongs to an unprivileged user (nobody when run as root, since
Dovecot refuses uid 0). Plain text login on 127.0.0.1 only, no TLS.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PASSWORD = "secret"
USER = "family"

_CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
default_login_user = {user}
default_internal_user = {user}
{owner_lines}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = 0
mail_location = maildir:{dir}/mail/%n
mail_plugins =
mailbox_list_index = no
passdb {{
  driver = static
  # nodelay: a wrong password is answered at once (tests of refused logins stay fast)
  args = password={password} nodelay=yes
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/mail/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
}}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  chroot =
}}
"""


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dovecot:
    """One Dovecot master process; ``stop``/``start`` keep its mail (server restarts)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.user = USER
        self.password = PASSWORD
        # Not under pytest's tmp_path: that is root-only (0700), and the mail user must
        # reach its maildir.
        self.dir = Path(tempfile.mkdtemp(prefix="broker-dovecot-"))
        os.chmod(self.dir, 0o755)
        if os.getuid() == 0:
            pw = pwd.getpwnam("nobody")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            run_as = "dovenull" if _has_user("dovenull") else "nobody"
            owner_lines = ""
            user = run_as
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            user = pwd.getpwuid(self.uid).pw_name
            owner_lines = f"default_internal_group = {pwd.getpwuid(self.uid).pw_name}"
        (self.dir / "mail").mkdir()
        for sub in ("run", "state"):
            (self.dir / sub).mkdir()
        if os.getuid() == 0:
            os.chown(self.dir / "mail", self.uid, self.gid)
        self.config = self.dir / "dovecot.conf"
        self.config.write_text(_CONFIG.format(
            dir=self.dir, port=self.port, uid=self.uid, gid=self.gid, password=PASSWORD,
            user=user, owner_lines=owner_lines,
        ))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"dovecot exited at start: {err}\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                (self.host, self.port), timeout=1
            ) as sock:
                if sock.recv(100).startswith(b"* OK"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not answer on port {self.port}\n{self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # Dovecot's master leaves running sessions (imap processes) behind when it stops,
        # or waits for them; the server going away drops its connections, so these go
        # at once, by their ids.
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Its children (imap, auth) go with the master; wait until the port is free.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                return
            time.sleep(0.05)

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self):  # -> imapclient.IMAPClient
        """A logged-in client playing the outside world (APPEND, checks)."""
        from imapclient import IMAPClient

        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=30)
        c.login(self.user, self.password)
        return c

    def append(self, data: bytes, folder: str = "INBOX") -> None:
        c = self.client()
        try:
            c.append(folder, data)
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def count(self, folder: str) -> int:
        c = self.client()
        try:
            if not c.folder_exists(folder):
                return 0
            c.select_folder(folder, readonly=True)
            return len(c.search("UNDELETED"))
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (from /proc), deepest last."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A running private Dovecot, stopped and removed afterwards."""
    binary = dovecot_binary()
    if binary is None:
        pytest.skip("dovecot is not installed (apt-get install dovecot-imapd)")
    server = Dovecot(binary)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
