"""`modelgrid-host up|down|status HOST.toml`: run the modelgrid processes of one host (see services/host/runner.py)."""

import argparse
import sys
from pathlib import Path

from services.host.description import DescriptionError, HostDescription
from services.host.runner import HostError, HostRunner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelgrid-host", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("description", type=Path, help="the host's TOML description (see deploy/hosts/)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each process (up)")
    args = parser.parse_args(argv)
    try:
        runner = HostRunner(HostDescription.load(args.description), timeout=args.timeout)
        if args.command == "up":
            runner.up()
        elif args.command == "down":
            runner.down()
        else:
            return 0 if runner.status() else 1
    except (DescriptionError, HostError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
