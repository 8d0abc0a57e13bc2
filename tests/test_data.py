"""The data stage: prepare_data on a tiny corpus (and once on Shakespeare), sampler, eval windows, errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from nemo_minitron.config import build_config
from nemo_minitron.data import (
    BlendComponent,
    BlendedSampler,
    DataSource,
    PrepareDataConfig,
    SequenceSampler,
    TokenDataset,
    blend_weights,
    eval_windows,
    heldout_sets,
    load_tokenizer,
    prepare_data,
    text_file_tokens,
    train_sampler,
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
    """meta.json, plus each split's document names (from its listing file) under ``{split}_documents``."""
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "valid"):
        assert f"{split}_documents" not in meta  # no per-document list in what every rank reads
        lines = (out / prepare_module.documents_file(split)).read_text().splitlines()
        meta[f"{split}_documents"] = [json.loads(line) for line in lines]
        assert meta[f"num_{split}_documents"] == len(lines)
    return meta


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

    def valid_names(names, seed):
        _, is_valid = prepare_module.split_rule(iter(names), 0.3, seed)
        return {n for n in names if is_valid(n)}

    assert valid_names(names, 1) == valid_names(names[::-1], 1)
    assert valid_names(names, 1) != valid_names(names, 2)


def document_tokens(data) -> dict[str, list[int]]:
    """Document name -> its token ids (EOS included), read back through the .idx document boundaries."""
    meta, out = read_meta(data.output_dir), {}
    for split, prefix in (("train", data.train_prefix), ("valid", data.valid_prefix)):
        indexed = IndexedDataset(prefix)
        assert len(indexed) == len(meta[f"{split}_documents"])
        out.update({name: indexed[i].tolist() for i, name in enumerate(meta[f"{split}_documents"])})
    return out


def test_two_workers_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 60)  # many chunks, so both workers take some
    one = prepare_data(config(tmp_path, tmp_path / "corpus", "one", valid_fraction=0.3))
    two = prepare_data(config(tmp_path, tmp_path / "corpus", "two", valid_fraction=0.3, num_workers=2))
    files = sorted(p.name for p in one.output_dir.iterdir())
    assert files == sorted(p.name for p in two.output_dir.iterdir()) and "meta.json" in files
    for name in files:
        one_bytes, two_bytes = (one.output_dir / name).read_bytes(), (two.output_dir / name).read_bytes()
        if name == "meta.json":  # which differs by the output folder it names only
            one_bytes = one_bytes.replace(b'/one"', b'/two"')
        assert one_bytes == two_bytes, name
    # The number of workers is no part of the result: either reuses the other's folder.
    assert prepare_data(config(tmp_path, tmp_path / "corpus", "one", valid_fraction=0.3, num_workers=3)) == one


