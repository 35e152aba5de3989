"""Builds modelgrid-client: the protobuf and gRPC code is generated from the repository's protos/ (two levels up)
into src/modelgrid/ before setuptools looks for packages, unless it is there already and newer than every proto."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).parent))
from generate_protos import generate_if_stale  # noqa: E402

generate_if_stale()
setup()
