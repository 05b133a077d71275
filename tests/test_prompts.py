import json
import os
import sys

import pytest

from nitrofusion.data.prompts import PromptStats, open_prompts
from nitrofusion.errors import ConfigError, NitroFusionError


def _write_txt(path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_txt_skips_and_counts_bad_lines(tmp_path):
    f = tmp_path / "p.txt"
    _write_txt(f, [b"\xef\xbb\xbfa red fox\n", b"\n", b"   \n", b"x" * 11 + b"\n", b"\xff\xfe bad\n",
                   b"  caf\xc3\xa9 at night \r\n", b"last line without newline"])
    src = open_prompts(str(f), max_chars=25)
    assert list(src) == ["a red fox", "xxxxxxxxxxx", "café at night", "last line without newline"]
    assert src.stats == PromptStats(used=4, empty=2, overlong=0, undecodable=1)
    src = open_prompts(str(f), max_chars=10)
    assert list(src) == ["a red fox"]
    assert src.stats == PromptStats(used=1, empty=2, overlong=3, undecodable=1)
    assert src.stats.summary() == "1 prompt (skipped: 2 empty, 3 overlong, 1 undecodable)"
    assert src.count() == 1


def test_summary_and_stats_reset_each_pass(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n\nb\n")
    src = open_prompts(str(f))
    assert list(src) == ["a", "b"] and list(src) == ["a", "b"]
    assert src.stats.summary() == "2 prompts (skipped: 1 empty)"
    assert PromptStats(used=3).summary() == "3 prompts"


def test_line_without_newline_is_not_held_whole(tmp_path):
    # Far over the read cap (4*max_chars + slack): skipped as overlong, and the next line still read.
    f = tmp_path / "p.txt"
    f.write_bytes(b"y" * 200_000 + b"\nshort\n")
    src = open_prompts(str(f), max_chars=10)
    assert list(src) == ["short"] and src.stats.overlong == 1


def test_take_wraps_cyclically_and_matches_iteration(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("".join(f"p{i}\n" for i in range(7)) + "\n")
    src = open_prompts(str(f))
    every = list(src)
    assert src.count() == 7
    cyc = lambda i: every[i % 7]
    for start, n in [(0, 3), (3, 3), (6, 3), (9, 20), (100, 1), (2, 0), (5, 7), (0, 7), (7, 7)]:
        assert src.take(start, n) == [cyc(i) for i in range(start, start + n)], (start, n)
    # Sequential takes (resumed from the last position) agree with fresh ones.
    got = [p for k in range(10) for p in src.take(4 * k, 4)]
    assert got == [cyc(i) for i in range(40)]
    with pytest.raises(NitroFusionError, match=">= 0"):
        src.take(-1, 2)


def test_take_sees_a_changed_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\n")
    src = open_prompts(str(f))
    assert src.take(0, 2) == ["a", "b"]
    f.write_text("x\ny\nz\nw\n")
    os.utime(f, ns=(1, 1))  # a distinct mtime even on coarse-clock filesystems
    assert src.take(2, 3) == ["z", "w", "x"]
    assert src.count() == 4


def test_csv_default_explicit_and_unknown_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes(b'id,caption,note\n1,"a cat, sitting",n1\n2,,n2\n3\n4,"two\nlines",n4\n5,caf\xff,n5\n')
    src = open_prompts(str(f))
    assert list(src) == ["a cat, sitting", "two\nlines"]
    assert src.stats == PromptStats(used=2, empty=2, undecodable=1)
    assert list(open_prompts(str(f), column="note")) == ["n1", "n2", "n4", "n5"]
    with pytest.raises(ConfigError, match="'nope' not in .*available: id, caption, note"):
        open_prompts(str(f), column="nope")
    g = tmp_path / "q.csv"
    g.write_text("id,url\n1,u\n")
    with pytest.raises(ConfigError, match="available: id, url"):
        open_prompts(str(g))


def test_tsv_picks_first_default_column(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("text\tPrompt\nfrom text\tfrom prompt\n")
    assert list(open_prompts(str(f))) == ["from prompt"]  # "prompt" beats "text", case-insensitively


def test_jsonl_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": "a dog", "n": 1}), "{not json", json.dumps({"other": "x"}), "",
             json.dumps({"prompt": 5}), json.dumps(["a list"]), json.dumps({"prompt": " a cat "})]
    f.write_text("\n".join(lines) + "\n")
    src = open_prompts(str(f))
    assert list(src) == ["a dog", "a cat"]
    assert src.stats == PromptStats(used=2, empty=2, undecodable=3)
    assert list(open_prompts(str(f), column="other")) == ["x"]
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps({"url": "u"}) + "\n")
    with pytest.raises(ConfigError, match="available: url"):
        open_prompts(str(g))


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"id": [1, 2, 3], "caption": ["a", "", "c"]}).save_to_disk(str(one))
    src = open_prompts(str(one))
    assert list(src) == ["a", "c"] and src.stats.empty == 1
    assert src.take(1, 3) == ["c", "a", "c"]
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["v1", "v2"]})}).save_to_disk(str(both))
    assert list(open_prompts(str(both), split="validation")) == ["v1", "v2"]
    with pytest.raises(ConfigError, match="split 'test' not in .*available: train, validation"):
        open_prompts(str(both), split="test")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NitroFusionError, match="not one written by datasets save_to_disk"):
        open_prompts(str(tmp_path / "plain"))


def test_datasets_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    for spec in (str(tmp_path), "hf:someone/prompts@main"):
        with pytest.raises(NitroFusionError, match=r"pip install 'nitrofusion\[datasets\]'"):
            open_prompts(spec)


def test_empty_source_error(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\n  \n\xff\n" + b"z" * 50 + b"\n")
    src = open_prompts(str(f), max_chars=10)
    msg = f"prompt source {f} has no usable prompts \\(2 empty, 1 overlong, 1 undecodable\\)"
    with pytest.raises(NitroFusionError, match=msg):
        list(src)
    for call in (src.count, lambda: src.take(0, 1)):
        with pytest.raises(NitroFusionError, match="no usable prompts"):
            call()
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(NitroFusionError, match="no usable prompts \\(it is empty\\)"):
        open_prompts(str(tmp_path / "e.txt")).count()


def test_missing_and_bad_specs(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(NitroFusionError, match="prompt source not found: .*nope.txt; give a .txt/.csv/.jsonl"):
        open_prompts(missing)
    with pytest.raises(ConfigError, match="no prompt source given"):
        open_prompts("")
    with pytest.raises(ConfigError, match="no dataset name"):
        open_prompts("hf:")
    with pytest.raises(ConfigError, match="max_chars"):
        open_prompts(missing, max_chars=0)
    f = tmp_path / "p.txt"
    f.write_text("a\n")
    with pytest.raises(ConfigError, match="drop the column option"):
        open_prompts(str(f), column="prompt")


def test_identity_changes_with_the_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    src = open_prompts(str(f))
    first = src.identity()
    assert first == src.identity() == open_prompts(str(f)).identity()
    assert str(f.resolve()) in first and first.startswith("text:")
    f.write_text("a\nbb\n")
    os.utime(f, ns=(1, 1))
    assert src.identity() != first
    assert open_prompts(str(f), max_chars=5).identity() != src.identity()
    c = tmp_path / "p.csv"
    c.write_text("prompt,caption\nx,y\n")
    assert open_prompts(str(c)).identity() != open_prompts(str(c), column="caption").identity()
