"""Resume markers and results are written atomically: an interrupted write leaves the previous file whole."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nas.cache import write_json

NAS = Path(__file__).resolve().parents[2] / "nas"


def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch):
    """The write dies half-way (disk full, a kill): the target still holds the old, complete JSON."""
    target = tmp_path / "block_0" / "done.json"
    write_json(target, {"ratings": [1, 2, 3]})
    real_write_text = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"ratings": [4, 5, 6, 7]})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"ratings": [1, 2, 3]}


def test_default_serialises_what_json_cannot(tmp_path):
    write_json(tmp_path / "config.json", {"out_dir": tmp_path}, default=str)
    assert json.loads((tmp_path / "config.json").read_text()) == {"out_dir": str(tmp_path)}


def test_no_nas_module_writes_json_in_place():
    """Every JSON file of the searches (done markers, teachers, ground truth, architectures, results) goes through
    write_json; a plain ``path.write_text(json.dumps(...))`` can leave half a marker that a resume then misreads."""
    in_place = re.compile(r"\.write_text\(\s*json\.dumps\(")
    offenders = [f"{path.relative_to(NAS.parent)}:{number}"
                 for path in sorted(NAS.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if in_place.search(line) and path.name != "cache.py"]
    assert offenders == []
