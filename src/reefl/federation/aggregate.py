"""Server-side merging of client updates that cover different subsets of the parameters."""

from __future__ import annotations

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
