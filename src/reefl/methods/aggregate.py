"""Server-side merging of client updates that cover different subsets of the parameters, and
the FedAdam server optimiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def weighted_mean_per_key(
    global_state: dict[str, torch.Tensor],
    updates: list[tuple[dict[str, torch.Tensor], int]],
) -> dict[str, torch.Tensor]:
    """For every parameter, the example-weighted mean over the updates that hold it.

    A parameter that no update holds keeps its global value. Updates are summed in the order
    given (callers sort them) so that the result is bit-for-bit reproducible.
    """
    merged = dict(global_state)
    for key, value in global_state.items():
        holders = [(state[key], n) for state, n in updates if key in state]
        total = sum(n for _, n in holders)
        if total == 0:
            continue
        acc = torch.zeros_like(value, dtype=torch.float64)
        for tensor, n in holders:
            acc += tensor.to(torch.float64) * (n / total)
        merged[key] = acc.to(value.dtype)
    return merged


def leading_region(shape: torch.Size | tuple[int, ...], within: torch.Size | tuple[int, ...]
                   ) -> tuple[slice, ...]:
    """The index ``[:s0, :s1, ...]`` of the leading block of ``shape`` inside a tensor of
    shape ``within``; raises if ``shape`` does not fit (other rank, or larger anywhere)."""
    if len(shape) != len(within) or any(s > w for s, w in zip(shape, within, strict=True)):
        raise ValueError(f"shape {tuple(shape)} does not fit inside {tuple(within)}")
    return tuple(slice(0, s) for s in shape)


def slice_to(tensor: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The first channels of ``tensor`` along every dimension: ``tensor[:s0, :s1, ...]``
    (a width-scaled sub-model's view of a global tensor; dimensions that are not scaled
    keep their full size)."""
    return tensor[leading_region(shape, tensor.shape)]


def sliced_mean(
    global_state: dict[str, torch.Tensor],
    updates: list[tuple[dict[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Element-wise weighted mean over the updates whose tensor covers each element.

    An update's tensor may be smaller than the global one: it covers the leading block
    (``slice_to``'s region). Every element becomes Σ w_i·x_i / Σ w_i over the updates that
    cover it; an element nobody covers keeps its global value. With weight 1 per update this
    is the count-based average of HeteroFL and ScaleFL; with full-size tensors and example
    weights it equals ``weighted_mean_per_key``. Sums run in float64, in the order given.
    """
    merged = dict(global_state)
    for key, value in global_state.items():
        holders = [(state[key], weight) for state, weight in updates if key in state]
        if not holders:
            continue
        acc = torch.zeros_like(value, dtype=torch.float64)
        total = torch.zeros_like(value, dtype=torch.float64)
        for tensor, weight in holders:
            region = leading_region(tensor.shape, value.shape)
            acc[region] += tensor.to(torch.float64) * weight
            total[region] += weight
        covered = total > 0
        mean = acc / torch.where(covered, total, torch.ones_like(total))
        merged[key] = torch.where(covered, mean, value.to(torch.float64)).to(value.dtype)
    return merged


@dataclass(frozen=True)
class AdamHyperParams:
    """FedAdam's server hyper-parameters; defaults are docs/method.md §6's (InclusiveFL)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    tau: float = 1e-6


def fedadam_step(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 hp: AdamHyperParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FedAdam server step on one tensor (Reddi et al., ICLR 2021, Algorithm 2); returns
    the new (weight, m, v). ``delta`` is the pseudo-gradient (aggregate − weight):

        m ← β1·m + (1 − β1)·Δ,   v ← β2·v + (1 − β2)·Δ²,   w ← w + η·m / (√v + τ)

    with m and v starting at zero. As in the paper there is no bias correction (Flower's
    FedAdam strategy adds one), so the first step moves w by η·(1−β1)/√(1−β2) ≈ 3.16·η·sign(Δ).
    """
    m = hp.beta1 * m + (1 - hp.beta1) * delta
    v = hp.beta2 * v + (1 - hp.beta2) * delta * delta
    return weight + hp.lr * m / (v.sqrt() + hp.tau), m, v


class FedAdam:
    """FedAdam's server optimiser over a state dict: keeps m and v per parameter name across
    rounds (one instance lives on the server for the whole run)."""

    def __init__(self, hp: AdamHyperParams | None = None) -> None:
        self.hp = hp or AdamHyperParams()
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]
             ) -> dict[str, torch.Tensor]:
        """``state`` with every parameter in ``deltas`` moved by one FedAdam step. Parameters
        without a delta this round (nobody returned them) keep their value, and their moments
        are left as they are rather than decayed."""
        stepped = dict(state)
        for key, delta in deltas.items():
            m, v = self.moments.get(key, (torch.zeros_like(delta), torch.zeros_like(delta)))
            stepped[key], m, v = fedadam_step(state[key], delta, m, v, self.hp)
            self.moments[key] = (m, v)
        return stepped

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments, as ``m/<name>`` and ``v/<name>`` (what a checkpoint saves)."""
        return {f"{kind}/{key}": tensor for key, pair in self.moments.items()
                for kind, tensor in zip("mv", pair, strict=True)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Moments from ``state_dict``'s output (replacing any there are)."""
        names = sorted({name[2:] for name in tensors})
        self.moments = {name: (tensors[f"m/{name}"], tensors[f"v/{name}"]) for name in names}
