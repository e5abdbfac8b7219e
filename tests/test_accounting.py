"""Communication and compute accounting per tier, against hand counts on a tiny ViT."""

from __future__ import annotations

import json

import torch
from torch import nn

from reefl.config import RunConfig
from reefl.methods import TaskSpec, build_method
from reefl.methods.reefl import ReeFL
from reefl.outputs.accounting import (
    _tier_cost,
    costs_from_config,
    exit_flops,
    format_tier_table,
    read_accounting,
    regime_costs,
    tier_costs,
    write_accounting,
)

# 4x4 one-channel images in 2x2 patches -> 4 patches + class token = 5 tokens of width 4;
# 2 blocks (1 head, MLP hidden 4), an exit after each; Ree with 1 head of width 2, hidden 4,
# the paper's (no LayerScale: test_stable_ree_adds_its_gains counts those).
MICRO = {
    "img-size": 4, "patch-size": 2, "embed-dim": 4, "depth": 2, "num-heads": 1,
    "mlp-ratio": 1.0, "num-exits": 2, "ree-heads": 1, "ree-attn-dim": 2, "ree-mlp-ratio": 1.0,
    "ree-layer-scale": 0.0,
}
TASK = TaskSpec(num_classes=3, in_chans=1)


def _micro() -> ReeFL:
    return build_method(RunConfig.from_flat(MICRO), TASK)


def _linear(i: int, o: int) -> int:
    return i * o + o


def test_params_per_tier_match_a_hand_count() -> None:
    d, a, c = 4, 2, 3
    embed = (1 * 2 * 2 * d + d) + d + 5 * d  # patch conv, class token, position embedding
    block = 2 * d + 4 * _linear(d, d) + 2 * d + 2 * _linear(d, d)  # norms, q k v proj, MLP
    ree = (d + 3 * d  # meta token, depth position embedding (L + 1 rows)
           + 2 * d + 3 * _linear(d, a) + _linear(a, d) + 2 * d + 2 * _linear(d, d)  # its layer
           + 2 * d + _linear(d, c))  # exit head: LayerNorm + Linear
    costs = tier_costs(_micro())
    assert [x["tier"] for x in costs] == [0, 1]
    assert [x["exit_block"] for x in costs] == [0, 1]
    assert [x["params_down"] for x in costs] == [embed + block + ree, embed + 2 * block + ree]
    assert [x["params_down"] for x in costs] == [317, 453]
    for x in costs:
        assert x["params_up"] == x["params_down"] == x["params_model"]
        assert x["bytes_up"] == x["bytes_down"] == 4 * x["params_down"]  # fp32


def test_stable_ree_adds_its_gains() -> None:
    """The stable Ree (the default) has two LayerScale gains of width d per layer, and the
    same FLOPs (a gain is an element-wise product, not counted)."""
    d = 4
    for depth in (1, 2):
        paper = tier_costs(build_method(RunConfig.from_flat({**MICRO, "ree-depth": depth}),
                                        TASK))
        stable = tier_costs(build_method(RunConfig.from_flat(
            {**MICRO, "ree-depth": depth, "ree-layer-scale": 0.01}), TASK))
        assert [s["params_down"] - p["params_down"] for p, s in zip(paper, stable,
                                                                    strict=True)] == \
            [2 * d * depth] * 2
        assert [s["forward_flops"] for s in stable] == [p["forward_flops"] for p in paper]


def test_forward_flops_match_a_hand_count_of_products() -> None:
    """2 FLOPs per multiply-add of every Linear, the patch conv and both attention products."""
    n, d, a, c = 5, 4, 2, 3

    def linear(tokens: int, i: int, o: int) -> int:
        return 2 * tokens * i * o

    conv = 2 * 4 * d * (1 * 2 * 2)  # 4 patches, d outputs, each a 1x2x2 dot product
    block = 4 * linear(n, d, d) + 2 * (2 * n * n * d) + 2 * linear(n, d, d)

    def ree(m: int) -> int:  # m tokens: meta, history, current class token
        return (3 * linear(m, d, a) + linear(m, a, d) + 2 * (2 * m * m * a)
                + 2 * linear(m, d, d) + linear(1, d, c))

    tier0 = conv + block + ree(2)
    tier1 = tier0 + block + ree(3)
    costs = tier_costs(_micro())
    assert [x["forward_flops"] for x in costs] == [tier0, tier1] == [1800, 3640]
    assert costs[0]["forward_flops_by_op"]["aten.convolution"] == conv
    assert sum(costs[1]["forward_flops_by_op"].values()) == tier1
    assert exit_flops(_micro()) == [tier0, tier1]


def test_single_linear_is_two_in_out_tokens() -> None:
    from reefl.outputs.accounting import _forward_flops

    flops, by_op = _forward_flops(nn.Linear(6, 5), torch.zeros(1, 7, 6))
    assert flops == 2 * 6 * 5 * 7
    assert by_op == {"aten.addmm": 2 * 6 * 5 * 7}


