"""TLS credentials of the command line for a gateway's public port: a private CA must be a PEM certificate."""

import grpc
import pytest

from services.cli.channels import public_tls
from services.kit import tls


def test_a_private_ca_is_read_and_anything_else_is_refused_before_a_call(tmp_path):
    tls.init(tmp_path / "ca", ())
    assert isinstance(public_tls(str(tmp_path / "ca" / "ca.pem")), grpc.ChannelCredentials)
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        public_tls(str(tmp_path / "key.pem"))
    with pytest.raises(FileNotFoundError):
        public_tls(str(tmp_path / "missing.pem"))


def test_without_a_ca_the_system_roots_are_trusted():
    assert isinstance(public_tls(None), grpc.ChannelCredentials)
