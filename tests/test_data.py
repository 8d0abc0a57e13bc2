"""The data stage: prepare_data on a tiny corpus (and once on Shakespeare), sampler, eval windows, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_minitron.config import build_config
from nemo_minitron.data import (
    PrepareDataConfig,
    SequenceSampler,
    TokenDataset,
    eval_windows,
    load_tokenizer,
    prepare_data,
    text_file_tokens,
)
from nemo_minitron.data import prepare as prepare_module
from nemo_minitron.embedded import CORPUS, TEACHER
from nemo_minitron.errors import UserError

DOCS = {
    "a.txt": "To be, or not to be, that is the question.\n",
    "b.md": "# Act I\n\nEnter HAMLET, with a book in hand.\n",
    "sub/c.txt": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "sub/deeper/d.md": "Now is the winter of our discontent made glorious summer by this sun of York.",
}
RECORDS = ["All the world's a stage,", "And all the men and women merely players;", "They have their exits."]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEACHER)


def write_corpus(root: Path, reverse: bool = False) -> dict[str, str]:
    """Write DOCS plus a 3-record jsonl under ``root``; returns document name -> text."""
    texts = dict(DOCS)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(RECORDS)]
    lines.insert(1, "")  # blank lines are skipped but still count for file:line names
    texts.update({f"e.jsonl:{n}": t for n, t in zip((1, 3, 4), RECORDS)})
    items = sorted(DOCS.items(), reverse=reverse)
    for name, text in items:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "e.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "notes.csv").write_text("ignored,by,suffix\n", encoding="utf-8")
    return texts


def config(tmp_path: Path, input: str | Path, name: str = "out", **kw) -> PrepareDataConfig:
    return PrepareDataConfig(input=str(input), tokenizer=TEACHER, output_dir=str(tmp_path / name), **kw)


@pytest.fixture()
def prepared(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    return prepare_data(config(tmp_path, tmp_path / "corpus", valid_fraction=0.3)), texts


def read_meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text())


def test_token_counts_match_tokenizer_plus_eos(prepared, tokenizer):
    data, texts = prepared
    meta = read_meta(data.output_dir)
    assert meta["eos_id"] == data.eos_id == tokenizer.eos_token_id
    assert meta["vocab_size"] == data.vocab_size == len(tokenizer) and meta["dtype"] == "uint16"
    for split, prefix, count in (
        ("train", data.train_prefix, data.num_train_tokens),
        ("valid", data.valid_prefix, data.num_valid_tokens),
    ):
        expected = []
        for name in meta[f"{split}_documents"]:
            expected += tokenizer(texts[name], add_special_tokens=False)["input_ids"] + [data.eos_id]
        ds = TokenDataset(prefix)
        assert ds.num_tokens == count == len(expected) == meta[f"num_{split}_tokens"]
        assert ds.num_documents == len(meta[f"{split}_documents"])
        assert ds.tokens.tolist() == expected


def test_split_is_deterministic_disjoint_and_order_independent(tmp_path, prepared):
    data, texts = prepared
    meta = read_meta(data.output_dir)
    train, valid = set(meta["train_documents"]), set(meta["valid_documents"])
    assert train and valid and not train & valid and train | valid == set(texts)

    write_corpus(tmp_path / "corpus2", reverse=True)  # created in the opposite order
    again = prepare_data(config(tmp_path, tmp_path / "corpus2", "out2", valid_fraction=0.3))
    meta2 = read_meta(again.output_dir)
    for key in ("train_documents", "valid_documents"):
        assert meta2[key] == meta[key]
    for file in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (again.output_dir / file).read_bytes() == (data.output_dir / file).read_bytes()

    names = sorted(texts)
    assert prepare_module._valid_names(names, 0.3, 1) == prepare_module._valid_names(names[::-1], 0.3, 1)
    assert prepare_module._valid_names(names, 0.3, 1) != prepare_module._valid_names(names, 0.3, 2)


@pytest.mark.parametrize("fraction", [1e-9, 1 - 1e-9])
def test_both_splits_non_empty_with_two_documents(tmp_path, fraction):
    for name in ("x.txt", "y.txt"):
        (tmp_path / "c" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "c" / name).write_text(f"document {name}")
    data = prepare_data(config(tmp_path, tmp_path / "c", valid_fraction=fraction))
    meta = read_meta(data.output_dir)
    assert len(meta["train_documents"]) == len(meta["valid_documents"]) == 1


def test_glob_and_single_file_inputs(tmp_path):
    write_corpus(tmp_path / "corpus")
    data = prepare_data(config(tmp_path, tmp_path / "corpus" / "sub" / "**" / "*.*"))
    meta = read_meta(data.output_dir)
    # names are relative to the glob's fixed leading folders
    assert sorted(meta["train_documents"] + meta["valid_documents"]) == ["c.txt", "deeper/d.md"]
    data = prepare_data(config(tmp_path, tmp_path / "corpus" / "e.jsonl", "out_jsonl"))
    meta = read_meta(data.output_dir)
    assert sorted(meta["train_documents"] + meta["valid_documents"]) == ["e.jsonl:1", "e.jsonl:3", "e.jsonl:4"]


def test_rerun_same_config_skips_and_different_config_refuses(tmp_path, prepared, monkeypatch):
    data, _ = prepared
    cfg = config(tmp_path, tmp_path / "corpus", valid_fraction=0.3)
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda ref: pytest.fail("should have skipped"))
    assert prepare_data(cfg) == data
    before = read_meta(data.output_dir)
    with pytest.raises(UserError, match=r"out .*different config \(split_seed\)"):
        prepare_data(cfg.model_copy(update={"split_seed": 7}))
    assert read_meta(data.output_dir) == before


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")

    def boom(self, idx_path):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module.IndexedDatasetBuilder, "finalize", boom)
    with pytest.raises(OSError):
        prepare_data(config(tmp_path, tmp_path / "corpus"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty\.txt: file is empty"),
        ("blank.md", b"  \n\t\n", r"blank\.md: file is empty"),
        ("bin.txt", b"abc\x00def", r"bin\.txt: binary file \(NUL byte at byte offset 3\)"),
        ("latin1.txt", "caf\u00e9 ok".encode("latin-1"), r"latin1\.txt: not valid UTF-8 \(byte offset 3\)"),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("nokey.jsonl", b'{"text": "fine"}\n\n{"body": "x"}\n', r"nokey\.jsonl:3: no non-empty string under key"),
    ],
)
def test_bad_input_file_is_a_user_error_and_writes_nothing(tmp_path, name, content, message):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_data(config(tmp_path, tmp_path / "corpus"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


@pytest.mark.parametrize("input", ["missing", "missing/*.txt", "corpus/*.nothing"])
def test_input_matching_nothing_is_a_user_error(tmp_path, input):
    write_corpus(tmp_path / "corpus")
    with pytest.raises(UserError, match=r"input: '.*(missing|nothing).*' matches no"):
        prepare_data(config(tmp_path, tmp_path / input))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_single_document_is_too_few(tmp_path):
    (tmp_path / "one.txt").write_text("a lone document")
    with pytest.raises(UserError, match=r"one\.txt' has 1 document"):
        prepare_data(config(tmp_path, tmp_path / "one.txt"))
    assert not (tmp_path / "out").exists()


def test_config_validation():
    base = {"input": "x", "tokenizer": "y", "output_dir": "z"}
    for bad in (0, 1, 1.5):
        with pytest.raises(UserError, match="valid_fraction: .*between 0 and 1"):
            build_config(PrepareDataConfig, {**base, "valid_fraction": bad})
    with pytest.raises(UserError, match="nope: unknown key"):
        build_config(PrepareDataConfig, {**base, "nope": 1})


def test_sampler_batches_are_hand_computed_slices(prepared):
    data, _ = prepared
    ds = TokenDataset(data.train_prefix)
    L, B, seed = 8, 3, 5
    sampler = SequenceSampler(ds, seq_length=L, batch_size=B, seed=seed)
    n = (ds.num_tokens - 1) // L
    assert sampler.num_samples == n and n > B
    stream = torch.from_numpy(ds.tokens.astype(np.int64))
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
    it = sampler.batches()
    for step in range(2 * n // B + 1):  # crosses at least one epoch boundary
        batch = next(it)
        assert batch.shape == (B, L + 1) and batch.dtype == torch.int64
        for row, i in zip(batch, order[step * B : (step + 1) * B]):
            assert torch.equal(row, stream[i * L : i * L + L + 1])
    assert sorted(order[:n]) == list(range(n))  # an epoch visits every sample once


def test_sampler_resume_equals_continuing(prepared):
    data, _ = prepared
    ds = TokenDataset(data.train_prefix)
    sampler = SequenceSampler(ds, seq_length=4, batch_size=2, seed=3)
    it = sampler.batches()
    full = [next(it) for _ in range(3 * sampler.num_samples)]  # several epochs
    rows = torch.cat(full)
    for k in (0, 2, 5, sampler.num_samples + 1, 2 * sampler.num_samples):
        resumed = SequenceSampler(ds, seq_length=4, batch_size=2, seed=3).batches(start_sample=k)
        for j in range(4):
            assert torch.equal(next(resumed), rows[k + 2 * j : k + 2 * j + 2])


def test_dp_shards_partition_the_global_batch(prepared):
    data, _ = prepared
    ds = TokenDataset(data.train_prefix)
    B, dp = 2, 3
    whole = SequenceSampler(ds, seq_length=4, batch_size=B * dp, seed=9).batches(start_sample=4)
    ranks = [SequenceSampler(ds, 4, B, seed=9, dp_rank=r, dp_size=dp).batches(start_sample=4) for r in range(dp)]
    for _ in range(10):
        assert torch.equal(torch.cat([next(r) for r in ranks]), next(whole))


def test_sampler_needs_one_sample(prepared):
    data, _ = prepared
    ds = TokenDataset(data.valid_prefix)
    with pytest.raises(UserError, match=r"valid: \d+ tokens, fewer than one sample"):
        SequenceSampler(ds, seq_length=ds.num_tokens, batch_size=1)
    SequenceSampler(ds, seq_length=ds.num_tokens - 1, batch_size=1)


def test_eval_windows_are_consecutive_and_non_overlapping(prepared, tmp_path):
    data, _ = prepared
    ds = TokenDataset(data.train_prefix)
    L = 7
    windows = list(eval_windows(ds, L))
    assert len(windows) == ds.num_tokens // L and all(w.shape == (L,) for w in windows)
    assert torch.cat(windows).tolist() == ds.tokens[: len(windows) * L].tolist()
    assert len(list(eval_windows(ds, L, max_windows=2))) == 2
    with pytest.raises(UserError, match="not enough for one eval window"):
        eval_windows(ds, ds.num_tokens + 1)
    with pytest.raises(UserError, match="missing.bin/.idx: prepared data not found"):
        TokenDataset(str(tmp_path / "missing"))


def test_text_file_tokens(tmp_path, tokenizer):
    path = tmp_path / "eval.txt"
    path.write_text(DOCS["sub/c.txt"])
    tokens = text_file_tokens(path, tokenizer)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == tokenizer(DOCS["sub/c.txt"], add_special_tokens=False)["input_ids"]
    assert [len(w) for w in eval_windows(tokens, 5)] == [5] * (len(tokens) // 5)
    path.write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match=r"eval\.txt: binary file"):
        text_file_tokens(path, tokenizer)


def test_embedded_shakespeare(tmp_path):
    data = prepare_data(PrepareDataConfig(input=CORPUS, tokenizer=TEACHER, output_dir=str(tmp_path / "shk")))
    meta = read_meta(data.output_dir)
    assert meta["train_documents"] and meta["valid_documents"]
    assert len(meta["train_documents"]) + len(meta["valid_documents"]) == 38
    assert data.num_train_tokens > 5 * data.num_valid_tokens > 0
    assert TokenDataset(data.valid_prefix).num_tokens == data.num_valid_tokens
