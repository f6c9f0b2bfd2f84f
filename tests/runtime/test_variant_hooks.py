"""The variant interface's optimizer hooks, through a variant defined here (registered once per session):
transform_grads sees the job's complete gradient before its norm; after_step runs after every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import lorafusion as lf
from lorafusion.adapters import get_variant, register_adapter, registered_names
from lorafusion.adapters.lora import LoRAConfig, LoRALayer

CALLS: list[tuple[str, int, int]] = []  # (hook, layer index, step or call count)


@dataclass(kw_only=True)
class FrozenAConfig(LoRAConfig):
    """LoRA whose A never trains (its gradient hook zeroes it); records its hooks."""

    type: ClassVar[str] = "test_frozen_a"


class FrozenALayer(LoRALayer):
    def transform_grads(self) -> None:
        assert self.lora_A.grad is not None and self.lora_B.grad is not None
        CALLS.append(("transform", self.layer_index, 0))
        self.lora_A.grad.zero_()

    def after_step(self, step: int) -> None:
        CALLS.append(("after", self.layer_index, step))


def _register() -> None:
    if "test_frozen_a" not in registered_names():
        register_adapter(name="test_frozen_a", config_cls=FrozenAConfig, layer_cls=FrozenALayer)


def test_gradient_and_after_step_hooks(train_checkpoint, examples_data, tmp_path):
    _register()
    assert get_variant("test_frozen_a").layer_cls is FrozenALayer
    CALLS.clear()
    spec = lf.JobSpec(name="f", dataset=str(examples_data / "arith.jsonl"), global_batch_size=4, max_steps=3,
                      adapter=FrozenAConfig(rank=2, target_modules=["q_proj"]), learning_rate=1e-2)
    run = lf.RunConfig(base_model=str(train_checkpoint), output_dir=str(tmp_path / "run"), progress=False,
                       dtype="float32", engine="local", max_tokens_per_microbatch=64)  # several microbatches/step
    from runtime.fit import fit

    fit([spec], run)
    transforms = [c for c in CALLS if c[0] == "transform"]
    afters = [c for c in CALLS if c[0] == "after"]
    assert len(transforms) == 3 * 2  # once per step and layer, not per microbatch
    assert sorted(afters) == sorted(("after", layer, step) for layer in (0, 1) for step in (1, 2, 3))
    from safetensors.torch import load_file

    from lorafusion.adapters.lora import kaiming_a
    from lorafusion.adapters.base import layer_generator

    tensors = load_file(str(tmp_path / "run" / "f" / "adapter" / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.equal(a, kaiming_a(2, a.shape[1], layer_generator(0, 0, "q_proj")))  # A's gradient was zeroed
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0