def test_cpu_fallback_counts_the_same_as_meta() -> None:
    method = _micro()
    for tier in range(method.num_exits):
        assert _tier_cost(method, tier, 4, "cpu") == _tier_cost(method, tier, 4, "meta")


def test_costs_grow_with_tier_and_leave_the_rng_alone(tiny_cfg: RunConfig) -> None:
    method = build_method(tiny_cfg, TaskSpec(num_classes=10, in_chans=1))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    costs = tier_costs(method)
    assert torch.equal(torch.get_rng_state(), state)
    flops = [x["forward_flops"] for x in costs]
    params = [x["params_up"] for x in costs]
    assert len(costs) == 4
    assert all(a < b for a, b in zip(flops, flops[1:], strict=False))
    assert all(a < b for a, b in zip(params, params[1:], strict=False))
    assert "aten.bmm" in costs[0]["forward_flops_by_op"]  # attention is counted


def test_only_the_trainable_keys_are_communicated() -> None:
    class HeadOnly(ReeFL):
        def trainable_keys(self, tier: int) -> list[str]:
            return [k for k in super().trainable_keys(tier) if k.startswith("exits.head.")]

    method = HeadOnly(RunConfig.from_flat(MICRO), TASK)
    for x in tier_costs(method):
        assert x["params_up"] == x["params_down"] == 2 * 4 + _linear(4, 3)
        assert x["params_model"] > x["params_up"]


def test_bytes_follow_the_parameter_dtype() -> None:
    class Half(ReeFL):
        def build_model(self, tier: int):  # noqa: ANN202
            return super().build_model(tier).to(torch.float16)

    method = Half(RunConfig.from_flat(MICRO), TASK)
    costs = tier_costs(method)
    assert [x["bytes_up"] for x in costs] == [2 * 317, 2 * 453]


def test_write_and_read_accounting(tmp_path) -> None:  # noqa: ANN001
    tiers = write_accounting(tmp_path, _micro(), 4)
    data = json.loads((tmp_path / "accounting.json").read_text())
    assert data["tiers"] == tiers == read_accounting(tmp_path)
    assert data["img_size"] == 4 and data["exit_blocks"] == [0, 1]
    assert "not counted" in data["note"]
    assert read_accounting(tmp_path / "nowhere") is None
    assert format_tier_table(tiers).splitlines() == [
        "tier   block   params up   params down   MB up     share   MFLOPs/img",
        "─" * 69,
        "0          0         317           317   0.001    69.98%        0.002",
        "1          1         453           453   0.002   100.00%        0.004",
    ]


def test_costs_from_a_run_config_use_the_data_source() -> None:
    costs = costs_from_config({**MICRO, "img-size": 28, "patch-size": 14})  # embedded MNIST
    method = build_method(RunConfig.from_flat({**MICRO, "img-size": 28, "patch-size": 14}),
                          TaskSpec(num_classes=10, in_chans=1))
    assert costs == tier_costs(method)


def _deit_small_rows() -> dict[tuple[str, int], int]:
    cfg = RunConfig.from_flat({"model": "deit-small", "img-size": 224})
    method = build_method(cfg, TaskSpec(num_classes=100, in_chans=3))
    return {(r["regime"], r["tier"]): r["params_trained"] for r in regime_costs(method)}


def test_deit_small_frozen_trains_ree_alone_and_peft_adds_hand_counted_parameters() -> None:
    """DeiT-S, 4 exits (blocks 2, 5, 8, 11), 100 classes: the frozen regime trains Ree only,
    and each block of a tier adds what LoRA (r 32), an adapter pair (32) or SSF adds."""
    d, r, a, c, hidden = 384, 32, 16, 100, 1536
    ree = (d + 13 * d  # meta token, position embedding over L + 1 = 13 depths
           + 2 * d + 3 * _linear(d, a) + _linear(a, d)  # its attention (width 16)
           + 2 * d + _linear(d, int(1.35 * d)) + _linear(int(1.35 * d), d)  # its MLP
           + 2 * d + _linear(d, c)  # the exit head
           + 2 * d)  # the stable Ree's LayerScale gains (ree-layer-scale, the default)
    assert ree == 470_682
    lora = 2 * (r * d + d * r)  # A and B on q and v
    adapters = 2 * (_linear(d, 32) + _linear(32, d))  # after/beside attention and MLP
    ssf = 2 * (4 * d + hidden + d + 2 * d)  # q k v proj, fc1, fc2, norm1, norm2
    rows = _deit_small_rows()
    for tier, blocks in enumerate((3, 6, 9, 12)):
        assert rows["frozen", tier] == ree
        assert rows["lora", tier] == ree + blocks * lora
        assert rows["sa", tier] == rows["pa", tier] == ree + blocks * adapters
        assert rows["ssf", tier] == ree + blocks * ssf + 2 * d + 2 * d  # + patch embed, head
    assert rows["full", 3] == 21_664_896 + ree  # DeiT-S without head and final norm + Ree


