"""The ssh client adapter's pure parts: -L specs, the ssh command line, the key files' life."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pcigate.errors import UsageError
from pcigate.models import SshCredentials
from pcigate.sshclient import EphemeralKey, Forward, key_files, parse_forward, ssh_argv

CREDS = SshCredentials(host="web-1.internal", port=2222, principal="webops", principals=["webops"],
                       certificate="ssh-ed25519-cert-v01@openssh.com AAAA", serial="7", key_id="pcigate:a:s",
                       known_hosts=["[web-1.internal]:2222 ssh-ed25519 AAAAC3Nz"],
                       valid_before=datetime(2030, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("spec", "want"), [
    ("8080:localhost:80", Forward(8080, "localhost", 80)),
    ("127.0.0.1:8080:db.internal:5432", Forward(8080, "db.internal", 5432)),
    ("[::1]:8080:[fe80::1]:22", Forward(8080, "fe80::1", 22)),
])
def test_forward_specs(spec: str, want: Forward) -> None:
    assert parse_forward(spec) == want
    assert want.spec.startswith("127.0.0.1:")  # the local end is always loopback


@pytest.mark.parametrize("spec", ["0.0.0.0:8080:h:80", "10.0.0.1:8080:h:80", "8080:h", "x:h:80", "0:h:80",
                                  "8080:h:70000", "8080::80"])
def test_bad_forward_specs(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_forward(spec)


def test_the_key_is_fresh_ed25519_and_never_printed() -> None:
    a, b = EphemeralKey.generate(), EphemeralKey.generate()
    assert a.public.startswith("ssh-ed25519 ")
    assert a.public != b.public
    assert b"OPENSSH PRIVATE KEY" in a.private_openssh
    assert "PRIVATE" not in repr(a)


def test_key_files_are_private_and_gone_afterwards() -> None:
    key = EphemeralKey.generate()
    with key_files(key, CREDS) as files:
        assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
        for p in (files.identity, files.certificate, files.known_hosts):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert files.identity.read_bytes() == key.private_openssh
        assert files.known_hosts.read_text() == CREDS.known_hosts[0] + "\n"
        if os.path.isdir("/dev/shm"):
            assert str(files.directory).startswith("/dev/shm/")  # memory, not disk
        directory = files.directory
    assert not directory.exists()


def test_key_files_are_removed_on_error() -> None:
    seen: list[Path] = []

    def fail() -> None:
        with key_files(EphemeralKey.generate(), CREDS) as files:
            seen.append(files.directory)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail()
    assert not seen[0].exists()


def test_ssh_command_line_is_strict() -> None:
    with key_files(EphemeralKey.generate(), CREDS) as files:
        argv = ssh_argv("/usr/bin/ssh", CREDS, files, tty=True, command=["uptime"])
        joined = " ".join(argv)
        assert "StrictHostKeyChecking=yes" in joined
        assert "StrictHostKeyChecking=no" not in joined
        for opt in ("-F /dev/null", "BatchMode=yes", "IdentitiesOnly=yes", "IdentityAgent=none",
                    "GlobalKnownHostsFile=/dev/null", f"UserKnownHostsFile={files.known_hosts}",
                    f"CertificateFile={files.certificate}", "-p 2222", "-l webops"):
            assert opt in joined
        assert argv[-3:] == ["--", "web-1.internal", "uptime"]
        assert "-tt" in argv
        fwd = ssh_argv("ssh", CREDS, files, tty=False, command=[], forwards=[Forward(8080, "h", 80)])
        assert fwd[fwd.index("-L"):fwd.index("-L") + 2] == ["-L", "127.0.0.1:8080:h:80"]
        assert "-N" in fwd
        assert "ExitOnForwardFailure=yes" in fwd


def test_a_killed_sessions_key_directory_is_removed_by_the_next_session(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to clean up: the next key_files() removes the dead owner's directory (and
    leaves a live process's alone)."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from tests.unit.test_sshclient import CREDS\n"
            "from pcigate.sshclient import EphemeralKey, key_files\n"
            "with key_files(EphemeralKey.generate(), CREDS) as f:\n"
            "    print(f.directory, flush=True)\n"
            "    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert child.stdout is not None
    left = Path(child.stdout.readline().strip())
    assert (left / "id_ed25519").exists()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert (left / "id_ed25519").exists()  # the key outlived its session...
    live = Path(tempfile.mkdtemp(prefix=f"pcigate-ssh-{os.getppid()}-", dir=left.parent))
    try:
        with key_files(EphemeralKey.generate(), CREDS) as files:
            assert not left.exists()  # ...until the next session started
            assert live.exists()  # a running process's directory stays
            assert str(os.getpid()) in files.directory.name
    finally:
        shutil.rmtree(live, ignore_errors=True)
