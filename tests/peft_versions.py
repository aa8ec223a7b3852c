"""PEFT releases side by side: each saves adapters, and merges them, in its own venv.

In: VERSIONS, the PEFT releases we claim (the oldest supported, the one the test extra
pins, the newest on PyPI), each with a transformers it works with, and CASES, the
LoraConfig settings that each release must save in a layout we merge as it does.
Out:
  python tests/peft_versions.py build [VERSION ...]
      a venv per version in ~/.cache/alpaca-local/peft-<version> (or $ALPACA_PEFT_VENVS):
      the test extra's CPU torch, that peft and that transformers; rebuilt only when the
      spec changes (the stamp file holds it). About 40 s of CPU each (torch's CPU wheel
      comes from the local wheel directory); the pinned release uses the running python.
  make_fixtures(python, base, out, cases)
      runs tests/peft_adapters.py in that venv: out/<case>/adapter is that release's
      `get_peft_model(...).save_pretrained(...)`, out/<case>/merged its
      `merge_and_unload()`, saved as a Hugging Face folder for the reference converter.
The test is tests/test_lora_peft_versions.py; without the venvs it skips (in CI a skip
fails, so `make ci` builds them first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"  # the test extra's pin; pip finds the CPU wheel
# version -> the transformers it is tested with (what was current when it was released,
# for the pinned one the test extra's own). transformers 5.25 asks for a `kernels` release
# (>=0.19.1) that our package index lacks, so the newest PEFT runs on 5.24.
VERSIONS: dict[str, str] = {
    "0.14.0": "transformers==4.48.3",  # the oldest we claim
    "0.18.1": "transformers==4.57.6",  # pinned in pyproject.toml's test extra
    "0.21.2": "transformers==5.24.0",  # the newest on PyPI
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = 515  # the tiny base has 513 rows: a fine-tune that adds <|im_start|> and <|im_end|>
# case -> (first PEFT release that has it, make_adapter keyword arguments)
CASES: dict[str, tuple[str, dict]] = {
    "plain": ("0.0", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "patterns": ("0.0", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"v_proj": 2},
                             alpha_pattern={"up_proj": 32})),
    "embedding_resized": ("0.0", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                      modules_to_save=["lm_head"], vocab_rows=ROWS)),
    "modules_to_save_resized": ("0.0", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"], vocab_rows=ROWS)),
    "dora_rslora_resized": ("0.0", dict(r=8, lora_alpha=16, use_dora=True, use_rslora=True,
                                        target_modules=ALL_LINEAR, modules_to_save=["embed_tokens", "lm_head"],
                                        vocab_rows=ROWS)),
    # LoraConfig.trainable_token_indices came with PEFT 0.15
    "trainable_tokens_resized": ("0.15.0", dict(r=4, lora_alpha=8, target_modules=["q_proj"], vocab_rows=ROWS,
                                                trainable_token_indices={"embed_tokens": [513, 514],
                                                                         "lm_head": [514, 3]})),
}


def cache_root() -> Path:
    return Path(os.environ.get("ALPACA_PEFT_VENVS") or Path.home() / ".cache" / "alpaca-local")


def _spec(version: str) -> list[str]:
    return [TORCH, f"peft=={version}", VERSIONS[version], "sentencepiece", "safetensors"]


def _folder(version: str) -> Path:
    return cache_root() / f"peft-{version}"


def _this_python_has(version: str) -> bool:
    """The running interpreter already has that peft and transformers (the test extra's pins)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("peft") == version and f"transformers=={installed('transformers')}" == VERSIONS[version]
    except PackageNotFoundError:
        return False


def venv_python(version: str) -> Path | None:
    """A python with that peft: this one for the pinned release, else its venv when it is
    built with today's spec; None when there is none."""
    if _this_python_has(version):
        return Path(sys.executable)
    folder = _folder(version)
    stamp = folder / "installed.json"
    try:
        ok = json.loads(stamp.read_text()) == _spec(version)
    except (OSError, ValueError):
        ok = False
    python = folder / "bin" / "python"
    return python if ok and python.is_file() else None


def build(version: str) -> Path:
    """Create (or reuse) the venv of `version`."""
    python = venv_python(version)
    if python is not None:
        return python
    folder = _folder(version)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
    # --no-compile: byte-compiling torch's files was half the build's time; imports compile what they use
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--progress-bar", "off",
                    "--no-compile", *_spec(version)], check=True)
    (folder / "installed.json").write_text(json.dumps(_spec(version)))
    return folder / "bin" / "python"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def cases_for(version: str) -> list[str]:
    return [name for name, (since, _) in CASES.items() if _release(version) >= _release(since)]


def make_fixtures(python: Path, base: Path, out: Path, cases: list[str]) -> dict[str, tuple[Path, Path]]:
    """case -> (adapter folder, PEFT-merged folder), both written by the PEFT in `python`'s venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(python), str(Path(__file__)), "_make", str(base), str(out), *cases],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{python} could not make the adapters:\n{proc.stderr[-3000:]}")
    return {case: (out / case / "adapter", out / case / "merged") for case in cases}


_CONVERT_MANY = """
import runpy, sys
from pathlib import Path
vendor, *pairs = sys.argv[1:]
sys.path.insert(0, vendor)
sys.path.insert(1, str(Path(vendor) / "gguf-py"))
for src, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [str(Path(vendor) / "convert_hf_to_gguf.py"), src, "--outtype", "f16", "--outfile", out]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def reference_f16_files(vendor: Path, jobs: list[tuple[Path, Path]]) -> None:
    """convert_hf_to_gguf.py --outtype f16 for each (merged folder, output) in one process,
    which imports torch and transformers once instead of once a folder (~5 s each)."""
    args = [str(x) for job in jobs for x in job]
    proc = subprocess.run([sys.executable, "-c", _CONVERT_MANY, str(vendor), *args], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"reference converter failed:\n{proc.stderr[-3000:]}")


def _make(base: Path, out: Path, cases: list[str]) -> None:
    """Inside the version's venv: each case's adapter and that PEFT's merge of it."""
    sys.path.insert(0, str(Path(__file__).parent))
    import peft_adapters as pa

    for case in cases:
        kwargs = dict(CASES[case][1])
        rows = kwargs.get("vocab_rows")
        adapter = pa.make_adapter(base, out / case / "adapter", **kwargs)
        pa.peft_merged(base, [adapter], out / case / "merged", vocab_rows=rows)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_make"]:
        _make(Path(argv[1]), Path(argv[2]), argv[3:])
        return 0
    if argv[:1] == ["build"]:
        for version in argv[1:] or list(VERSIONS):
            if version not in VERSIONS:
                print(f"PEFT {version} is not one of {', '.join(VERSIONS)}", file=sys.stderr)
                return 2
            print(f"PEFT {version}: {build(version)}")
        return 0
    print("usage: python tests/peft_versions.py build [VERSION ...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
