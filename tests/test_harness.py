"""`eval` with backend lm-eval: the local LAMBADA-style task and standard lm-eval tasks from a local datasets
cache, through the command line, checked against last-word accuracy and perplexity computed with transformers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_minitron import embedded
from nemo_minitron.cli import main
from nemo_minitron.evaluation.harness import held_out_documents, lambada_passages

pytest.importorskip("lm_eval", reason="lm-eval is not installed (requirements/cpu.txt)")

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, datasets_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_CACHE": str(datasets_cache)}
    return subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def reference_lambada(model_dir: Path, passages: list[str]) -> tuple[float, float]:
    """(accuracy, perplexity) of LAMBADA on ``passages`` with transformers alone: the target is the last
    space-separated word; a hit when greedy decoding yields all its tokens; perplexity is exp of minus the
    mean log-likelihood of the targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits, lls = [], []
    for text in passages:
        context, target = text.rsplit(" ", 1)
        ctx = tokenizer(context)["input_ids"]
        full = tokenizer(f"{context} {target}")["input_ids"]
        assert full[: len(ctx)] == ctx
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), dim=-1)
        wanted = torch.tensor(full[len(ctx):])
        scores = logprobs[len(ctx) - 1 :]
        lls.append(scores.gather(1, wanted[:, None]).sum().item())
        hits.append(bool((scores.argmax(-1) == wanted).all()))
    return sum(hits) / len(hits), math.exp(-sum(lls) / len(lls))


def cache_as_hub_dataset(cache: Path, repo: str, config: str, rows: list[dict]) -> None:
    """Put ``rows`` (one test split) into the datasets cache ``cache`` as if ``load_dataset(repo, config)`` had
    downloaded them there, so that it loads them offline."""
    import datasets

    source = cache.parent / f"{repo.replace('/', '_')}.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    built = datasets.load_dataset("json", data_files={"test": str(source)}, cache_dir=str(cache.parent / "build"))
    arrow = Path(built["test"].cache_files[0]["filename"])
    owner, name = repo.split("/")
    target = cache / f"{owner}___{name}" / config / "0.0.0" / arrow.parent.name
    shutil.copytree(arrow.parent, target)
    (target / arrow.name).rename(target / f"{name}-test.arrow")
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(builder_name=name, dataset_name=name, config_name=config)
    (target / "dataset_info.json").write_text(json.dumps(info))


def test_passages_end_in_a_sentence_final_word_and_do_not_overlap() -> None:
    text = ("One two three four. Five six seven\n"
            "eight nine ten eleven! Twelve, thirteen fourteen? fifteen sixteen.\n"
            "seventeen eighteen\nnineteen.")
    assert lambada_passages(text, 3) == [
        "One two three four",  # from the start of its line
        "eight nine ten eleven",
        "thirteen fourteen? fifteen sixteen",  # its line starts inside the previous passage: from its first word
    ]  # "nineteen" follows a newline, not a space: never a target
    assert lambada_passages(text, 20) == []


def test_local_and_cached_standard_lambada_on_a_prepared_dataset_match_transformers(tmp_path: Path) -> None:
    """A tiny Llama with the real tokenizer, the held-out split of two plays: `nemo-minitron eval` gives for
    `lambada_local`, and for lm-eval's own `lambada_openai` over the same passages put in a local datasets
    cache, the accuracy and perplexity that transformers gives."""
    from nemo_minitron.data import PrepareDataConfig, prepare_data
    from tiny import write_tiny_hf

    model = write_tiny_hf(tmp_path / "tiny", vocab_size=49152, with_tokenizer=True, seed=7)
    plays = tmp_path / "plays"
    plays.mkdir()
    for name in ("the-comedy-of-errors.md", "two-gentlemen-of-verona.md"):
        shutil.copy(embedded.corpus_dir() / "comedies" / name, plays / name)
    data = tmp_path / "data"
    prepare_data(PrepareDataConfig(input=str(plays), tokenizer=str(model), output_dir=str(data), valid_fraction=0.5))
    limit, words = 12, 32
    passages = [p for doc in held_out_documents(data, "valid") for p in lambada_passages(doc, words)][:limit]
    cache = tmp_path / "hf" / "datasets"
    cache.mkdir(parents=True)
    cache_as_hub_dataset(cache, "EleutherAI/lambada_openai", "default", [{"text": p} for p in passages])

    out = tmp_path / "harness.json"
    proc = _cli(f"model={model}", f"data={data}", "backend=lm-eval", "harness.tasks=[lambada_local,lambada_openai]",
                f"harness.limit={limit}", "harness.batch_size=4", f"harness.context_words={words}", f"output={out}",
                datasets_cache=cache)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(out.read_text())
    assert ours == json.loads(proc.stdout)
    assert ours["examples"] == {"lambada_local": limit, "lambada_openai": limit}
    assert ours["num_fewshot"] == {"lambada_local": 0, "lambada_openai": 0}
    acc, ppl = reference_lambada(model, passages)
    for task in ("lambada_local", "lambada_openai"):
        assert ours["tasks"][task]["acc"] == pytest.approx(acc, abs=1e-9), task
        assert ours["tasks"][task]["perplexity"] == pytest.approx(ppl, rel=1e-4), task


