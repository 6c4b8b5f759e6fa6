"""TLS of the services, from their settings: the server credentials of a gRPC server and the
TLS of the channels a service opens to another one (writer -> judge, web -> query), which
trainer_client.tls.open_aio_channel opens.

The files are read and checked (trainer_client.tls) when the service starts; one that is
missing, unreadable, not PEM, or a certificate and key that do not match, is a StartupError:
one line on stderr and exit 1 (services.common.startup). Without TLS settings everything is
plaintext, the local default.
"""

from typing import Any

import grpc

from services.common.config import ServiceSettings
from services.common.startup import StartupError
from trainer_client.tls import (
    ClientTLS,
    TLSFileError,
    read_ca,
    read_key_pair,
)


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials of the server (mutual TLS required when tls_client_ca_file is set);
    None when the server is plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        chain, key = read_key_pair(settings.tls_cert_file, settings.tls_key_file)
        client_ca = (read_ca(settings.tls_client_ca_file)
                     if settings.tls_client_ca_file is not None else None)
    except TLSFileError as exc:
        raise StartupError(str(exc)) from None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def client_tls(settings: Any, prefix: str, peer: str) -> ClientTLS | None:
    """The TLS of a service's channel to `peer` (its `<prefix>tls*` settings); None: plaintext.
    A file that cannot be used is a StartupError naming the peer."""
    try:
        return ClientTLS.from_settings(settings, prefix)
    except TLSFileError as exc:
        raise StartupError(f"TLS to the {peer}: {exc}") from None



def transport(settings: ServiceSettings) -> str:
    """How the server is reached, for its start-up log line."""
    if settings.tls_cert_file is None:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"
