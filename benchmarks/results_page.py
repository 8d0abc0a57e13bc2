"""Put a bench's short results (``results.md``) into the measured part of the Results page.

    .venv/bin/python benchmarks/results_page.py [--results bench/results.md] [--page docs/results.md]

The measured part is the text between ``<!-- results:start -->`` and ``<!-- results:end -->``; ``make bench`` runs
this after the bench, so the page quotes the numbers of the last full bench.
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
    parser.add_argument("--page", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    try:
        if not args.results.is_file():
            raise UserError(f"{args.results}: no such file (run `make bench` first)")
        results, text = args.results.read_text(encoding="utf-8"), args.page.read_text(encoding="utf-8")
        try:
            page = splice_readme(text, results)
        except UserError as exc:
            raise UserError(f"{args.page}: {exc}") from None
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.page, page)
    print(f"{args.page}: measured results from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
