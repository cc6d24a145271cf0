"""The system ``ssh`` client, driven with an ephemeral key and a certificate the broker had signed.

The private key is made in memory for one session (ed25519) and written only to a 0600 file in a private
0700 directory, on a memory file system when there is one (``/dev/shm``, ``$XDG_RUNTIME_DIR``); the
directory is removed when the session ends. A process killed outright (SIGKILL, power loss on a disk-backed
``$XDG_RUNTIME_DIR``) cannot remove it: the directory's name carries the owner's pid, and the next session's
:func:`key_files` removes the directories of owners that are gone.

``ssh`` runs with its own option set (``-F /dev/null``): host key checking strict against the known_hosts
lines the broker sent, no agent, no passwords, no prompts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcigate.errors import UsageError
from pcigate.models import SshCredentials
from pcigate.net import is_loopback

ENV_SSH = "PCIGATE_SSH"
STRIPPED_ENV = ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "DISPLAY")


@dataclass(frozen=True)
class EphemeralKey:
    private_openssh: bytes = b""
    public: str = ""

    @classmethod
    def generate(cls) -> EphemeralKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(private_openssh=private, public=public.decode())

    def __repr__(self) -> str:  # never show the private key
        return f"EphemeralKey(public={self.public!r})"


@dataclass(frozen=True)
class KeyFiles:
    directory: Path
    identity: Path
    certificate: Path
    known_hosts: Path


@dataclass(frozen=True)
class Forward:
    """``-L [127.0.0.1:]LPORT:HOST:PORT``: a loopback port here to HOST:PORT as the target sees it."""

    local_port: int
    host: str
    port: int

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.local_port}:{self.host}:{self.port}"


_HOST = r"(\[[^\]]+\]|[^:\[\]]+)"
_FORWARD = re.compile(rf"^(?:{_HOST}:)?([0-9]{{1,5}}):{_HOST}:([0-9]{{1,5}})$")


def parse_forward(spec: str) -> Forward:
    m = _FORWARD.match(spec)
    if m is None:
        raise UsageError(f"-L {spec}: expected [127.0.0.1:]LOCAL_PORT:HOST:PORT")
    bind, lport, host, port = m.groups()
    if bind is not None and not is_loopback(bind.strip("[]")):
        raise UsageError(f"-L {spec}: the local end listens on loopback only (127.0.0.1)")
    if not (0 < int(lport) < 65536 and 0 < int(port) < 65536):
        raise UsageError(f"-L {spec}: ports are 1-65535")
    return Forward(int(lport), host.strip("[]"), int(port))


def resolve_ssh() -> str:
    binary = os.environ.get(ENV_SSH) or "ssh"
    found = shutil.which(binary)
    if found is None:
        raise UsageError(f"cannot find the ssh program ({binary})",
                         hint="install the OpenSSH client or set PCIGATE_SSH to its path")
    return found


def _private_dir() -> str | None:
    # memory file systems first: the key never reaches a disk; mkdtemp makes a private 0700 directory
    for base in ("/dev/shm", os.environ.get("XDG_RUNTIME_DIR") or ""):  # noqa: S108
        if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return base
    return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


_KEY_DIR_PREFIX = "pcigate-ssh-"
_KEY_DIR = re.compile(rf"^{_KEY_DIR_PREFIX}([0-9]+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process (the pid was reused): not ours to judge
    return True


def sweep_stale_key_dirs(base: str | None) -> list[Path]:
    """Remove key directories in ``base`` left by pcigate processes that no longer exist (killed before they
    could clean up); only this user's, and only those whose owner pid is not running. Returns what it
    removed."""
    if base is None:
        return []
    removed: list[Path] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        m = _KEY_DIR.match(entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or _alive(int(m.group(1))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def key_files(key: EphemeralKey, creds: SshCredentials) -> Iterator[KeyFiles]:
    """The key, its certificate and the host's known_hosts lines as 0600 files in a private directory,
    removed (with the directory) however the block ends."""
    base = _private_dir()
    sweep_stale_key_dirs(base)
    directory = Path(tempfile.mkdtemp(prefix=f"{_KEY_DIR_PREFIX}{os.getpid()}-", dir=base))
    files = KeyFiles(directory, directory / "id_ed25519", directory / "id_ed25519-cert.pub",
                     directory / "known_hosts")
    try:
        _write_private(files.identity, key.private_openssh)
        _write_private(files.certificate, creds.certificate.encode() + b"\n")
        _write_private(files.known_hosts, "".join(line + "\n" for line in creds.known_hosts).encode())
        yield files
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ssh_argv(binary: str, creds: SshCredentials, files: KeyFiles, *, tty: bool, command: Sequence[str],
             forwards: Sequence[Forward] = ()) -> list[str]:
    argv = [
        binary, "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"IdentityFile={files.identity}",
        "-o", f"CertificateFile={files.certificate}",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={files.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ServerAliveInterval=15",
        "-o", "LogLevel=ERROR",
        "-p", str(creds.port),
        "-l", creds.principal,
    ]
    if forwards:
        argv += ["-N", "-o", "ExitOnForwardFailure=yes"]
        for fw in forwards:
            argv += ["-L", fw.spec]
    else:
        argv.append("-tt" if tty else "-T")
    argv += ["--", creds.host, *command]
    return argv


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if base is None else base
    return {k: v for k, v in env.items() if k not in STRIPPED_ENV and not k.upper().startswith("PCIGATE_")}
