"""LoRA adapters on the backbone while gates train (peft), switched off for the teacher, merged at the end."""

from __future__ import annotations

import torch

from gateskip.errors import GateSkipError


def attach_lora(net, rank: int):
    """Inject rank-``rank`` LoRA adapters (peft) into every attention and MLP projection of ``net``; returns it."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise GateSkipError("backbone=lora needs peft: pip install 'gateskip[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    inject_adapter_in_model(config, net)
    return net


class LoraDisabled:
    """Context: LoRA layers of ``net`` switched off (teacher = the original backbone)."""

    def __init__(self, net):
        self.layers = [] if net is None else [m for m in net.modules() if hasattr(m, "disable_adapters")
                                             and hasattr(m, "lora_A")]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


@torch.no_grad()
def merge_lora(net, _peft_model) -> dict:
    """Fold LoRA into the base weights; return the deltas (``lora.<module>.A/B``) for the gates file."""
    tensors = {}
    for name, m in list(net.named_modules()):
        if not (hasattr(m, "lora_A") and hasattr(m, "base_layer")) or "default" not in m.lora_A:
            continue
        a = m.lora_A["default"].weight.detach().float()
        b = m.lora_B["default"].weight.detach().float() * m.scaling["default"]
        base = m.base_layer
        base.weight += (b @ a).to(base.weight.dtype)
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = a, b
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, base)
    return tensors
