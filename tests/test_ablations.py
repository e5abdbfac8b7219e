"""ReeFL's ablation switches (exit module, maximum mode, held-out dynamic teacher) and the
training loop's generic method hooks (held-out CE, penalty, per-client state)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reefl.config import RunConfig
from reefl.data import held_out_split
from reefl.data.federated import FederatedData
from reefl.data.spec import DataSpec, Split
from reefl.federation.tiers import client_tier, tier_of
from reefl.methods import TaskSpec, build_method
from reefl.methods.losses import HeldOutTeacher
from reefl.models import PerExitHeads, Ree
from reefl.training import held_out_exit_ce, train_locally

LN3 = math.log(3.0)
# Two exits, label 0: exit 0 [0, 0] -> p0 = [0.5, 0.5], CE0 = 0.693147;
# exit 1 [ln 3, 0] -> p1 = [0.75, 0.25], CE1 = 0.287682.
# KL(p0 ‖ p1) = 0.5·ln(0.5/0.75) + 0.5·ln 2 = 0.143841 (exit 0 teaching exit 1)
LOGITS = [torch.tensor([[0.0, 0.0]]), torch.tensor([[LN3, 0.0]])]
LABELS = torch.tensor([0])
CE0, CE1, KL_01 = 0.693147, 0.287682, 0.143841
SMALL = {"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 2, "num-heads": 2,
         "num-exits": 2, "local-epochs": 1, "batch-size": 4}
TASK = TaskSpec(num_classes=3, in_chans=1)


def _method(**overrides):
    return build_method(RunConfig.from_flat({**SMALL, **overrides}), TASK)


def _loader(n: int, batch_size: int = 4, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


# -- maximum mode ---------------------------------------------------------------------------
def test_maximum_mode_makes_every_client_the_deepest_tier() -> None:
    cfg = RunConfig.from_flat({"num-clients": 8, "num-exits": 4, "maximum": True})
    assert [tier_of(i, cfg) for i in range(8)] == [3] * 8
    assert client_tier(5, cfg, {}) == 3
    assert client_tier(5, cfg, {"tier": 1}) == 3  # overrides a device's own tier too
    ratios = RunConfig.from_flat({"num-clients": 8, "num-exits": 4, "maximum": True,
                                  "tier-rule": "ratios", "tier-ratios": "4,3,2,1"})
    assert {tier_of(i, ratios) for i in range(8)} == {3}


# -- exit-module ----------------------------------------------------------------------------
def test_exit_module_heads_replaces_ree_by_one_head_per_exit() -> None:
    ree, heads = _method(), _method(**{"exit-module": "heads"})
    assert isinstance(ree.build_model(1).exits, Ree)
    model = heads.build_model(1)
    assert isinstance(model.exits, PerExitHeads) and len(model.exits.heads) == 2
    assert not any("meta_token" in k for k in heads.trainable_keys(1))
    # modulation has nothing to act on: both settings build the same computation
    torch.manual_seed(0)
    on = heads.build_model(1).eval()
    torch.manual_seed(0)
    off = _method(**{"exit-module": "heads", "modulation": False}).build_model(1).eval()
    x = torch.randn(2, 1, 8, 8)
    for a, b in zip(on(x), off(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- dynamic: teacher from held-out CE --------------------------------------------------------
def test_dynamic_teacher_is_the_lowest_held_out_ce_not_the_training_ce() -> None:
    method = _method(distillation="dynamic")
    assert method.held_out_fraction == 0.2
    assert _method().held_out_fraction == 0.0
    calls = iter([[0.4, 0.9], [1.2, 0.3]])  # held-out CE of exits 0, 1 at steps 1 and 2
    state = method.new_loss_state(lambda: next(calls))
    # step 1: training CE favours exit 1, held-out CE exit 0 -> exit 0 teaches exit 1
    loss, _ = method.local_loss(LOGITS, LABELS, 300, state)
    assert loss.item() == pytest.approx(CE0 + CE1 + KL_01, abs=1e-5)
    # step 2: held-out favours exit 1 -> KL(p1 ‖ p0) = 0.130812
    loss, _ = method.local_loss(LOGITS, LABELS, 300, state)
    assert loss.item() == pytest.approx(CE0 + CE1 + 0.130812, abs=1e-5)
    assert HeldOutTeacher(lambda: [0.5, 0.5, 0.7]).update([9.0, 9.0, 9.0]) == 0  # tie: shallower
    with pytest.raises(ValueError, match="held-out"):
        method.new_loss_state()


def test_held_out_ce_cycles_through_batches_without_gradients() -> None:
    method = _method()
    torch.manual_seed(0)
    model = method.build_model(1).train()
    loader = _loader(6, batch_size=4)  # batches of 4 and 2 examples
    next_ce = held_out_exit_ce(model, loader, method.cfg, torch.device("cpu"))
    batches = list(loader)
    with torch.no_grad():
        expected = [[torch.nn.functional.cross_entropy(z, y).item() for z in model(x)]
                    for x, y in batches]
    got = [next_ce() for _ in range(3)]
    assert got[0] == pytest.approx(expected[0]) and got[1] == pytest.approx(expected[1])
    assert got[2] == pytest.approx(expected[0])  # back to the first batch
    assert model.training and all(p.grad is None for p in model.parameters())


def test_held_out_split_is_seeded_disjoint_and_fixed_across_rounds() -> None:
    split = Split(np.zeros((26, 1, 8, 8), dtype=np.uint8), np.zeros(26, dtype=np.int64))
    spec = DataSpec("tiny", "image", split, 3, ("a", "b", "c"))
    data = FederatedData(spec, split, np.arange(1),
                         [np.arange(0, 10), np.arange(10, 25), np.arange(25, 26)], split,
                         [np.arange(1)] * 3, (0.0,), (1.0,), "dirichlet")
    train, held = held_out_split(data, 1, 0.2, seed=0)
    assert len(held) == 3 and len(train) == 12  # round(0.2 · 15) = 3
    assert sorted([*train, *held]) == list(range(10, 25))
    again_train, again_held = held_out_split(data, 1, 0.2, seed=0)
    assert np.array_equal(held, again_held) and np.array_equal(train, again_train)
    assert not np.array_equal(held_out_split(data, 1, 0.2, seed=1)[1], held)
    assert len(held_out_split(data, 0, 0.2, seed=0)[1]) == 2
    assert len(held_out_split(data, 0, 0.0, seed=0)[1]) == 0  # no split asked for
    one_train, one_held = held_out_split(data, 2, 0.2, seed=0)  # nothing to split
    assert list(one_train) == list(one_held) == [25]


def test_dynamic_training_reads_the_held_out_data_once_per_step() -> None:
    method = _method(distillation="dynamic", **{"kd-rounds": 1})
    torch.manual_seed(0)
    model = method.build_model(1)
    held_out = _loader(3, batch_size=2, seed=1)
    reads = []
    model.register_forward_pre_hook(lambda _m, args: reads.append(args[0].shape[0]))
    train_locally(model, _loader(8), method, method.cfg, 0.01, 1, torch.device("cpu"),
                  held_out=held_out)
    # two training steps (batches of 4), each followed, when the loss picks its teacher, by
    # one held-out batch (2 examples, then 1)
    assert reads == [4, 2, 4, 1]


# -- penalty and per-client state in the training loop ----------------------------------------
def _train_depthfl(server_update: str, client_state: dict) -> dict[str, torch.Tensor]:
    method = _method(method="depthfl", **{"server-update": server_update})
    torch.manual_seed(0)
    model = method.build_model(1)
    torch.manual_seed(1)
    train_locally(model, _loader(12), method, method.cfg, 0.01, 1, torch.device("cpu"),
                  client_state)
    return {k: v.detach() for k, v in model.named_parameters()}


def test_feddyn_state_is_written_back_and_the_penalty_changes_training() -> None:
    method = _method(method="depthfl")
    torch.manual_seed(0)
    sent = {k: v.detach().clone() for k, v in method.build_model(1).named_parameters()}
    state: dict[str, torch.Tensor] = {}
    trained = _train_depthfl("feddyn", state)
    assert set(state) == set(method.trainable_keys(1))
    for name, g in state.items():  # first round: g = −α·(w_new − w_server), α = 0.1
        torch.testing.assert_close(g, -0.1 * (trained[name] - sent[name]))
    plain_state: dict[str, torch.Tensor] = {}
    plain = _train_depthfl("fedavg", plain_state)
    assert plain_state == {}
    assert any(not torch.equal(plain[k], trained[k]) for k in plain)  # steps 2+ feel the pull