def test_teacher_local_lambada_on_a_text_file_matches_transformers(tmp_path: Path, capsys) -> None:
    """The embedded teacher (which, unlike a random model, gets some last words right) on passages of a play;
    in this process, as lambada_local needs no datasets cache."""
    play = next(embedded.corpus_dir().glob("tragedies/*hamlet*.md"))
    text = tmp_path / "hamlet.txt"
    text.write_text(play.read_text(encoding="utf-8"), encoding="utf-8")
    limit, words = 6, 24
    config = str(ROOT / "conf/eval/teacher_lambada.yaml")
    assert main(["eval", config, f"data={text}", f"harness.limit={limit}", f"harness.context_words={words}",
                 "harness.bootstrap_iters=0"]) == 0
    ours = json.loads(capsys.readouterr().out)["tasks"]["lambada_local"]
    passages = lambada_passages(text.read_text(encoding="utf-8"), words)[:limit]
    acc, ppl = reference_lambada(embedded.teacher_dir(), passages)
    assert acc > 0
    assert ours["acc"] == pytest.approx(acc, abs=1e-9)
    assert ours["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_standard_task_without_its_dataset_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    import datasets

    from tiny import write_tiny_hf

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty")
    model = write_tiny_hf(tmp_path / "tiny", vocab_size=49152, with_tokenizer=True)
    capsys.readouterr()
    assert main(["eval", f"model={model}", "backend=lm-eval", "harness.tasks=[hellaswag]"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("nemo-minitron eval: error: lm-eval task hellaswag: dataset not available locally")
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_other_backends_dump_their_config_as_before() -> None:
    """Finished `run` stages are recognised by the digest of their eval config: it must not gain a key."""
    from nemo_minitron.evaluation.config import EvalConfig

    keys = {"model", "data", "split", "seq_length", "micro_batch_size", "max_windows", "dtype", "backend",
            "parallel", "output", "seed"}
    assert set(EvalConfig(model="m", data="d").model_dump(mode="json")) == keys
    assert set(EvalConfig(model="m", backend="lm-eval").model_dump(mode="json")) == keys | {"harness"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=x", "harness.limit=3"], "harness: only used with backend=lm-eval"),
        (["backend=lm-eval"], "data: lambada_local needs held-out text"),
        (["backend=lm-eval", "harness.taskz=[hellaswag]"], "harness.taskz: unknown key"),
        (["backend=lm-eval", "harness.limit=0"], "harness.limit: Input should be greater than or equal to 1"),
        (["backend=lm-eval", "harness.tasks=[]"], "harness.tasks: List should have at least 1 item"),
        (["backend=lm-eval", "data=x", "harness.tasks=[lambada_local,lambada_local]"], "listed twice"),
        (["backend=lm-eval", "data=x", "parallel.tensor_model_parallel_size=2"], "runs on one process"),
    ],
)
def test_bad_harness_config_is_one_line_and_exit_2(args: list[str], message: str, tiny_hf_dirs, capsys) -> None:
    assert main(["eval", f"model={tiny_hf_dirs['untied']}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
