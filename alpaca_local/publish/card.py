"""The model card (README.md) of a folder of GGUF levels, written from facts only.

In:  what the run knows (`card_facts`: the plans, the files written and their exact sizes,
     the Hub source and its commit, the adapters merged, the imatrix keys, the license found
     in the source's own card) and, with `convert --card-quality`, the `QualityReport` that
     `quality` computes for those files.
Out: `render_card(facts)`: Markdown with the Hub's metadata front matter (`base_model`,
     `library_name: gguf`, `quantized_by`, `license`, tags), then the files, the measured
     quality, the source, the importance matrix, the prompt format and the license.

Nothing is made up: a figure that was not measured is not in the card, a license the
source does not state is said to be unstated, and a base model is named only when it is a
Hub id we were given or read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from alpaca_local.measure.quality import BASELINE, QualityReport
from alpaca_local.source.tensors import TensorRef
from alpaca_local.template import PREAMBLE, PREAMBLE_WITH_INPUT

# A license id or name we repeat in YAML and Markdown: a plain token (apache-2.0, llama2, other...).
_LICENSE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_SOURCE_CARD = 1 << 20  # a source README larger than this is not read for its license


@dataclass(frozen=True)
class CardLevel:
    quant: str
    files: tuple[str, ...]  # file names in the folder: one, or the split parts in order
    size_bytes: int  # all parts together


@dataclass(frozen=True)
class CardFacts:
    name: str
    arch: str
    n_layer: int
    vocab_size: int
    size_label: str  # general.size_label, e.g. "7B"
    levels: tuple[CardLevel, ...]
    source: str  # a Hub id, or the local folder's name
    source_commit: str | None = None  # the commit converted, for a Hub source
    base_models: tuple[str, ...] = ()  # Hub ids, for the front matter
    adapters: tuple[tuple[str, float, str | None], ...] = ()  # (name, user scale, base it was trained on)
    imatrix: tuple[tuple[str, str | int], ...] = ()  # the quantize.imatrix.* keys written in the files
    own_template: bool = False  # the files carry the source's chat template, not Alpaca's
    exact_route: bool = False  # an f16 source: the bytes are llama.cpp's route's (test_convert.py)
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    quality: QualityReport | None = None
    quality_text: str = ""  # what the quality was measured on
    adapter_files: tuple[tuple[str, int, str], ...] = ()  # (file name, bytes, outtype) of adapter GGUFs
    version: str = ""


def is_hub_id(text: str | None) -> bool:
    return bool(text) and _HUB_ID_RE.match(text) is not None and ".." not in text


def source_license(folder: Path) -> tuple[str | None, str | None, str | None]:
    """(license, license_name, license_link) from the front matter of `folder`/README.md, the
    source's own model card; (None, None, None) when there is none or it cannot be read."""
    from huggingface_hub.repocard import metadata_load

    path = folder / "README.md"
    try:
        if not path.is_file() or path.stat().st_size > MAX_SOURCE_CARD:
            return None, None, None
        meta = metadata_load(path) or {}
    except Exception:  # a malformed card (bad YAML, bad UTF-8) states nothing we can carry over
        return None, None, None
    lic = meta.get("license")
    lic = lic if isinstance(lic, str) and _LICENSE_RE.match(lic) else None
    name = meta.get("license_name")
    name = name if lic == "other" and isinstance(name, str) and _LICENSE_RE.match(name) else None
    link = meta.get("license_link")
    ok_link = isinstance(link, str) and len(link) < 300 and re.match(r"^(https://|LICENSE)[^\s()<>\[\]]*$", link)
    return lic, name, link if lic and ok_link else None


