"""tests/compat.py's verdict on two `pip freeze`s (the check `make compat` runs, issue 22)."""

from __future__ import annotations

from compat import changes


def test_a_downgrade_or_a_removal_fails_and_an_upgrade_is_reported():
    before = {"huggingface-hub": "2.4.0", "numpy": "2.4.6", "torch": "2.13.0+cpu", "rich": "14.0.0"}
    after = {"huggingface-hub": "0.36.2", "numpy": "2.4.6", "torch": "2.13.0+cpu", "rich": "15.0.0", "gguf": "0.19.0"}
    assert changes(before, after) == (["huggingface-hub 2.4.0 -> 0.36.2"], ["rich 14.0.0 -> 15.0.0"])
    assert changes(before, {k: v for k, v in after.items() if k != "numpy"})[0][-1] == "numpy 2.4.6 -> removed"
    assert changes(before, before) == ([], [])
