import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from services.common.auth import TokenVerifier, mint_token
from services.common.config import AuthSettings
from services.common.errors import Unauthenticated

SECRET = "unit-test-secret-that-is-long-enough-0123"


def hs() -> AuthSettings:
    return AuthSettings(jwt_secret=SECRET, _env_file=None)


def test_minted_token_verifies_to_its_subject():
    assert TokenVerifier(hs()).verify_header(f"Bearer {mint_token(hs(), 'alice')}") == "alice"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Token abc", "Bearer abc.def.ghi"])
def test_bad_headers_are_unauthenticated(header):
    with pytest.raises(Unauthenticated):
        TokenVerifier(hs()).verify_header(header)


def test_wrong_key_expired_and_missing_sub_are_refused():
    now = int(time.time())
    tokens = [
        jwt.encode({"sub": "a", "exp": now + 60}, "another-secret-that-is-long-enough-xx",
                   algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": now - 120}, SECRET, algorithm="HS256"),
        jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"),
    ]
    for token in tokens:
        with pytest.raises(Unauthenticated):
            TokenVerifier(hs()).verify(token)


def test_audience_and_issuer_are_enforced_when_configured():
    strict = AuthSettings(jwt_secret=SECRET, jwt_audience="epochlens", jwt_issuer="me",
                          _env_file=None)
    assert TokenVerifier(strict).verify(mint_token(strict, "bob")) == "bob"
    with pytest.raises(Unauthenticated):
        TokenVerifier(strict).verify(mint_token(hs(), "bob"))


def test_rs256_round_trip(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    settings = AuthSettings(jwt_algorithm="RS256", jwt_public_key_file=public,
                            jwt_private_key_file=private, _env_file=None)
    assert TokenVerifier(settings).verify(mint_token(settings, "carol")) == "carol"
    with pytest.raises(Unauthenticated):
        TokenVerifier(settings).verify(mint_token(hs(), "carol"))


def test_missing_key_is_a_configuration_error():
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        AuthSettings(_env_file=None)
