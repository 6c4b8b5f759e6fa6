"""TLS of the gRPC clients (and the PEM checks the servers use too): one place that reads the
certificate files, checks them, and opens a channel that is plaintext or TLS.

A client's TLS settings are five fields of its settings class, all with one prefix (the
writer's `judge_`, the web service's `query_`, none for the CLI and the trainer):

* `<prefix>tls`: use TLS with gRPC's default trusted roots even when no CA file is given;
* `<prefix>tls_ca_file`: the CA (PEM) the server's certificate must be signed by (implies TLS);
* `<prefix>tls_cert_file`, `<prefix>tls_key_file`: the client's own certificate chain and key
  (PEM, both or neither; implies TLS), for servers that require mutual TLS;
* `<prefix>tls_server_name`: the name checked in the server's certificate instead of the
  target's host (grpc.ssl_target_name_override).

None of them set: a plaintext channel (the local default). The files are read and checked
when the client is configured (ClientTLS.from_settings), so a missing, unreadable or invalid
file is one TLSFileError at start-up, not a failing handshake later. Only grpc and the
standard library are needed: no server package.
"""

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


class TLSFileError(ValueError):
    """A certificate, key or CA file is missing, unreadable or not valid PEM; the message is
    one line that names the file."""


def read_pem(path: Path, what: str) -> bytes:
    """The bytes of a PEM file; a TLSFileError when it cannot be read or holds no PEM block."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TLSFileError(f"the {what} {path} is not a PEM file")
    return data


def read_key_pair(cert_file: Path, key_file: Path) -> tuple[bytes, bytes]:
    """(certificate chain, private key) read from PEM files and checked to belong together
    (the standard library's TLS loads them as a server or client would)."""
    chain = read_pem(cert_file, "certificate file")
    key = read_pem(key_file, "key file")
    try:
        # An encrypted key gets an empty passphrase (and fails) instead of a prompt.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file,
                                                                password=lambda: b"")
    except ssl.SSLError as exc:
        raise TLSFileError(f"the certificate {cert_file} and key {key_file} are not a valid "
                           f"pair: {exc.reason or exc}") from None
    return chain, key


def read_ca(ca_file: Path) -> bytes:
    """The CA certificates of a PEM file, checked to hold at least one certificate."""
    data = read_pem(ca_file, "CA file")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TLSFileError(f"the CA file {ca_file} holds no valid certificate: "
                           f"{exc.reason or exc}") from None
    return data


def check_pairs(settings: Any, *pairs: tuple[str, str]) -> None:
    """For the settings classes' validators: a ValueError naming both environment variables
    when exactly one of a (certificate field, key field) pair is set."""
    prefix = (type(settings).model_config.get("env_prefix") or "").upper()
    for cert_field, key_field in pairs:
        cert, key = getattr(settings, cert_field), getattr(settings, key_field)
        if (cert is None) != (key is None):
            given, missing = ((cert_field, key_field) if cert is not None
                              else (key_field, cert_field))
            raise ValueError(f"{prefix}{missing.upper()} is required when "
                             f"{prefix}{given.upper()} is set (a certificate and its key go "
                             "together)")


@dataclass(frozen=True)
class ClientTLS:
    """What a TLS channel needs, read and checked: the trusted CA (None: gRPC's default
    roots), the client's certificate chain and key (None: no client certificate), and the
    name to check in the server's certificate (None: the target's host)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, prefix: str = "") -> "ClientTLS | None":
        """The TLS of the `<prefix>tls*` fields of settings (see the module); None when none
        of them asks for TLS. A file that cannot be used is a TLSFileError."""
        ca_file = getattr(settings, f"{prefix}tls_ca_file")
        cert_file = getattr(settings, f"{prefix}tls_cert_file")
        key_file = getattr(settings, f"{prefix}tls_key_file")
        if not (getattr(settings, f"{prefix}tls") or ca_file or cert_file or key_file):
            return None
        chain, key = read_key_pair(cert_file, key_file) if cert_file else (None, None)
        return cls(root_certificates=read_ca(ca_file) if ca_file else None,
                   certificate_chain=chain, private_key=key,
                   server_name=getattr(settings, f"{prefix}tls_server_name") or None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                            private_key=self.private_key,
                                            certificate_chain=self.certificate_chain)

    def options(self) -> list[tuple[str, Any]]:
        """The channel options TLS adds: the server name override, when one is set."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_channel(target: str, tls: ClientTLS | None,
                 options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to target: TLS when tls is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def open_aio_channel(target: str, tls: ClientTLS | None, options: ChannelOptions = (),
                     interceptors: Sequence | None = None) -> grpc.aio.Channel:
    """An asyncio channel to target: TLS when tls is given, else plaintext; interceptors
    (client interceptors, such as tracing) are passed to the channel."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options),
                                         interceptors=interceptors)
    return grpc.aio.secure_channel(target, tls.credentials(),
                                   options=[*options, *tls.options()],
                                   interceptors=interceptors)
