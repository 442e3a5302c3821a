"""Command line: ``python -m captum_influence demo --out DIR``."""

from __future__ import annotations

import argparse
import sys

from ._demo import run_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captum_influence", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end example on scikit-learn's bundled digits")
    demo.add_argument("--out", default="demo_out", help="directory for the figures and the report")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    try:
        path = run_demo(args.out, device=args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
