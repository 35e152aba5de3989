"""gRPC health check of one modelgrid role, run inside its container: `modelgrid-health-check ROLE [SERVICE] [--live]`.

deploy/Dockerfile copies this file into every role image as /usr/local/bin/modelgrid-health-check; the images'
HEALTHCHECK runs it (deploy/k8s uses the kubelet's own gRPC probes on the services' plaintext HEALTH_PORT). It
calls grpc.health.v1 Check on 127.0.0.1 at the role's port and exits 0 only when the answer is SERVING (1
otherwise, 2 on bad arguments). SERVICE is the name put in the request ("" by default: the server's overall
health; e.g. modelgrid.registry.v1.ModelRegistry). With --live any answer counts (NOT_SERVING too: a predictor
loading its models, a service draining): the process is alive; only no answer at all fails.

It reads the role's own settings from the environment, as the service does (MODELGRID_<ROLE>_...):
  PORT               the gRPC port (default: the role's)
  INTERNAL_TLS_DIR   the mesh's certificates: the call is mutual TLS with the role's own certificate, as every
                     internal port requires one (the kubelet's built-in `grpc:` probe asks HEALTH_PORT instead)
  TLS_CERT           the gateway's public certificate: the call is TLS, trusting that certificate or a public CA,
                     with the certificate's first DNS name as the expected server name
"""

import os
import sys

ROLES = {
    # role: (environment prefix, default port, identity in the mesh's certificates)
    "registry": ("MODELGRID_REGISTRY_", 50051, "registry"),
    "predictor": ("MODELGRID_PREDICTOR_", 50061, "predictor"),
    "trainer": ("MODELGRID_TRAINER_", 50081, "trainer"),
    "agent": ("MODELGRID_AGENT_", 50071, "trainer-agent"),
    "gateway": ("MODELGRID_GATEWAY_", 8080, "gateway"),
}
TIMEOUT_SECONDS = 3.0


def _public_credentials(cert_file: str):
    """TLS credentials for the gateway's public port, and the server name its certificate holds."""
    import grpc
    from cryptography import x509

    pem = open(cert_file, "rb").read()
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        name = names.get_values_for_type(x509.DNSName)[0]
    except (x509.ExtensionNotFound, IndexError):
        name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    # gRPC's bundled roots (a certificate from a public CA) plus the file itself (a self-signed one).
    roots_file = os.path.join(os.path.dirname(grpc.__file__), "_cython", "_credentials", "roots.pem")
    roots = (open(roots_file, "rb").read() if os.path.exists(roots_file) else b"") + b"\n" + pem
    return grpc.ssl_channel_credentials(roots), name


def check(role: str, service: str = "", *, live: bool = False) -> bool:
    """True when the role's server on this host answers SERVING for `service` (with `live`: answers at all)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    prefix, default_port, identity = ROLES[role]
    target = f"127.0.0.1:{os.environ.get(prefix + 'PORT') or default_port}"
    tls_dir = os.environ.get(prefix + "INTERNAL_TLS_DIR", "")
    public_cert = os.environ.get(prefix + "TLS_CERT", "") if role == "gateway" else ""
    if public_cert:
        credentials, name = _public_credentials(public_cert)
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    elif tls_dir and role != "gateway":  # the gateway's port is public: never mTLS
        from services.kit import tls

        channel = tls.dial(target, identity, tls.from_dir(tls_dir, identity))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            print(f"{role} at {target}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{role} at {target} {service or '(overall)'}: {status}")
    return live or answer.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    live = "--live" in argv
    args = [arg for arg in argv if arg != "--live"]
    if not 1 <= len(args) <= 2 or args[0] not in ROLES:
        print(f"usage: modelgrid-health-check {{{','.join(ROLES)}}} [SERVICE] [--live]", file=sys.stderr)
        return 2
    return 0 if check(*args, live=live) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
