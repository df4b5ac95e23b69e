"""Combining several adapters' full updates: TIES and DARE, as task arithmetic defines them.

Every adapter i gives a task vector per tensor, its full update ΔWᵢ = Wᵢ − W0 (what merging it
alone would change, whatever its family), and the merged tensor is W0 + combine(ΔW₁..ΔWₙ).
The definitions are those of peft's ``utils/merge_utils.py`` (which peft applies to LoRA factors
in ``add_weighted_adapter``), applied here to the full updates:

- ``ties``: keep the ``density`` fraction of each ΔWᵢ with the largest magnitudes (top-k, k =
  int(density·numel)); elect each element's sign as the sign of Σᵢ ΔWᵢ (after trimming, before
  weighting; ties to +); W0 + Σᵢ wᵢ·ΔWᵢ·[sign agrees] / max(1, #agreeing).
- ``dare_linear``: drop each element of ΔWᵢ with probability 1 − density and rescale the kept
  ones by 1/density; W0 + Σᵢ wᵢ·ΔWᵢ.
- ``dare_ties``: the DARE drop-and-rescale, then the TIES sign election and disjoint mean.

DARE's masks are drawn from ``torch.Generator().manual_seed(dare_seed(seed, i, name))``, one per
adapter and tensor (``torch.bernoulli`` of a tensor filled with ``density``), so a run is
reproducible and does not depend on the order tensors are processed in.
"""
from __future__ import annotations

import hashlib

from stages.findings import FuseError

METHODS = ("linear", "ties", "dare_linear", "dare_ties")


def check_method(method: str, density, seed, n_adapters: int) -> float | None:
    """Validate the merge method's parameters (F103); returns the density to use."""
    if method not in METHODS:
        raise FuseError("F103", f"merge method must be one of {', '.join(METHODS)}, got {method!r}", key="method")
    if method == "linear":
        return None
    if density is None:
        raise FuseError("F104", f"method {method} needs density (the fraction of each update to keep, in (0, 1])",
                        key="density", fix="add e.g. density: 0.5")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise FuseError("F103", f"density must be in (0, 1], got {density!r}", key="density")
    if method.startswith("dare") and (seed is None or isinstance(seed, bool) or not isinstance(seed, int)):
        raise FuseError("F104", f"method {method} drops update elements at random and needs an integer seed",
                        key="seed", fix="add e.g. seed: 0 (the same seed gives the same model)")
    return float(density)


def dare_seed(seed: int, adapter: int, name: str) -> int:
    """The generator seed of adapter ``adapter``'s DARE mask on tensor ``name``."""
    digest = hashlib.sha256(f"{seed}/{adapter}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def magnitude_prune(delta, density: float):
    """Keep the int(density·numel) largest-magnitude elements (peft ``magnitude_based_pruning``)."""
    import torch

    if density >= 1:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = True
    return delta * mask.reshape(delta.shape)


def random_prune(delta, density: float, seed: int):
    """Drop elements with probability 1 − density, rescale the rest by 1/density (peft ``random_pruning``)."""
    import torch

    if density >= 1:
        return delta
    generator = torch.Generator().manual_seed(seed)
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def combine(method: str, deltas: list, weights: list[float], density: float, seed: int | None, name: str,
            adapters: list[int]):
    """The combined update of ``deltas`` (float32, one per adapter that changes tensor ``name``)."""
    import torch

    if method in ("ties", "dare_ties", "dare_linear"):
        if method == "ties":
            deltas = [magnitude_prune(d, density) for d in deltas]
        else:
            deltas = [random_prune(d, density, dare_seed(seed, i, name)) for d, i in zip(deltas, adapters)]
    if method == "dare_linear":
        total = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights):
            total.add_(d * w)
        return total
    # TIES sign election and disjoint mean, accumulated adapter by adapter (no n x tensor stack)
    elected = torch.zeros_like(deltas[0])
    for d in deltas:
        elected.add_(d)
    elected = torch.where(elected >= 0, 1.0, -1.0)
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        agrees = d.sign() == elected
        total.add_(torch.where(agrees, d * w, 0.0))
        count.add_(agrees.float())
    return total / count.clamp(min=1.0)