def test_run_accounting_has_every_regime_and_the_share_of_the_full_model(tmp_path) -> None:
    method = build_method(RunConfig.from_flat({**MICRO, "regime": "frozen"}), TASK)
    tiers = write_accounting(tmp_path, method)
    record = json.loads((tmp_path / "accounting.json").read_text())
    assert record["regime"] == "frozen"
    assert [t["share_of_full_model"] for t in tiers] == [
        t["params_up"] / tiers[-1]["params_model"] for t in tiers]
    full = [r for r in record["regimes"] if r["regime"] == "full"]
    assert [r["share_of_full_model"] for r in full][-1] == 1.0
    assert [r["params_trained"] for r in full] == [317, 453]  # the hand count above
    table = (tmp_path / "costs.md").read_text()
    assert table.startswith("# Cost per round of every fine-tuning regime: reefl, 2 exits, "
                            "3 classes\n\n")
    assert table.split("\n\n")[-1].splitlines() == [
        "| regime            |              tier 0 |                tier 1 |",
        "|-------------------|--------------------:|----------------------:|",
        "| frozen (this run) | 137 · 0.00 · 30.24% |   137 · 0.00 · 30.24% |",
        "| full              | 317 · 0.00 · 69.98% |  453 · 0.00 · 100.00% |",
        "| lora              | 649 · 0.00 · 43.94% | 1,161 · 0.00 · 78.61% |",
        "| sa                | 721 · 0.00 · 44.48% | 1,305 · 0.01 · 80.51% |",
        "| pa                | 721 · 0.00 · 44.48% | 1,305 · 0.01 · 80.51% |",
        "| ssf               | 217 · 0.00 · 36.35% |   281 · 0.00 · 47.07% |",
    ]


def test_costs_command_prints_the_regime_table(capsys) -> None:
    from reefl.cli import main

    assert main(["costs", "-c", 'model="deit-small" img-size=224', "--num-classes", "100",
                 "--in-chans", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == [
        "tier   block    params up   params down    MB up     share   MFLOPs/img",
        "─" * 71,
        "0          2    6,165,402     6,165,402   24.662    27.85%     2393.635",
    ]
    regimes = lines.index("Every regime: trained parameters · MB sent each way per round · "
                          "share of the full model")
    frozen = "470,682 · 1.88 · 2.13%"
    assert lines[regimes + 1:regimes + 5] == [
        "regime" + " " * 32 + "tier 0" + " " * 24 + "tier 1" + " " * 24 + "tier 2"
        + " " * 25 + "tier 3",
        "─" * 135,
        f"frozen{' ' * 16}{frozen}{' ' * 8}{frozen}{' ' * 8}{frozen}{' ' * 9}{frozen}",
        "full (this run)   6,165,402 · 24.66 · 27.85%   11,488,794 · 45.96 · 51.90%   "
        "16,812,186 · 67.25 · 75.95%   22,135,578 · 88.54 · 100.00%",
    ]
    assert main(["costs", "-c", 'regime="prompt"']) == 2
    assert "regime must be one of" in capsys.readouterr().err


def test_accounting_is_counted_once_per_model(tmp_path, monkeypatch) -> None:
    """The second run of the same model (another seed) reads the record back from the cache
    instead of counting again; another regime is counted anew."""
    from reefl.outputs import accounting

    monkeypatch.setenv("REEFL_CACHE_DIR", str(tmp_path / "cache"))
    counted = []
    real = accounting.accounting_record
    monkeypatch.setattr(accounting, "accounting_record",
                        lambda method, size=None: counted.append(size) or real(method, size))
    task = TaskSpec(num_classes=10, in_chans=1)
    base = {"img-size": 8, "patch-size": 4, "embed-dim": 16, "depth": 2, "num-heads": 2,
            "num-exits": 2, "mlp-ratio": 2.0}
    first = accounting.cached_accounting_record(build_method(RunConfig.from_flat(base), task))
    again = accounting.cached_accounting_record(
        build_method(RunConfig.from_flat({**base, "seed": 3, "num-server-rounds": 7}), task))
    assert counted == [8]
    assert again == first == json.loads(json.dumps(real(build_method(
        RunConfig.from_flat(base), task), 8)))
    lora = accounting.cached_accounting_record(
        build_method(RunConfig.from_flat({**base, "regime": "lora"}), task))
    assert counted == [8, 8]
    assert lora["regime"] == "lora"
    assert len(list((tmp_path / "cache" / "accounting").glob("*.json"))) == 2
