"""prepare-data throughput at 1 and 2 tokenizing workers on the embedded Shakespeare corpus, in one run.

    .venv/bin/python benchmarks/prepare_speed.py [--workers 1 2] [--repeats 2]

Each run prepares the whole corpus into a fresh folder, end to end as the stage does it (listing, the
checking pass, tokenization, writing): the time a user waits. Runs of the worker counts alternate to
spread machine noise evenly; the best of each is reported, and the outputs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from nemo_minitron import embedded
from nemo_minitron.data.config import PrepareDataConfig
from nemo_minitron.data.prepare import prepare_data

COMPARED = ("train.bin", "train.idx", "valid.bin", "valid.idx", "train_documents.jsonl", "valid_documents.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    tokens, outputs = 0, {}
    with tempfile.TemporaryDirectory(prefix="prepare_speed-") as tmp:
        for repeat in range(args.repeats):
            for workers in args.workers:
                out = Path(tmp) / f"w{workers}-r{repeat}"
                cfg = PrepareDataConfig(input=embedded.CORPUS, tokenizer=embedded.TEACHER, output_dir=str(out),
                                        num_workers=workers)
                start = time.perf_counter()
                data = prepare_data(cfg)
                seconds[workers].append(time.perf_counter() - start)
                tokens = data.num_train_tokens + data.num_valid_tokens
                outputs[workers] = {name: (out / name).read_bytes() for name in COMPARED}
        identical = all(outputs[w] == outputs[args.workers[0]] for w in args.workers)

    print(f"corpus {embedded.CORPUS}: {tokens} tokens, tokenizer {embedded.TEACHER}, {os.cpu_count()} CPUs")
    best = {w: min(s) for w, s in seconds.items()}
    for w in args.workers:
        print(f"{w} worker{'s' if w > 1 else ' '}  best {best[w]:6.2f} s  ({tokens / best[w]:9.0f} tok/s)  "
              f"runs {['%.2f' % x for x in seconds[w]]}")
    first = args.workers[0]
    for w in args.workers[1:]:
        print(f"speed-up {w} / {first} workers = {best[first] / best[w]:.2f}x")
    print(f"outputs byte-identical across worker counts: {identical}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": tokens, "seconds": seconds, "identical": identical,
                                               "tokens_per_second": {w: tokens / best[w] for w in best}}, indent=2))
    if not identical:
        raise SystemExit("outputs differ between worker counts")


if __name__ == "__main__":
    main()
