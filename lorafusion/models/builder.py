"""Build a megatron-core `GPTModel` (or one pipeline chunk of it) from an HF checkpoint directory."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from lorafusion.config import DTYPES
from lorafusion.models.attention import PackedCoreAttention
from lorafusion.models.hf import Architecture, HFWeights, read_architecture
from lorafusion.models.megatron_compat import ensure_model_parallel
from lorafusion.models.rmsnorm import RMSNorm
from lorafusion.models.swiglu import SwiGLU

__all__ = ["transformer_config", "layer_spec", "build_model", "load_hf_weights", "qkv_rows", "fc1_rows",
           "slow_cpu_dtype", "warn_if_slow_on_cpu", "resolve_dtype"]

# CPU flags (Linux /proc/cpuinfo) of the instructions torch's 16-bit matrix products need to be fast; without
# them it falls back to a slow path (bfloat16 2048x2048 products: 0.3 GFLOP/s on an AVX2-only AMD EPYC, where
# float32 runs at ~95, and ~700 on an EPYC with avx512_bf16).
_NATIVE_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def slow_cpu_dtype(dtype: torch.dtype, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """Why `dtype` would compute slowly on this CPU (a message naming the missing instructions and the fix),
    or None: float32, a CPU with the instructions, or no /proc/cpuinfo to tell."""
    needed = _NATIVE_FLAGS.get(dtype)
    if needed is None:
        return None
    flags = _cpu_flags(cpuinfo)
    if flags is None or any(flag in flags for flag in needed):
        return None
    lines = Path(cpuinfo).read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "this CPU")
    name = str(dtype).removeprefix("torch.")
    return (f"{name} on {model}: the CPU has none of {', '.join(needed)}, so torch multiplies {name} matrices in a "
            f"slow fallback (hundreds of times slower than float32 on an AVX2-only CPU); use dtype float32 on "
            "this machine (run.dtype: float32)")


def _cpu_flags(cpuinfo: str | Path) -> list[str] | None:
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), None)


def resolve_dtype(name: str, device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> torch.dtype:
    """The compute dtype of run.dtype `name` on `device`: 'auto' is bfloat16 where the hardware multiplies it
    natively (CUDA compute capability 8.0+; a CPU listing avx512_bf16 or amx_bf16), float32 elsewhere (and
    where the CPU cannot be read); any other name is taken as given."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    flags = _cpu_flags(cpuinfo) or []
    return torch.bfloat16 if any(flag in flags for flag in _NATIVE_FLAGS[torch.bfloat16]) else torch.float32


def warn_if_slow_on_cpu(dtype: torch.dtype) -> None:
    """A RuntimeWarning when `dtype` would compute slowly on this CPU (see slow_cpu_dtype)."""
    why = slow_cpu_dtype(dtype)
    if why is not None:
        warnings.warn(why, RuntimeWarning, stacklevel=2)


def transformer_config(arch: Architecture, *, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """megatron's config for `arch`, with every CUDA-only fusion off so CPU and GPU run one path; the MLP's
    activation is the module `layer_spec` gives it (use_te_activation_func is megatron's switch for an activation
    module, Transformer Engine's or, here, our SwiGLU), so use the two together."""
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        use_te_activation_func=True,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is overwritten from the checkpoint
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default "full" only warns that it is deprecated
        pipeline_dtype=dtype,
    )


def layer_spec(rotary_base: float = 10000.0, attention: str = "auto", ffn_hidden_size: int | None = None) -> ModuleSpec:
    """megatron's local layer spec with our packed-sequence core attention, which also applies RoPE (base
    `rotary_base`) at per-token positions, our SwiGLU node as the MLP's activation and our RMSNorm node in both
    norm slots; `attention` picks the attention kernel (see attention.attention_backend). ffn_hidden_size: given
    to the MLP explicitly (megatron warns when it has to take it from the config)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=PackedCoreAttention, params={"rotary_base": rotary_base, "backend": attention})
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    if ffn_hidden_size is not None:
        spec.submodules.mlp.params = {**spec.submodules.mlp.params, "ffn_hidden_size": ffn_hidden_size}
    return spec


def qkv_rows(arch: Architecture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of HF q_proj, k_proj, v_proj: its row in megatron's fused `linear_qkv`.

    megatron groups the fused rows per query group g: [g's q heads, g's k head, g's v head].
    """
    d, per_group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    group_rows = (per_group + 2) * d
    q, k, v = [], [], []
    for g in range(arch.num_kv_heads):
        base = g * group_rows
        q.append(torch.arange(base, base + per_group * d))
        k.append(torch.arange(base + per_group * d, base + (per_group + 1) * d))
        v.append(torch.arange(base + (per_group + 1) * d, base + group_rows))
    return torch.cat(q), torch.cat(k), torch.cat(v)