def card_facts(plans, levels, *, source: str, hub=None, quality: QualityReport | None = None,
               quality_text: str = "", license_folder: Path | None = None, adapter_files=()) -> CardFacts:
    """The facts of one `convert --quant ...` run: `plans` (one per level), `levels`
    (`convert.levels.LevelResult`, in the same order), the Hub source if any."""
    import gguf

    from alpaca_local import __version__
    from alpaca_local.template import ALPACA_CHAT_TEMPLATE

    plan = plans[0]
    adapters = tuple((a.name, float(a.user_scale), a.base_name) for a in plan.merge.adapters) if plan.merge else ()
    bases = [hub.hub_id.repo_id] if hub is not None else []
    bases += [b for _, _, b in adapters if is_hub_id(b) and b not in bases]
    lic, lic_name, lic_link = source_license(license_folder) if license_folder is not None else (None, None, None)
    return CardFacts(
        name=plan.name, arch=plan.arch.arch_name, n_layer=plan.config.n_layer, vocab_size=plan.config.vocab_size,
        size_label=gguf.size_label(sum(j.source.n_elements for j in plan.jobs), 0, 0, 0),
        levels=tuple(CardLevel(lv.quant, tuple(p.name for p in lv.paths), lv.file_bytes) for lv in levels),
        source=hub.hub_id.repo_id if hub is not None else source, source_commit=hub.commit if hub is not None else None,
        base_models=tuple(bases), adapters=adapters,
        imatrix=next((p.imatrix_kv for p in plans if p.imatrix_kv), ()),
        own_template=plan.vocab.chat_template != ALPACA_CHAT_TEMPLATE,
        # README "Exact": for an f16 source; BF16/F32 sources are quantized from their own values.
        exact_route=all(j.source.dtype == "F16" for j in plan.jobs if isinstance(j.source, TensorRef)),
        license=lic, license_name=lic_name, license_link=lic_link,
        quality=quality, quality_text=quality_text, version=__version__,
        adapter_files=tuple((r.output.name, r.file_bytes, r.outtype) for r in adapter_files),
    )


def _front_matter(f: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    tags = ["gguf", "llama.cpp", "alpaca-local", f.arch]
    if f.adapters:
        tags.append("lora-merged")
    if f.imatrix:
        tags.append("imatrix")
    data = ModelCardData(
        base_model=list(f.base_models) or None,
        base_model_relation="quantized" if f.base_models and not f.adapters else None,
        library_name="gguf", license=f.license, license_name=f.license_name, license_link=f.license_link,
        pipeline_tag="text-generation", quantized_by="alpaca-local", tags=tags,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 1e9:.2f} GB)" if n >= 1e9 else f"{n:,} bytes ({n / 1e6:.1f} MB)"


def _files_table(f: CardFacts) -> list[str]:
    lines = ["| Level | File | Size |", "|---|---|---:|"]
    for lv in f.levels:
        if len(lv.files) == 1:
            shown = f"[{lv.files[0]}]({lv.files[0]})"
        else:
            shown = f"[{lv.files[0]}]({lv.files[0]}) … {lv.files[-1]} ({len(lv.files)} parts: load the first)"
        lines.append(f"| {lv.quant.upper()} | {shown} | {_size(lv.size_bytes)} |")
    for name, size, outtype in f.adapter_files:
        lines.append(f"| LoRA adapter ({outtype.upper()}) | [{name}]({name}) | {_size(size)} |")
    if f.adapter_files:
        lines += ["", "The LoRA adapter files are the adapters alone, as llama.cpp applies them at run time to a "
                  "GGUF of the base model (`llama-cli -m BASE.gguf --lora FILE`, `alpaca-local chat BASE.gguf --lora "
                  "FILE`); the levels above have them merged in already."]
    return lines