def test_gzip_and_jsonl_inputs_give_the_same_tokens_as_plain_files(tmp_path, tokenizer):
    texts = write_corpus(tmp_path / "plain")
    (tmp_path / "plain" / "notes.csv").unlink()
    for path in (tmp_path / "plain").rglob("*.*"):
        target = tmp_path / "gz" / path.relative_to(tmp_path / "plain")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_name(target.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    (tmp_path / "gz" / "ignored.gz.txt.bak").write_text("not a corpus file")
    (tmp_path / "records").mkdir()
    records = [json.dumps({"text": texts[name]}) for name in sorted(DOCS)]
    (tmp_path / "records" / "r.jsonl.gz").write_bytes(gzip.compress("\n".join(records).encode()))

    plain = document_tokens(prepare_data(config(tmp_path, tmp_path / "plain", "p")))
    zipped = document_tokens(prepare_data(config(tmp_path, tmp_path / "gz", "g")))
    assert {n.replace(".txt.gz", ".txt").replace(".md.gz", ".md").replace(".jsonl.gz", ".jsonl"): ids
            for n, ids in zipped.items()} == plain
    jsonl = document_tokens(prepare_data(config(tmp_path, tmp_path / "records", "r")))
    assert {f"r.jsonl.gz:{i}": plain[name] for i, name in enumerate(sorted(DOCS), 1)} == jsonl
    eos = tokenizer.eos_token_id
    assert all(plain[n] == tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for n, t in texts.items())


# mtime=0: the same bytes (and test ids) in every process that collects them (pytest -n).
@pytest.mark.parametrize("name, content, message", [
    ("trunc.txt.gz", gzip.compress(b"some text", mtime=0)[:-6], r"trunc\.txt\.gz: not a valid gzip file"),
    ("plain.jsonl.gz", b'{"text": "not compressed"}', r"plain\.jsonl\.gz: not a valid gzip file"),
    ("bad.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n', mtime=0),
     r"bad\.jsonl\.gz: not valid UTF-8 \(byte offset 28\)"),
])
def test_bad_gzip_input_is_a_user_error(tmp_path, name, content, message):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare_data(config(tmp_path, tmp_path / "corpus"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


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


# ---------------------------------------------------------------------------------------------- blends

def fake_prepared(root: Path, name: str, first_id: int, train_tokens: int, valid_tokens: int = 40,
                  vocab_size: int = 49152) -> str:
    """A prepared dataset whose train split is ids ``first_id, first_id + 1, ...`` (so a sample tells which
    component it came from: its first token // 1000) and whose valid split continues them."""
    out = root / name
    out.mkdir(parents=True)
    for split, start, count in (("train", first_id, train_tokens), ("valid", first_id + train_tokens, valid_tokens)):
        builder = IndexedDatasetBuilder(str(out / f"{split}.bin"), dtype=np.uint16)
        builder.add_item(torch.arange(start, start + count))
        builder.end_document()
        builder.finalize(str(out / f"{split}.idx"))
    meta = {"tokenizer": "t", "vocab_size": vocab_size, "eos_id": 0, "dtype": "uint16",
            "num_train_tokens": train_tokens, "num_valid_tokens": valid_tokens}
    (out / "meta.json").write_text(json.dumps(meta))
    return str(out)


def greedy_blend(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """Megatron's blending rule, written out: position i goes to argmax_c w_c * max(i, 1) - taken_c (first on
    a tie) and takes that component's next sample."""
    w = [x / sum(weights) for x in weights]
    taken = [0] * len(w)
    which, index = [], []
    for i in range(size):
        errors = [w[c] * max(i, 1) - taken[c] for c in range(len(w))]
        c = errors.index(max(errors))
        which.append(c)
        index.append(taken[c])
        taken[c] += 1
    return which, index


@pytest.fixture()
def blend(tmp_path):
    # Different sizes, so the components run through their epochs at different times.
    paths = [fake_prepared(tmp_path, "a", 1000, 97), fake_prepared(tmp_path, "b", 2000, 41),
             fake_prepared(tmp_path, "c", 3000, 230)]
    return [BlendComponent(weight=w, path=p) for w, p in zip((5.0, 3.0, 2.0), paths)]


def test_blend_follows_megatron_greedy_rule_and_component_orders(blend):
    L, seed, n = 4, 11, 600
    sampler = train_sampler(blend, seq_length=L, batch_size=1, seed=seed)
    assert isinstance(sampler, BlendedSampler)
    which, index = greedy_blend([5, 3, 2], n)
    for c, comp in enumerate(blend):
        own = SequenceSampler(TokenDataset(f"{comp.path}/train"), L, 1, seed=sampler.components[c].seed)
        assert own.seed == int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
        for k in [k for k in range(n) if which[k] == c]:
            assert np.array_equal(sampler.sample(k), own.sample(index[k]))
    # Each component's samples are its own stream: ids from its range, seq_length + 1 consecutive ones.
    rows = np.stack([sampler.sample(k) for k in range(n)]).astype(np.int64)
    assert ((rows // 1000 - 1) == np.asarray(which)[:, None]).all()
    assert (np.diff(rows, axis=1) == 1).all()


@pytest.mark.parametrize("weights", [(5.0, 3.0, 2.0), (0.01, 0.01, 0.98), (1.0, 1.0, 1.0)])
def test_blend_proportions_match_the_weights(blend, weights):
    blend = [c.model_copy(update={"weight": w}) for c, w in zip(blend, weights)]
    B, steps = 8, 1250  # 10,000 samples
    batches = train_sampler(blend, seq_length=4, batch_size=B, seed=3).batches()
    component = torch.cat([next(batches)[:, 0] // 1000 - 1 for _ in range(steps)]).numpy()
    n, p = len(component), np.asarray(weights) / sum(weights)
    counts = np.bincount(component, minlength=3)
    assert (np.abs(counts - n * p) <= 4 * np.sqrt(n * p * (1 - p))).all(), (counts, n * p)
    # Much tighter than binomial: the greedy rule keeps every prefix within a sample or two of its share.
    prefix = np.cumsum(np.eye(3)[component], axis=0)
    assert np.abs(prefix - np.arange(1, n + 1)[:, None] * p).max() < 2


def test_blend_resume_mid_blend_equals_continuing(blend):
    B = 3
    rows = torch.cat([b for b, _ in zip(train_sampler(blend, 4, B, seed=5).batches(), range(200))])
    # 600 samples: component b (41 train tokens: 10 samples) goes through its epochs many times.
    for k in (0, 1, 7, 100, 301, 599 - 4 * B):
        resumed = train_sampler(blend, 4, B, seed=5).batches(start_sample=k)
        for j in range(4):
            assert torch.equal(next(resumed), rows[k + j * B : k + (j + 1) * B])


def test_blend_dp_shards_are_disjoint_and_cover_the_global_batch(blend):
    B, dp, start = 2, 3, 10
    sampler = train_sampler(blend, 4, B * dp, seed=9)
    whole = sampler.batches(start_sample=start)
    ranks = [train_sampler(blend, 4, B, seed=9, dp_rank=r, dp_size=dp).batches(start_sample=start)
             for r in range(dp)]
    positions = []
    for step in range(20):
        shards = [next(r) for r in ranks]
        assert torch.equal(torch.cat(shards), next(whole))
        positions += [start + step * B * dp + r * B + j for r in range(dp) for j in range(B)]
    # The ranks' positions in the global order: disjoint, and every position of the 20 global batches once.
    assert sorted(positions) == list(range(start, start + 20 * B * dp))


def test_blend_of_one_is_the_dataset_alone(blend):
    alone = train_sampler(blend[0].path, 4, 2, seed=1).batches()
    as_blend = train_sampler([blend[0]], 4, 2, seed=1).batches()
    plain = SequenceSampler(TokenDataset(f"{blend[0].path}/train"), 4, 2, seed=1).batches()
    for _ in range(30):
        expected = next(plain)
        assert torch.equal(next(alone), expected) and torch.equal(next(as_blend), expected)


def test_heldout_sets_are_per_component(blend):
    sets = heldout_sets(blend, seq_length=8, max_windows=3)
    assert [str(h.path) for h in sets] == [c.path for c in blend]
    assert [h.weight for h in sets] == pytest.approx([0.5, 0.3, 0.2])
    for h, comp in zip(sets, blend):
        valid = TokenDataset(f"{comp.path}/valid")  # held while windows are copied out of its memory map
        expected = list(eval_windows(valid, 8, 3))
        assert len(h.windows) == 3 and all(torch.equal(a, b) for a, b in zip(h.windows, expected))
    (single,) = heldout_sets(blend[1].path, seq_length=8)
    assert single.weight == 1.0 and len(single.windows) == 40 // 8


def test_blend_components_must_be_prepared_alike(tmp_path, blend):
    other = fake_prepared(tmp_path, "big_vocab", 4000, 50, vocab_size=32000)
    with pytest.raises(UserError, match=r"data: .*big_vocab and .*a were tokenized differently \(vocab_size"):
        train_sampler([*blend, BlendComponent(weight=1, path=other)], 4, 1)
    with pytest.raises(UserError, match=r"data: .*nowhere is not a prepared dataset"):
        heldout_sets([*blend, BlendComponent(weight=1, path=str(tmp_path / "nowhere"))], 4)


def test_data_source_config():
    from pydantic import Field

    from nemo_minitron.config import StrictModel

    class Stage(StrictModel):
        data: DataSource = Field()

    assert Stage(data="d").model_dump() == {"data": "d"}  # one path dumps as it always did
    both = build_config(Stage, {"data": [{"weight": 0.7, "path": "a"}, {"weight": 0.3, "path": "b"}]})
    assert blend_weights(both.data) == [("a", 0.7), ("b", 0.3)]
    over = build_config(Stage, {"data": "x"}, ["data=[{weight: 3, path: a}, {weight: 1, path: b}]"])
    assert blend_weights(over.data) == [("a", 0.75), ("b", 0.25)]
    for bad, message in [
        ("", "data.path: String should have at least 1 character"),
        ([], "data.blend: List should have at least 1 item"),
        ({"weight": 1, "path": "a"}, "data.blend: Input should be a valid list"),
        ([{"weight": 0, "path": "a"}], "data.blend.0.weight: Input should be greater than 0"),
        ([{"weight": 1, "path": "a", "w": 2}], "data.blend.0.w: unknown key"),
        ([{"weight": 1, "path": "a"}, {"weight": 2, "path": "a"}], "a is listed twice"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            build_config(Stage, {"data": bad})


def test_eval_scores_each_blend_component_on_its_own(tmp_path):
    from nemo_minitron.evaluation.config import EvalConfig
    from nemo_minitron.evaluation.stage import evaluate
    from tiny import write_tiny_hf

    model = str(write_tiny_hf(tmp_path / "tiny"))
    paths = [fake_prepared(tmp_path, "x", 10, 50, valid_tokens=60, vocab_size=256),
             fake_prepared(tmp_path, "y", 100, 50, valid_tokens=90, vocab_size=256)]
    base = dict(model=model, backend="hf", seq_length=8, micro_batch_size=2, max_windows=5)
    alone = [evaluate(EvalConfig(**base, data=p)) for p in paths]
    assert all(r.components == [] for r in alone) and alone[0].loss != alone[1].loss
    blend = [{"weight": 3.0, "path": paths[0]}, {"weight": 1.0, "path": paths[1]}]
    result = evaluate(EvalConfig(**base, data=blend, output=str(tmp_path / "eval.json")))
    assert [c.path for c in result.components] == paths
    assert [c.weight for c in result.components] == [0.75, 0.25]
    for comp, single in zip(result.components, alone):
        assert (comp.loss, comp.tokens, comp.windows) == (single.loss, single.tokens, single.windows)
    assert result.loss == pytest.approx(0.75 * alone[0].loss + 0.25 * alone[1].loss, rel=1e-12)
    assert result.windows == 10 and result.tokens == 10 * 7
    written = json.loads((tmp_path / "eval.json").read_text())
    assert [c["loss"] for c in written["components"]] == [c.loss for c in result.components]
