"""Internal mTLS: a local certificate authority, a certificate per service, and the gRPC credentials built on them.

Every internal gRPC port (registry, predictor, trainer, worker agents) requires a client certificate signed by the
mesh's CA, and every internal channel presents one and checks the server's. A TLS directory holds::

    ca.pem  ca-key.pem                the CA (its key stays on the machine that made it, mode 0600)
    <name>.pem  <name>-key.pem        one identity per service, named as the service is in Consul

Each certificate names its identity twice: as its subject's common name and as a DNS name. A channel expects the
name of the service it calls (grpc.ssl_target_name_override), whatever address Consul gave for the instance, so a
certificate for one service cannot answer for another; a server reads the caller's name from its certificate
(`peer_identity`), and the worker agents use it to accept only the trainer.

`python -m services.kit.tls init DIR` makes what is missing (idempotent); `renew DIR NAME...` issues new
certificates for those identities from the same CA. `make up`, compose, `modelgrid-host` and the test fixtures
run `init`.
"""

import argparse
import datetime
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.kit.private_files import write_private_file

CA_NAME = "modelgrid internal CA"
# Who the mesh's certificates are for: the services as Consul names them, the Consul agents (they call the health
# endpoints) and `operator`, the identity of people and programs on the operator's side (the CLI, tests, benches).
IDENTITIES: tuple[str, ...] = ("registry", "predictor", "trainer", "trainer-agent", "gateway", "consul", "operator")
MESH_NAME = "modelgrid"
"""A DNS name every certificate carries besides its own: the name Consul's health checks send (the agents'
`server_name`), so that the services' TLS stack finds a certificate for it. A channel expects a service's own name,
which no other identity's certificate holds."""
CERT_DAYS = 397
CA_DAYS = 3650


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.pem"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}-key.pem"


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(key, hashes.SHA256())
    )
    write_private_file(key_path(directory, "ca"), _key_pem(key))
    cert_path(directory, "ca").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(directory: Path, identity: str, days: int = CERT_DAYS, ca_dir: Path | None = None) -> None:
    """A certificate for `identity` (CN and DNS names), good for serving and for calling, signed by the CA (kept
    in `ca_dir`, by default `directory`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir = ca_dir or directory
    ca_key = serialization.load_pem_private_key(key_path(ca_dir, "ca").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(cert_path(ca_dir, "ca").read_bytes())
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity), x509.DNSName(MESH_NAME)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private_file(key_path(directory, identity), _key_pem(key))
    cert_path(directory, identity).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _check_identity(identity: str) -> None:
    if not identity or not all(c.isalnum() or c in "-." for c in identity) or len(identity) > 63:
        raise ValueError(f"identity {identity[:70]!r}: 1-63 letters, digits, '-' or '.'")


def init(directory: Path | str, identities: Iterable[str] = IDENTITIES, ca_dir: Path | str | None = None) -> Path:
    """Makes the CA and a certificate for each identity, unless they exist; returns the directory. With `ca_dir`,
    the CA's key stays there (only its certificate is copied to `directory`): whoever reads the certificates
    cannot issue new ones."""
    directory = Path(directory)
    ca_dir = Path(ca_dir) if ca_dir is not None else directory
    for place in {directory, ca_dir}:
        place.mkdir(parents=True, exist_ok=True)
        place.chmod(0o700)
    if not cert_path(ca_dir, "ca").exists() or not key_path(ca_dir, "ca").exists():
        _make_ca(ca_dir)
    if ca_dir != directory:
        cert_path(directory, "ca").write_bytes(cert_path(ca_dir, "ca").read_bytes())
    for identity in identities:
        _check_identity(identity)
        if not cert_path(directory, identity).exists() or not key_path(directory, identity).exists():
            _issue(directory, identity, ca_dir=ca_dir)
    return directory


def renew(directory: Path | str, identities: Sequence[str], ca_dir: Path | str | None = None) -> None:
    """New keys and certificates for `identities` from the existing CA (services read them when they start)."""
    directory = Path(directory)
    for identity in identities:
        _check_identity(identity)
        _issue(directory, identity, ca_dir=Path(ca_dir) if ca_dir is not None else None)


@dataclass(frozen=True)
class InternalTLS:
    """One identity's view of a TLS directory: what it serves with and what it calls with."""

    directory: Path
    identity: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        for path in (cert_path(self.directory, "ca"), *self.pair()):
            if not path.is_file():
                raise FileNotFoundError(
                    f"internal TLS: {path} is missing (make the directory with `python -m services.kit.tls init DIR`)"
                )

    def pair(self) -> tuple[Path, Path]:
        return cert_path(self.directory, self.identity), key_path(self.directory, self.identity)

    def root_certificates(self) -> bytes:
        return cert_path(self.directory, "ca").read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serves with this identity's certificate; callers must present one signed by the CA."""
        cert, key = self.pair()
        return grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=self.root_certificates(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Calls with this identity's certificate; trusts servers signed by the CA."""
        cert, key = self.pair()
        return grpc.ssl_channel_credentials(self.root_certificates(), key.read_bytes(), cert.read_bytes())


def expect(service: str) -> list[tuple[str, str]]:
    """Channel options under which the server must prove it is `service` (its certificate's DNS name), whatever
    address the channel dials."""
    return [("grpc.ssl_target_name_override", service)]


def from_dir(directory: Path | str | None, identity: str) -> InternalTLS | None:
    """The identity's TLS, or None when no directory is set (plaintext)."""
    return None if directory is None or str(directory) == "" else InternalTLS(Path(directory), identity)


def dial(
    target: str,
    service: str,
    tls: InternalTLS | None,
    *,
    options: Sequence[tuple[str, object]] = (),
    aio: bool = False,
):
    """A channel to `service` at `target`: mTLS with `tls`, plaintext without (sync, or grpc.aio with aio=True)."""
    module = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, tls.channel_credentials(), options=[*options, *expect(service)])


def peer_identity(context) -> str:
    """The caller's identity: its client certificate's common name; "" without one."""
    values = (context.auth_context() or {}).get("x509_common_name") or []
    return values[0].decode(errors="replace") if values else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kit.tls", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("init", help="make the CA and the certificates that are missing")
    make.add_argument("directory", type=Path)
    make.add_argument("identities", nargs="*", help=f"default: {' '.join(IDENTITIES)}")
    again = commands.add_parser("renew", help="issue new certificates for these identities from the same CA")
    again.add_argument("directory", type=Path)
    again.add_argument("identities", nargs="+")
    for command in (make, again):
        command.add_argument("--ca-dir", type=Path, help="where the CA's key is kept (default: DIRECTORY)")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            init(args.directory, args.identities or IDENTITIES, ca_dir=args.ca_dir)
        else:
            renew(args.directory, args.identities, ca_dir=args.ca_dir)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
