"""Command line: ``python -m captum_influence demo --out DIR [--device cpu|cuda] [--quiet]``.

``demo`` runs TRAK, TracIn, self-influence and Integrated Gradients with completeness checks on
scikit-learn's bundled digits (nothing downloaded) and writes figures and ``report.md`` to DIR.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._demo import UsageError, run_demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captum_influence", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end example on scikit-learn's bundled digits")
    demo.add_argument("--out", default="demo_out", help="directory for the figures and the report (default: demo_out)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, only the final line (bars are never drawn off a terminal)",
    )
    args = parser.parse_args(argv)
    try:
        path = run_demo(args.out, device=args.device, quiet=args.quiet)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
