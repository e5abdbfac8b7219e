"""Per-parameter aggregation over the clients that hold each parameter (docs/method.md §4)."""

from __future__ import annotations

import torch

from reefl.methods.aggregate import weighted_mean_per_key


def test_three_tiers_hand_example() -> None:
    # Global model: a shared tensor, a block only tiers 1–2 hold, a block only tier 2 holds,
    # and one nobody sends.
    global_state = {"shared": torch.tensor([0.0, 0.0]), "mid": torch.tensor([9.0]),
                    "deep": torch.tensor([9.0]), "idle": torch.tensor([7.0])}
    tier0 = ({"shared": torch.tensor([1.0, 2.0])}, 10)
    tier1 = ({"shared": torch.tensor([4.0, 8.0]), "mid": torch.tensor([1.0])}, 30)
    tier2 = ({"shared": torch.tensor([10.0, 0.0]), "mid": torch.tensor([5.0]),
              "deep": torch.tensor([3.0])}, 60)
    merged = weighted_mean_per_key(global_state, [tier0, tier1, tier2])
    # shared: (10·[1,2] + 30·[4,8] + 60·[10,0]) / 100 = [7.3, 2.6]
    torch.testing.assert_close(merged["shared"], torch.tensor([7.3, 2.6]))
    # mid: (30·1 + 60·5) / 90 = 3.6667
    torch.testing.assert_close(merged["mid"], torch.tensor([11.0 / 3.0]))
    torch.testing.assert_close(merged["deep"], torch.tensor([3.0]))
    torch.testing.assert_close(merged["idle"], torch.tensor([7.0]))
    assert global_state["mid"].item() == 9.0  # the input is not modified
