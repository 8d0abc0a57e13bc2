"""The general-English corpus: Jane Austen's novels read from Debian's r-cran-janeaustenr without R."""

from __future__ import annotations

import re

import pytest

from nemo_minitron import embedded
from nemo_minitron.data.rdata import lazyload_vectors
from nemo_minitron.errors import UserError

# Chapters of each novel in its published editions (Emma and Mansfield Park count across their volumes).
CHAPTERS = {"sense-and-sensibility": 50, "pride-and-prejudice": 61, "mansfield-park": 48, "emma": 55,
            "northanger-abbey": 31, "persuasion": 24}


@pytest.fixture(scope="module")
def novels():
    return lazyload_vectors(embedded.janeaustenr_data_dir())


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def test_r_data_holds_the_six_novels(novels):
    assert sorted(novels) == sorted([*embedded.AUSTEN_NOVELS, *embedded.AUSTEN_HELD_OUT_NOVEL])
    assert all(isinstance(line, str) for lines in novels.values() for line in lines)
    pride = novels["prideprejudice"]
    assert pride[0] == "PRIDE AND PREJUDICE"
    assert " ".join(pride[9:11]) == ("It is a truth universally acknowledged, that a single man in possession "
                                     "of a good fortune, must be in want of a wife.")
    assert novels["persuasion"][0] == "Persuasion"
    # R's own package test: Persuasion has fewer lines than Emma.
    assert len(novels["persuasion"]) < len(novels["emma"])


def test_chapters_keep_every_word_in_order(novels):
    for name, folder in {**embedded.AUSTEN_NOVELS, **embedded.AUSTEN_HELD_OUT_NOVEL}.items():
        chapters = embedded.split_chapters(novels[name])
        assert len(chapters) == CHAPTERS[folder], folder
        assert all(re.search(r"^(CHAPTER|Chapter) [0-9IVXLC]+$", c, re.MULTILINE) for c in chapters)
        assert _words("\n".join(chapters)) == _words("\n".join(novels[name]))


def test_embedded_austen_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_MINITRON_CACHE", str(tmp_path))
    train = embedded.resolve_path(embedded.AUSTEN)
    held_out = embedded.resolve_path(embedded.AUSTEN_HELD_OUT)
    assert sorted(p.name for p in train.iterdir()) == sorted(embedded.AUSTEN_NOVELS.values())
    assert [p.name for p in held_out.iterdir()] == ["persuasion"]
    for root in (train, held_out):
        for novel in root.iterdir():
            assert len(list(novel.glob("chapter-*.txt"))) == CHAPTERS[novel.name]
    # Written once: a second resolution reuses the folder.
    stamp = (train / "emma" / "chapter-001.txt").stat().st_mtime_ns
    assert embedded.resolve_path(embedded.AUSTEN) == train
    assert (train / "emma" / "chapter-001.txt").stat().st_mtime_ns == stamp


def test_unknown_embedded_names_the_corpora():
    with pytest.raises(UserError, match="embedded:austen-persuasion"):
        embedded.resolve_path("embedded:austin")


def test_damaged_r_data_is_one_line(tmp_path):
    source = embedded.janeaustenr_data_dir()
    for name in ("Rdata.rdx", "Rdata.rdb"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    (tmp_path / "Rdata.rdb").write_bytes((source / "Rdata.rdb").read_bytes()[:50_000])
    with pytest.raises(UserError, match=r"Rdata.rdb:\w+: cannot decompress the R data"):
        lazyload_vectors(tmp_path)
    (tmp_path / "Rdata.rdx").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read the R data"):
        lazyload_vectors(tmp_path)