def fc1_rows(arch: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of HF gate_proj and up_proj in megatron's `linear_fc1` ([gate; up])."""
    f = arch.intermediate_size
    return torch.arange(f), torch.arange(f, 2 * f)


def _fused_qkv(arch: Architecture, weights: HFWeights, prefix: str, suffix: str) -> torch.Tensor:
    q_idx, k_idx, v_idx = qkv_rows(arch)
    parts = [weights.get(f"{prefix}.self_attn.{p}_proj.{suffix}") for p in "qkv"]
    out = torch.empty((len(q_idx) + len(k_idx) + len(v_idx),) + parts[0].shape[1:], dtype=parts[0].dtype)
    for idx, part in zip((q_idx, k_idx, v_idx), parts):
        out[idx] = part
    return out


def _layer_tensors(arch: Architecture, weights: HFWeights, hf_index: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{hf_index}"
    tensors = {
        "input_layernorm.weight": weights.get(f"{prefix}.input_layernorm.weight"),
        "self_attention.linear_qkv.weight": _fused_qkv(arch, weights, prefix, "weight"),
        "self_attention.linear_proj.weight": weights.get(f"{prefix}.self_attn.o_proj.weight"),
        "pre_mlp_layernorm.weight": weights.get(f"{prefix}.post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": torch.cat(
            [weights.get(f"{prefix}.mlp.gate_proj.weight"), weights.get(f"{prefix}.mlp.up_proj.weight")]
        ),
        "mlp.linear_fc2.weight": weights.get(f"{prefix}.mlp.down_proj.weight"),
    }
    if arch.qkv_bias:
        tensors["self_attention.linear_qkv.bias"] = _fused_qkv(arch, weights, prefix, "bias")
    return tensors


def _copy_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    for name, value in tensors.items():
        target = params.get(name)
        if target is None:
            raise ValueError(f"model has no parameter '{where}.{name}' for the checkpoint tensor")
        if target.shape != value.shape:
            raise ValueError(
                f"checkpoint tensor for '{where}.{name}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}; the weights do not match config.json"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def load_hf_weights(model: GPTModel, arch: Architecture, weights: HFWeights) -> None:
    """Copy the checkpoint into `model`, which may be any pipeline chunk (layers by global number)."""
    if model.pre_process:
        _copy_into(model.embedding, {"word_embeddings.weight": weights.get("model.embed_tokens.weight")}, "embedding")
    for layer in model.decoder.layers:
        _copy_into(layer, _layer_tensors(arch, weights, layer.layer_number - 1), f"layer {layer.layer_number - 1}")
    if model.post_process:
        _copy_into(model.decoder, {"final_layernorm.weight": weights.get("model.norm.weight")}, "decoder")
        head = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        if not arch.tie_word_embeddings or not model.pre_process:
            _copy_into(model, {"output_layer.weight": weights.get(head)}, "model")


def build_model(
    checkpoint_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    layers: tuple[int, int] | None = None,
    attention: str = "auto",
) -> tuple[GPTModel, Architecture]:
    """The frozen base model, or one pipeline chunk of it, with the checkpoint's weights.

    layers: the chunk's decoder layers [start, end) in global numbering (default: all). A chunk is built
    as a model of end - start layers whose layers then carry their global numbers, so weights, adapter
    names and adapter seeds follow the global layer and not the chunk's place. attention: the packed
    attention kernel, 'auto' (varlen flash on CUDA, length buckets elsewhere), 'buckets' or 'varlen'.
    """
    arch = read_architecture(checkpoint_dir)
    weights = HFWeights(checkpoint_dir)
    start, end = layers if layers is not None else (0, arch.num_layers)
    if not 0 <= start < end <= arch.num_layers:
        raise ValueError(f"layers={layers} is not a non-empty range inside the model's {arch.num_layers} layers")
    ensure_model_parallel()
    config = transformer_config(arch, dtype=dtype)
    config.num_layers = end - start
    # RoPE is applied by our core attention at per-token positions (megatron's own splits packed rows per sample).
    layer = layer_spec(arch.rope_theta, attention, arch.intermediate_size)
    model = GPTModel(
        config,
        TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=RMSNorm),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="none",
    )
    for i, layer in enumerate(model.decoder.layers):
        layer.layer_number = start + i + 1
    load_hf_weights(model, arch, weights)
    model.requires_grad_(False)
    return model, arch
