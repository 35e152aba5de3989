"""Start and stop an S3-compatible server on loopback (moto's S3 server), for tests and for trying the registry's S3
blob backend on one machine.

moto (a dev dependency) implements the S3 API in memory: it stands in for AWS S3, MinIO, Ceph RGW or any other
S3-compatible store. It keeps nothing on disk (a restart loses every object) and accepts any credentials, so it is
never a place for real data.

Library use (tests; the port is free and chosen)::

    with S3Server(tmp_path / "s3") as s3:
        s3.create_bucket("models")
        ...  # s3.endpoint_url, s3.credentials_env() for a process that uses it

Command line (in the foreground until Ctrl-C; prints the settings a registry needs)::

    python -m services.kit.s3local --port 9000 --bucket modelgrid
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import time
import urllib.error
from pathlib import Path

from services.kit.localinfra import LOOPBACK, NO_PROXY_OPENER, InfraError, _LoopbackProcess, free_port

logger = logging.getLogger(__name__)

ACCESS_KEY_ID = "modelgrid-test"
SECRET_ACCESS_KEY = "modelgrid-test-secret"  # noqa: S105 - moto accepts any credentials; a test value
REGION = "us-east-1"


class S3Server(_LoopbackProcess):
    """moto's S3 server (`python -m moto.server`) on 127.0.0.1, on `port` or a free one."""

    name = "s3"

    def __init__(self, state_dir: Path | str, *, port: int | None = None, detached: bool = False) -> None:
        super().__init__(state_dir, detached=detached)
        self._port_given = port is not None
        self.port = port if port is not None else free_port()

    @property
    def endpoint_url(self) -> str:
        """e.g. "http://127.0.0.1:9000": the registry's MODELGRID_REGISTRY_S3_ENDPOINT_URL."""
        return f"http://{LOOPBACK}:{self.port}"

    @staticmethod
    def credentials_env() -> dict[str, str]:
        """The standard AWS variables boto3 reads, with the test credentials this server accepts (it accepts any)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        """A boto3 S3 client of this server (test credentials, no proxy, no retries)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10, proxies={}),
        )

    def create_bucket(self, bucket: str) -> None:
        """Makes a bucket (nothing if it exists)."""
        client = self.client()
        existing = {entry["Name"] for entry in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)

    def _command(self) -> list[str]:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask_cors") is None:
            raise InfraError("moto's S3 server is not installed: run `make setup` (moto[s3] and flask-cors, dev)")
        return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)]

    def _answers(self) -> bool:
        try:
            with NO_PROXY_OPENER.open(f"{self.endpoint_url}/moto-api/", timeout=1) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return True  # it answers HTTP
        except OSError:
            return False

    def _choose_new_ports(self) -> bool:
        if self._port_given:
            return False
        self.port = free_port()
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m services.kit.s3local`: serves until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m services.kit.s3local", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--bucket", default="modelgrid", help="bucket to create once it answers")
    parser.add_argument("--state-dir", type=Path, default=Path(".run/s3"), help="where its log goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    server = S3Server(args.state_dir, port=args.port or None)
    try:
        server.start()
        server.create_bucket(args.bucket)
    except InfraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"S3 (moto, in memory) at {server.endpoint_url}, pid {server.pid}, bucket {args.bucket!r}; a registry uses it"
    )
    print(
        f"with: MODELGRID_REGISTRY_BLOB_BACKEND=s3 MODELGRID_REGISTRY_S3_BUCKET={args.bucket} "
        f"MODELGRID_REGISTRY_S3_ENDPOINT_URL={server.endpoint_url}"
    )
    print("and any AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (moto accepts every credential). Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM stops the server too (the finally below)
    try:
        while server.pid is not None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
