"""The critic: the base model's transformer with a scalar value head (ORZ: initialised from the same
pretrained weights as the actor, not shared; the head has no bias and starts random)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel


class Critic(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str | None = None) -> Critic:
        backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn_implementation)
        critic = cls(backbone, backbone.config.hidden_size)
        head = Path(path) / "value_head.safetensors"
        if head.exists():
            critic.value_head.load_state_dict(load_file(str(head)))
        return critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, L]: V at position j is the value of the state after reading tokens ≤ j (packed sequences:
        no mask, position ids restarting at each sequence)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.value_head(hidden).squeeze(-1).clone()  # not a view: FSDP2 hooks its outputs for backward

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """HF backbone plus `value_head.safetensors`; `state_dict` (the critic's full, unsharded state, as
        learner/parallel.py gathers it under FSDP) overrides the module's own tensors."""
        path = Path(path)
        state = state_dict if state_dict is not None else self.state_dict()
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("value_head."): v.contiguous() for k, v in state.items() if k.startswith("value_head.")}
        self.backbone.save_pretrained(path, state_dict=backbone, safe_serialization=True)
        save_file(head, str(path / "value_head.safetensors"))
