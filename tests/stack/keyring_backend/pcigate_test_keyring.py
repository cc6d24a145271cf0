"""A real, encrypted file keyring usable headless: keyrings.cryptfile unlocked from the environment.

``keyrings.cryptfile`` (1.3.9) only ever asks for its password with ``getpass`` (a TTY), so the CLI cannot
use it in a test or in CI. This subclass takes the password from ``KEYRING_CRYPTFILE_PASSWORD`` and
otherwise behaves like ``CryptFileKeyring`` (Argon2id-derived key, AES-GCM, file
``$XDG_DATA_HOME/python_keyring/cryptfile_pass.cfg``), with a cheaper key derivation.

The test stack selects it through the keyring config file it writes into the fresh user's home
(``$XDG_CONFIG_HOME/python_keyring/keyringrc.cfg`` with ``keyring-path`` pointing at this directory), so
the CLI under test loads it through keyring's own, documented mechanism. Not a package on purpose.
"""

from __future__ import annotations

import os

from keyrings.cryptfile.cryptfile import CryptFileKeyring

PASSWORD_ENV = "KEYRING_CRYPTFILE_PASSWORD"


class EnvCryptFileKeyring(CryptFileKeyring):  # type: ignore[misc]
    """CryptFileKeyring whose password comes from ``$KEYRING_CRYPTFILE_PASSWORD`` (never prompts).

    The Argon2id cost is lowered from the defaults (15 passes over 64 MiB, ~0.7 s per entry read) to keep a
    CLI call in the test-suite fast; the file is still encrypted and authenticated the same way.
    """

    time_cost = 2
    memory_cost = 2**13  # 8 MiB
    parallelism = 1

    def _init_keyring(self) -> None:
        # Called on first use; the parent then checks the password against the file's reference entry
        # (wrong password: ValueError "Incorrect Password") or initialises a new file.
        password = os.environ.get(PASSWORD_ENV, "")
        if not password.strip():
            raise RuntimeError(f"{PASSWORD_ENV} is not set: the test keyring cannot be unlocked")
        self._keyring_key = password
        super()._init_keyring()
