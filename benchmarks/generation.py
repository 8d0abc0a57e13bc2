"""Generation speed and memory of the teacher against its pruned student, in transformers and in llama.cpp.

    .venv/bin/python benchmarks/generation.py [--student runs/prune/smollm2-width-55] [--new-tokens 64]
                                              [--gguf-dtype float16] [--threads 2] [--repeats 3]

Both models generate greedily, the same number of new tokens (no early stop at EOS) for the same prompts:
passages of a few Shakespeare plays. Each (runtime, model) pair runs in its own process (this script with
``--worker``), which reports generated tokens per second (prompt processing included; after one warm-up
generation, the fastest of ``--repeats`` passes over the prompts, to keep other load on the machine out of
the ratios) and its peak resident memory above the resident memory just before the model is loaded, so no
run's allocations leak into another's numbers. The student defaults to the ~55% width-pruned teacher; it is
made with `prepare-data` + `prune` when missing. Its HF directory and both GGUF files are made with the
`export` stage into ``--workdir`` (kept for later runs). llama.cpp comes from `make install-llama-cpp`.
On a shared machine, ``--threads 1`` gives the steadiest numbers (llama.cpp's threads spin while they wait).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "embedded:smollm2-135m-instruct"
PLAYS = ("hamlet", "macbeth", "othello", "tempest", "lear", "twelfth")
RUNTIMES = ("transformers", "llama.cpp")


def prompts(count: int, chars: int = 400) -> list[str]:
    """``chars`` characters from a tenth of the way into each of ``count`` plays (past the cast lists)."""
    from nemo_minitron import embedded

    out = []
    for play in PLAYS[:count]:
        text = next(embedded.corpus_dir().glob(f"*/*{play}*.md")).read_text(encoding="utf-8")
        out.append(text[len(text) // 10 :][:chars])
    return out


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def best_pass(
    generate: Callable[[str, int], int], texts: list[str], new_tokens: int, repeats: int
) -> tuple[int, float]:
    """(tokens, seconds) of the fastest of ``repeats`` passes over all prompts, after one short warm-up."""
    generate(texts[0], 4)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = sum(generate(text, new_tokens) for text in texts)
        passes.append((tokens, time.perf_counter() - start))
    return min(passes, key=lambda p: p[1])


def run_transformers(
    model_dir: str, texts: list[str], new_tokens: int, threads: int, repeats: int
) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(text: str, n: int) -> int:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return out.shape[1] - ids.shape[1]

    return best_pass(generate, texts, new_tokens, repeats)


def run_llamacpp(gguf_file: str, texts: list[str], new_tokens: int, threads: int, repeats: int) -> tuple[int, float]:
    from llama_cpp import Llama

    llm = Llama(gguf_file, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(text: str, n: int) -> int:
        count = 0
        for _ in llm.generate(llm.tokenize(text.encode(), add_bos=False), top_k=1, temp=0.0, repeat_penalty=1.0):
            count += 1
            if count == n:
                break
        return count

    return best_pass(generate, texts, new_tokens, repeats)


def worker(runtime: str, model: str, args: argparse.Namespace) -> dict:
    """One runtime on one model (runs in a child process)."""
    import psutil

    texts = prompts(args.prompts)
    baseline = psutil.Process().memory_info().rss
    run = run_transformers if runtime == "transformers" else run_llamacpp
    tokens, seconds = run(model, texts, args.new_tokens, args.threads, args.repeats)
    return {"tokens": tokens, "seconds": seconds, "extra_bytes": peak_rss_bytes() - baseline}


def measure(runtime: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, "--model", model]
    cmd += ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args.threads))
    if proc.returncode != 0:
        sys.exit(f"{runtime} on {model} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> None:
    """Run a `nemo-minitron` stage; stop the benchmark with its message if it fails."""
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", *args], cwd=ROOT, env=_env(1))
    if proc.returncode != 0:
        sys.exit(f"nemo-minitron {' '.join(args)} failed (exit {proc.returncode})")


def build(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """Paths of each model for each runtime, made (once) with the project's own stages."""
    from nemo_minitron import embedded

    student = Path(args.student)
    if not (student / "model_config.json").is_file():
        print(f"{student}: not found, pruning the teacher into it (a few minutes)")
        cli("prepare-data", "conf/prepare_data/shakespeare.yaml")
        cli("prune", "conf/prune/smollm2_width_55.yaml", f"output={student}")
    work = Path(args.workdir)
    paths = {
        "teacher": {"transformers": str(embedded.teacher_dir())},
        "student": {"transformers": str(work / "student-hf")},
    }
    for name in paths:
        paths[name]["llama.cpp"] = str(work / f"{name}-{args.gguf_dtype}.gguf")
    if not Path(paths["student"]["transformers"]).exists():
        cli("export", f"source={student}", "format=hf", f"output={paths['student']['transformers']}")
    for name, source in (("teacher", TEACHER), ("student", str(student))):
        if not Path(paths[name]["llama.cpp"]).exists():
            gguf_file = paths[name]["llama.cpp"]
            cli("export", f"source={source}", "format=gguf", f"dtype={args.gguf_dtype}", f"output={gguf_file}")
    return paths


def num_params(model_dir: str) -> int:
    from nemo_minitron.checkpoint.io import read_model_config

    return read_model_config(Path(model_dir)).num_params()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="runs/prune/smollm2-width-55", help="student checkpoint (made if missing)")
    parser.add_argument("--workdir", default="runs/bench/generation", help="where the exports are kept")
    parser.add_argument("--gguf-dtype", default="float16", choices=("float32", "float16", "bfloat16", "q8_0"))
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PLAYS) + 1))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per run; the fastest counts")
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args)))
        return

    paths = build(args)
    params = {name: num_params(p["transformers"]) for name, p in paths.items()}
    print(
        f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy, {args.threads} threads, "
        f"best of {args.repeats} passes; "
        f"transformers fp32, llama.cpp GGUF {args.gguf_dtype}"
    )
    print(f"{'runtime':<13}{'model':<9}{'params':>9}{'tok/s':>9}{'peak RSS +MiB':>15}")
    results: dict[tuple[str, str], dict] = {}
    for runtime in RUNTIMES:
        for name in ("teacher", "student"):
            r = results[runtime, name] = measure(runtime, paths[name][runtime], args)
            r["tok_s"] = r["tokens"] / r["seconds"]
            print(f"{runtime:<13}{name:<9}{params[name] / 1e6:8.1f}M{r['tok_s']:9.1f}{r['extra_bytes'] / 2**20:15.0f}")
    print(f"student/teacher parameters: {params['student'] / params['teacher']:.3f}")
    for runtime in RUNTIMES:
        t, s = results[runtime, "teacher"], results[runtime, "student"]
        print(
            f"{runtime:<13}student/teacher  speed x{s['tok_s'] / t['tok_s']:.2f}  "
            f"peak memory x{s['extra_bytes'] / t['extra_bytes']:.2f}"
        )


if __name__ == "__main__":
    main()
