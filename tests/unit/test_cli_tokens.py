"""The keyring token store refuses backends that cannot keep a secret."""

from __future__ import annotations

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import fail, null
from tests.stack.memory_keyring import MemoryKeyring

from pcigate.auth.tokens import StoredTokens, TokenStore
from pcigate.errors import ExitCode, KeyringUnavailable


@pytest.fixture
def use_keyring():
    previous = keyring.get_keyring()

    def use(kr: KeyringBackend) -> KeyringBackend:
        keyring.set_keyring(kr)
        return kr

    yield use
    keyring.set_keyring(previous)


@pytest.mark.parametrize("backend", [fail.Keyring, null.Keyring])
def test_unusable_backend_is_refused_with_a_hint(use_keyring, backend: type[KeyringBackend]) -> None:
    use_keyring(backend())
    store = TokenStore("http://broker")
    for op in (store.load, lambda: store.save(StoredTokens(id_token="x", expires_at=0)), store.delete):
        with pytest.raises(KeyringUnavailable) as err:
            op()
        assert err.value.exit_code == ExitCode.KEYRING_UNAVAILABLE
        assert "Secret Service" in (err.value.hint or "")
        assert "PCIGATE_TOKEN" in (err.value.hint or "")


def test_empty_chainer_is_refused(use_keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    from keyring.backends import chainer

    monkeypatch.setattr(chainer.ChainerBackend, "backends", [], raising=False)
    use_keyring(chainer.ChainerBackend())
    with pytest.raises(KeyringUnavailable):
        TokenStore("http://broker").load()


def test_round_trip_keyed_by_broker_url(use_keyring) -> None:
    kr = use_keyring(MemoryKeyring())
    store = TokenStore("http://broker:8600/")
    assert store.load() is None
    tokens = StoredTokens(id_token="id.tok.en", refresh_token="r", expires_at=123.0, issuer="http://idp")
    store.save(tokens)
    assert set(kr.data) == {("pcigate", "http://broker:8600")}
    assert store.load() == tokens
    assert "id.tok.en" not in repr(tokens)
    assert store.delete() is True
    assert store.delete() is False
    assert store.load() is None


def test_broken_backend_is_keyring_unavailable(use_keyring) -> None:
    class Locked(MemoryKeyring):
        def get_password(self, service: str, username: str) -> str | None:
            raise ValueError("Incorrect Password")

    use_keyring(Locked())
    with pytest.raises(KeyringUnavailable):
        TokenStore("http://b").load()
