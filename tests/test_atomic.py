"""Result files are replaced atomically: a failure mid-write keeps the previous file whole."""

import json
import os

import pytest

from speed_train import atomic


def test_write_json_round_trip_and_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic.write_json(tmp_path / "r.json", {"a": 1, "b": [1.5, "x"]})
    finally:
        os.umask(old)
    assert json.loads(p.read_text()) == {"a": 1, "b": [1.5, "x"]}
    assert p.read_text().endswith("}\n")
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_failure_mid_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "results.md"
    p.write_text("old table\n")

    def half_then_crash(fh):
        fh.write("new ta")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a signal in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(p, half_then_crash)
    assert p.read_text() == "old table\n"
    assert [q.name for q in tmp_path.iterdir()] == ["results.md"]


def test_unserialisable_json_does_not_touch_the_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"kept": true}\n')
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic.write_json(p, {"x": object()})
    assert json.loads(p.read_text()) == {"kept": True}


def test_failed_rename_removes_temp(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"

    def no_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic.write_text(p, "x")
    assert list(tmp_path.iterdir()) == []


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    # json.dumps writes bare NaN / Infinity, which strict JSON readers (jq, JavaScript) refuse
    p = atomic.write_json(
        tmp_path / "r.json", {"loss": float("nan"), "steps": [1.0, float("inf"), -float("inf")], "t": (2.5,)}
    )
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict == {"loss": None, "steps": [1.0, None, None], "t": [2.5]}
