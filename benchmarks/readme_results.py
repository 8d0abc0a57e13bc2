"""Put a bench's short results (``results.md``) into the README's Results section.

    .venv/bin/python benchmarks/readme_results.py [--results bench/results.md] [--readme README.md]

The section is the text between ``<!-- results:start -->`` and ``<!-- results:end -->``; ``make bench`` runs
this after the bench, so the README quotes the numbers of the last full bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemo_minitron.bench.report import splice_readme
from nemo_minitron.errors import UserError
from nemo_minitron.fsutil import atomic_write_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results.md"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args()
    try:
        if not args.results.is_file():
            raise UserError(f"{args.results}: no such file (run `make bench` first)")
        readme = splice_readme(args.readme.read_text(encoding="utf-8"), args.results.read_text(encoding="utf-8"))
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.readme, readme)
    print(f"{args.readme}: Results section from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
