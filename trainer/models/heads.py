"""Classification heads kept apart from the encoders, re-initialised at every clustering iteration."""

from __future__ import annotations

import torch
from torch import nn

from xdctools.errors import ConfigError


class LinearHead(nn.Linear):
    """B×dim features -> B×k logits over pseudo-labels (or classes when finetuning)."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__(dim, k)
        self.reset_()

    def reset_(self, generator: torch.Generator | None = None) -> None:
        """Fresh N(0, 0.01) weights and zero bias: cluster ids are a new permutation every iteration."""
        with torch.no_grad():
            nn.init.normal_(self.weight, 0.0, 0.01, generator=generator)
            nn.init.zeros_(self.bias)


class MultiHead(nn.Module):
    """Several linear heads on one feature vector; MDC trains {"own": k_own, "other": k_other}.

    `forward` returns a dict name -> B×k logits, in the order of `ks`.
    """

    def __init__(self, dim: int, ks: dict[str, int]) -> None:
        super().__init__()
        if not ks:
            raise ConfigError("MultiHead: needs at least one head, got an empty dict")
        self.heads = nn.ModuleDict({name: LinearHead(dim, k) for name, k in ks.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(x) for name, head in self.heads.items()}

    def reset_(self, names: list[str] | None = None, generator: torch.Generator | None = None) -> None:
        """Re-initialise the named heads (all by default)."""
        for name in self.heads if names is None else names:
            self.heads[name].reset_(generator)


class Classifier(nn.Module):
    """An encoder (anything with `forward_features`) followed by a head; used for finetuning."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.head(self.encoder.forward_features(x))