def quality_rows(report: QualityReport, quants: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The card's quality figures for `quants`, formatted from `report` (what `quality --json` prints)."""
    rows = []
    by_label = {lv.quant: lv for lv in report.levels}
    for q in quants:
        lv = by_label.get(q)
        if lv is None:
            continue
        s = lv.stats
        rows.append((q.upper(), f"{lv.bits_per_weight:.2f}", f"{s.perplexity:.4f}", f"{s.ppl_ratio:.4f}",
                     f"{s.mean_kld:.5f}", f"{s.kld_p99:.4f}", f"{100 * s.same_top:.2f}%"))
    return rows


def _quality(f: CardFacts) -> list[str]:
    r = f.quality
    assert r is not None
    baseline = "the F16 file above" if any(lv.quant == BASELINE for lv in f.levels) else \
        "an f16 conversion of the same source (made for the measurement, not published)"
    lines = [
        "## Quality", "",
        f"Measured with `alpaca-local quality` against {baseline}, on {f.quality_text}: {r.n_chunks} chunks of "
        f"{r.n_ctx} tokens, {r.n_scored} scored tokens (the second half of each chunk, as "
        "`llama-perplexity --kl-divergence` scores them). KLD is the mean Kullback-Leibler divergence from "
        "f16's next-token distribution, in nats; same top-1 is how often the most likely token agrees with f16's.",
        "",
        "| Level | Bits/weight | PPL | PPL/f16 | Mean KLD | KLD p99 | Same top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in quality_rows(r, tuple(lv.quant for lv in f.levels))]
    return lines + [""]


def _source(f: CardFacts) -> list[str]:
    if f.source_commit:
        src = f"[{f.source}](https://huggingface.co/{f.source}) at commit `{f.source_commit}`"
    else:
        src = f"`{f.source}` (a local folder)"
    lines = ["## Source", "", f"- Model: {src}",
             f"- Architecture: {f.arch}, {f.n_layer} layers, vocabulary {f.vocab_size:,}, {f.size_label} parameters"]
    for name, scale, base in f.adapters:
        trained = f", trained on `{base}`" if base else ""
        lines.append(f"- LoRA adapter merged in (PEFT `merge_and_unload` arithmetic): `{name}`, scale ×{scale:g}{trained}")
    if f.exact_route:
        route = ("llama.cpp's `convert_hf_to_gguf.py --outtype f16` then `llama-quantize` on PEFT's "
                 "`merge_and_unload()` output" if f.adapters else
                 "llama.cpp's `convert_hf_to_gguf.py --outtype f16` then `llama-quantize`")
        lines.append(f"- Converted with alpaca-local {f.version}; from this f16 source each file has the tensors, "
                     f"types and bytes that {route} gives")
    else:
        lines.append(f"- Converted with alpaca-local {f.version}, quantized from the source's own "
                     "full-precision values (llama.cpp's route would round them to f16 first)")
    return lines + [""]


def _imatrix(f: CardFacts) -> list[str]:
    kv = dict(f.imatrix)
    lines = ["## Importance matrix", "",
             "The quantized levels were made with an importance matrix (as `llama-quantize --imatrix`):", ""]
    for key, label in (("quantize.imatrix.file", "file"), ("quantize.imatrix.dataset", "computed on"),
                       ("quantize.imatrix.entries_count", "entries"), ("quantize.imatrix.chunks_count", "chunks")):
        if key in kv:
            lines.append(f"- {label}: `{kv[key]}`")
    return lines + [""]


def _prompt(f: CardFacts) -> list[str]:
    template = ("The files embed the source's own chat template (`tokenizer.chat_template`), which llama-server, "
                "Ollama and LM Studio apply; `alpaca-local chat` uses the Alpaca format above unless given "
                "`--template model`." if f.own_template else
                "The files embed this format as their chat template (`tokenizer.chat_template`), so llama-server, "
                "Ollama and LM Studio apply it too.")
    return [
        "## Prompt format", "",
        "Stanford Alpaca (the format alpaca-local chats in):", "",
        "```", PREAMBLE, "", "### Instruction:", "{instruction}", "", "### Response:", "```", "",
        "With an input:", "",
        "```", PREAMBLE_WITH_INPUT, "", "### Instruction:", "{instruction}", "", "### Input:", "{input}", "",
        "### Response:", "```", "",
        template, "",
    ]


def _use(f: CardFacts) -> list[str]:
    first = f.levels[0].files[0]
    return ["## Use", "", "```sh", f"alpaca-local chat {first}", f"llama-cli -m {first}",
            f"llama-server -m {first}", "```", ""]


def _license(f: CardFacts) -> list[str]:
    if f.license is None:
        text = ("The source does not state a license in its model card; the source model's own terms apply "
                "to these files.")
    else:
        named = f" ({f.license_name})" if f.license_name else ""
        link = f", see {f.license_link}" if f.license_link else ""
        text = f"`{f.license}`{named}, carried over from the source's model card{link}."
    return ["## License", "", text, ""]


def render_card(f: CardFacts) -> str:
    lines = [f"# {f.name} GGUF", "",
             f"GGUF files of {f.source} for llama.cpp and the tools built on it (llama-cpp-python, Ollama, "
             "LM Studio), one per quantization level.", "",
             "## Files", "", *_files_table(f), ""]
    if f.quality is not None:
        lines += _quality(f)
    lines += _source(f)
    if f.imatrix:
        lines += _imatrix(f)
    lines += _prompt(f) + _use(f) + _license(f)
    return _front_matter(f) + "\n" + "\n".join(lines)


def write_card(folder: Path, text: str, force: bool) -> Path:
    """README.md in `folder`, written whole or not at all."""
    from alpaca_local.convert.atomic import atomic_write, check_target

    target = folder / "README.md"
    check_target(target, force)
    with atomic_write(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
