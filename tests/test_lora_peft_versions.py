"""Every PEFT release we claim: what it saves, we merge as it merges (issue 22).

Each release in tests/peft_versions.py VERSIONS runs in its own venv: it makes the
adapters of CASES with its own `get_peft_model(...).save_pretrained(...)` and merges them
with its own `merge_and_unload()`. Our `convert BASE --lora ADAPTER` at F16 must then equal,
byte for byte, the reference converter's F16 file of that release's merged model, as in
tests/test_lora_merge.py for the pinned release (where numpy's and torch's BLAS add in different
orders, a rare value may be one F16 step off: reference.lora_mismatches). Without a release's venv the test skips
locally (`python tests/peft_versions.py build` makes them); in CI a skip is a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import peft_versions as pv
import reference
import tinymodels
from alpaca_local.convert.pipeline import convert
from alpaca_local.source.adapter import read_adapter

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodels.build_llama(tmp_path_factory.mktemp("base") / "tiny-base", hidden=64, intermediate=128).path


@pytest.mark.parametrize("version", list(pv.VERSIONS))
def test_merge_equals_that_releases_merge(version: str, base: Path, tmp_path: Path) -> None:
    python = pv.venv_python(version)
    if python is None:
        pytest.skip(f"no venv for PEFT {version}: run `python tests/peft_versions.py build {version}`")
    cases = pv.cases_for(version)
    made = pv.make_fixtures(python, base, tmp_path / "made", cases)
    refs = {case: tmp_path / f"{case}.ref.f16.gguf" for case in cases}
    pv.reference_f16_files(reference.vendor_dir(), [(made[case][1], refs[case]) for case in cases])
    differ = {}
    for case, (adapter, _) in made.items():
        ours = convert(base, tmp_path / f"{case}.ours.f16.gguf", "f16", adapters=[read_adapter(adapter)]).output
        a, b = reference.tensor_table(ours), reference.tensor_table(refs[case])
        assert a.keys() == b.keys(), case
        bad = reference.lora_mismatches(a, b)
        if bad:
            differ[case] = bad[:3]
    assert not differ, f"PEFT {version}: tensors differ from its own merge: {differ}"
