"""API key parts that need no server: the key's shape and hash, the failed-exchange window,
peer addresses, and the credentials file the clients read and `epochlens login` writes."""

import hashlib
import hmac
import logging
import stat
import time

import pytest

from services.common.errors import ResourceExhausted
from services.writer import auth_servicer
from services.writer.api_keys import KEY_CHARS, PREFIX_CHARS, hash_key, looks_like_key, new_key
from services.writer.auth_servicer import FailedExchanges
from trainer_client.credentials import (
    CredentialsError,
    CredentialSettings,
    StaticToken,
    read_api_key,
    resolve_credentials,
    write_api_key,
)


class Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_keys_are_random_and_shaped():
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(looks_like_key(k) and len(k) == KEY_CHARS == 47 for k in keys)
    assert PREFIX_CHARS == 12
    assert not looks_like_key("elk_short") and not looks_like_key("xyz_" + "A" * 43)


def test_hash_is_hmac_with_a_pepper_and_sha256_without():
    key = new_key()
    assert hash_key(key, None) == hashlib.sha256(key.encode()).hexdigest()
    assert hash_key(key, "p") == hmac.new(b"p", key.encode(), hashlib.sha256).hexdigest()
    assert hash_key(key, "p") != hash_key(key, "q")


def test_failed_exchanges_are_limited_within_the_window():
    failures = FailedExchanges(limit=2, window_s=0.2)
    assert (failures.add("a"), failures.add("a"), failures.add("b")) == (1, 2, 1)
    with pytest.raises(ResourceExhausted) as caught:
        failures.check("a")
    assert caught.value.metadata["limit"] == "api_key_max_failures"
    failures.check("b")
    time.sleep(0.25)
    failures.check("a")
    assert failures.total == 3


def test_stale_addresses_are_dropped_past_the_tracking_bound(monkeypatch):
    monkeypatch.setattr(auth_servicer, "MAX_TRACKED_ADDRESSES", 3)
    failures = FailedExchanges(limit=5, window_s=0.05)
    for index in range(3):
        failures.add(f"old-{index}")
    time.sleep(0.06)
    failures.add("new")
    assert sorted(failures._times) == ["new"]


@pytest.mark.parametrize("peer, address", [
    ("ipv4:127.0.0.1:5555", "ipv4:127.0.0.1"), ("ipv6:[::1]:5555", "ipv6:[::1]"),
    ("unix:/tmp/sock", "unix:/tmp/sock"), ("", "unknown")])
def test_client_address_drops_the_port(peer, address):
    assert auth_servicer.client_address(Peer(peer)) == address


def settings(tmp_path, **values) -> CredentialSettings:
    return CredentialSettings(_env_file=None, file=tmp_path / "cfg" / "credentials", **values)


def test_credentials_file_is_written_0600_and_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("EPOCHLENS_API_KEY", raising=False)
    config = settings(tmp_path)
    assert read_api_key(config) is None
    write_api_key(config.credentials_file(), "elk_abc")
    assert stat.S_IMODE(config.credentials_file().stat().st_mode) == 0o600
    assert stat.S_IMODE(config.credentials_file().parent.stat().st_mode) == 0o700
    assert read_api_key(config) == "elk_abc"
    assert read_api_key(settings(tmp_path, api_key="elk_env")) == "elk_env"


def test_credentials_file_readable_by_others_is_used_with_a_warning(tmp_path, caplog,
                                                                    monkeypatch):
    monkeypatch.delenv("EPOCHLENS_API_KEY", raising=False)
    config = settings(tmp_path)
    write_api_key(config.credentials_file(), "elk_abc")
    config.credentials_file().chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="trainer_client.credentials"):
        assert read_api_key(config) == "elk_abc"
    assert "readable by other users (mode 644)" in caplog.text


def test_unusable_credentials_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("EPOCHLENS_API_KEY", raising=False)
    config = settings(tmp_path)
    config.credentials_file().parent.mkdir(parents=True)
    config.credentials_file().write_text("[other]\napi_key = x\n")
    with pytest.raises(CredentialsError, match=r"has no api_key in \[default\]"):
        read_api_key(config)
    config.credentials_file().write_text("no section header\n")
    with pytest.raises(CredentialsError, match="cannot read the credentials file"):
        read_api_key(config)


def test_default_file_follows_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    config = CredentialSettings(_env_file=None)
    assert config.credentials_file() == tmp_path / "epochlens" / "credentials"


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("EPOCHLENS_API_KEY", raising=False)
    config = settings(tmp_path)
    assert resolve_credentials(None, "h:1", config) is None
    assert resolve_credentials("tok", "h:1", config) == StaticToken("tok")
    write_api_key(config.credentials_file(), "elk_abc")
    resolved = resolve_credentials(None, "h:1", config)
    assert resolved is not None and resolved.refreshable
    given = StaticToken("given")
    assert resolve_credentials(given, "h:1", config) is given
