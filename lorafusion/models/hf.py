"""Read an HF checkpoint directory (or an HF Hub id's, see lorafusion.hub): its architecture (config.json) and its
weights (*.safetensors).

Supported families: Llama, Qwen2 (q/k/v bias) and Mistral — all RMSNorm + SwiGLU + RoPE + GQA.
Everything a checkpoint could get wrong is reported here, before a model is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lorafusion.hub import local_model_dir

__all__ = ["Architecture", "read_architecture", "HFWeights", "SUPPORTED_ARCHITECTURES", "expected_shapes"]

# HF `architectures[0]` -> family name; q/k/v bias is the only structural difference among them.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """The shape of a Llama-style decoder, in HF terms."""

    family: str
    """'llama', 'mistral' or 'qwen2'."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None = None
    eos_token_id: int | None = None


def _config_path(checkpoint_dir: Path) -> Path:
    if not checkpoint_dir.is_dir():
        raise ValueError(
            f"base model '{checkpoint_dir}' is not a directory; point base_model at an HF checkpoint "
            "directory holding config.json, *.safetensors and tokenizer.json, or give an HF Hub id (org/name)"
        )
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise ValueError(
            f"checkpoint '{checkpoint_dir}' has no config.json; point base_model at an HF checkpoint "
            "directory (config.json, *.safetensors, tokenizer.json)"
        )
    return path


def _rope_theta(cfg: dict) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise ValueError(
            f"config.json rope_parameters.rope_type={rope_type!r} is not supported yet; "
            "only plain RoPE ('default') checkpoints can be trained"
        )
    return float(theta)


def _first_id(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def read_architecture(checkpoint_dir: str | Path) -> Architecture:
    """Parse and check `config.json`; raise ValueError naming the field and the fix."""
    path = _config_path(local_model_dir(checkpoint_dir))
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); restore the checkpoint's config.json") from err
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: architectures={archs!r} is not supported; supported are "
            f"{sorted(SUPPORTED_ARCHITECTURES)} (a Llama-style decoder checkpoint)"
        )
    if cfg.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling={cfg['rope_scaling']!r} is not supported yet; use a plain-RoPE checkpoint")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ValueError(f"{path}: field '{key}'={cfg.get(key)!r} must be a positive integer")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    family = SUPPORTED_ARCHITECTURES[arch]
    return Architecture(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=_first_id(cfg.get("bos_token_id")),
        eos_token_id=_first_id(cfg.get("eos_token_id")),
    )


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a Llama-style checkpoint of this architecture."""
    h, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h), f"{p}.mlp.down_proj.weight": (h, f),
        }
        if arch.qkv_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                       f"{p}.self_attn.v_proj.bias": (kv,)}
    return shapes


class HFWeights:
    """Lazy access to the tensors of a checkpoint's safetensors files, by HF name."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.directory = local_model_dir(checkpoint_dir)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"checkpoint '{self.directory}' has no *.safetensors files; convert the weights to "
                "safetensors (e.g. save_pretrained(..., safe_serialization=True))"
            )
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}  # read from the headers once, nothing loaded
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        self._where[name] = file
                        self._shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{file}: unreadable safetensors file ({err}); re-download or re-save it") from err

    def check(self, arch: Architecture) -> None:
        """Every tensor the architecture needs is present with its shape; ValueError naming the first that is not."""
        for name, expected in expected_shapes(arch).items():
            found = self._shapes.get(name)
            if found != expected:
                what = "is missing" if found is None else f"has shape {found}"
                raise ValueError(
                    f"checkpoint '{self.directory}': tensor '{name}' {what}, config.json implies {expected}; "
                    "the weights do not match config.json"
                )

    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name`; ValueError naming the file set when it is missing."""
        if name not in self._where:
            raise ValueError(
                f"checkpoint '{self.directory}' lacks tensor '{name}'; the weights do not match config.json"
            )
        with safe_open(str(self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)
