"""The planner's view of a model: `ModelShape` and its tensors, whatever they were read from.

In: built by `plan.memory` from a GGUF header, a Hugging Face config or a catalog
entry. Out: one frozen value the planner's arithmetic reads.
The size fields come from `source.config.ModelDims`, shared with `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType

from alpaca_local.source.config import ModelDims


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    ggml_type: GGMLQuantizationType
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ModelShape(ModelDims):
    """The facts about a model the planner needs: its sizes plus where they came from."""

    name: str
    arch: str  # GGUF architecture name, e.g. "llama"
    source: str  # "gguf", "hf" or "catalog"
    file_quant: str | None = None  # the level of a GGUF file, when it is one of LEVELS
    file_tensors: tuple[PlannedTensor, ...] = ()  # that file's tensors in file order
    file_bytes: int | None = None  # that file's size
    file_target: int | None = None  # that file is a per-tensor mix made for this many bytes (convert --target-size)
    header_bytes: tuple[tuple[str, int], ...] = ()  # (level, exact header size) pairs
    rope_freqs: bool = False  # llama3 rope scaling: the file has a rope_freqs tensor (head_dim/2 f32)
    n_swa: int = 0  # tokens a sliding-window layer sees; 0: no sliding-window layers
    swa_pattern: int = 0  # layer il slides when il % swa_pattern < swa_pattern - 1 (SWA_PATTERN)

    def is_swa(self, il: int) -> bool:
        """llama_hparams::is_swa for layer `il` (src/llama-hparams.cpp set_swa_pattern)."""
        return self.n_swa > 0 and il % self.swa_pattern < self.swa_pattern - 1
