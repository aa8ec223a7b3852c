"""Mixture-of-experts facts for the planner: which weights `--n-cpu-moe N` keeps in RAM
(convert.cpu_repack's rule, which the runtime applies too), the MoE feed-forward's moment of
the compute buffer, and the expert copy a CUDA op offload needs.

In: a `ModelShape` (n_expert > 0) and planned tensors. Out: small pure answers that
`plan.memory` folds into its buffers. Line numbers refer to the llama.cpp tree vendored in
llama-cpp-python 0.3.36.
"""

from __future__ import annotations

from alpaca_local.convert.cpu_repack import expert_override_patterns, kept_on_cpu  # noqa: F401 (the planner's names)
from alpaca_local.plan.shape import ModelShape, PlannedTensor


def ffn_floats(shape: ModelShape, n_kv: int) -> int:
    """Floats per token alive at the largest moment of a MoE layer's feed-forward
    (build_moe_ffn, src/llama-graph.cpp:2007-2330), as ggml-alloc packs them on the CPU.

    Routed experts: up, gate and their SwiGLU, each [n_ff_exp, n_expert_used]; the router's
    logits and probabilities (n_expert each); 3 widths of n_embd; and the graph inputs that
    live throughout (the KQ mask, n_kv, and the K/V row indices, 2 x n_embd_k_gqa).
    Qwen2-MoE's shared expert runs after them (src/models/qwen2moe.cpp:145-165): its up, gate
    and SwiGLU of n_ff_shexp, with 4 widths of n_embd, plus the routed experts' output
    [n_embd, n_expert_used] unless ggml-alloc reuses its block (it does when the shared
    expert's rows are no wider). Calibrated against llama.cpp's CPU "compute buffer size"
    on 14 shapes (tests/test_plan_moe.py); exact there to 2 floats per token.
    """
    h, used = shape.hidden, shape.n_expert_used
    inputs = n_kv + 2 * shape.n_kv_gqa + 2 * shape.n_expert
    routed = 3 * shape.expert_ff * used + 3 * h + inputs + 5
    if not shape.n_ff_shexp:
        return routed
    sh = shape.n_ff_shexp
    shared = 3 * sh + 4 * h + (h * used if sh > h * used else 0) + inputs + 7
    return max(routed + 2, shared)


def attention_extra_floats(shape: ModelShape) -> int:
    """Floats per token a MoE model adds to the attention moment of the compute buffer.

    Qwen2-MoE only: ggml-alloc's high-water mark there holds what the previous layer's
    routed experts left (their [n_embd, n_expert_used] output less one width, the router's
    probabilities and weights), since the shared expert runs after them and the blocks are
    not reused in between. Calibrated as ffn_floats is (0 for qwen3moe and Mixtral's llama).
    """
    if not shape.n_ff_shexp:
        return 0
    return shape.hidden * (shape.n_expert_used - 1) + 2 * shape.n_expert + shape.n_expert_used


def offload_copy_bytes(cpu_weights: list[PlannedTensor], n_tokens: int, alloc_size) -> int:
    """The largest weight the CUDA backend copies into its compute buffer to run a host-weight
    op itself: the scheduler hands an op on a CPU weight to a higher-priority backend that
    wants it (ggml-backend.cpp:966-975, op_offload true by default: src/llama-context.cpp:3787),
    which CUDA does from a batch of 32 tokens (GGML_OP_OFFLOAD_MIN_BATCH,
    ggml-cuda.cu:5636-5654, 5825: ne[2] of a MUL_MAT_ID, ne[1] of a MUL_MAT). The weight is
    copied in as the split's input (ggml-backend.cpp:1375-1394), and every such weight starts a
    new split so the copies reuse one block (:1325-1340): the buffer grows by the largest one.
    Decoding (1 token) runs those ops on the CPU instead, reading the experts in RAM.
    """
    if n_tokens < 32 or not cpu_weights:
        return 0
    return max(alloc_size(t) for t in cpu_weights)
