"""`reefl pretrain`: central pretraining written as a DeiT checkpoint that `pretrained` reads."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reefl.cli import main
from reefl.config import MODELS, RunConfig
from reefl.data import load_source, loaders
from reefl.data.federated import IMAGENET_MEAN, IMAGENET_STD, input_pipeline
from reefl.data.sources import FASHION_MNIST_DIR
from reefl.models import VisionTransformer
from reefl.models.checkpoints import backbone_weights, read_checkpoint, to_backbone_names
from reefl.pretrain import (
    Classifier,
    PretrainError,
    build_classifier,
    central_data,
    check_options,
    checkpoint_state,
    evaluate,
    to_deit_names,
    write_outputs,
)
from reefl.training import cosine_lr

TINY_BACKBONE = "depth=2 num-exits=2 embed-dim=16 num-heads=2 seed=3"
TINY_RUN = ('num-clients=4 num-exits=2 depth=2 embed-dim=16 num-heads=2 num-server-rounds=2 '
            'eval-every=1 fraction-train=1.0 local-epochs=1 seed=3')
HAS_LAYER_SCALE = "layer_scale" in inspect.signature(VisionTransformer).parameters


def tiny_vit(**extra: object) -> VisionTransformer:
    return VisionTransformer(img_size=28, patch_size=7, in_chans=3, embed_dim=16, depth=2,
                             num_heads=2, mlp_ratio=2.0, **extra)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every parameter random (so that no two tensors are alike)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


# -- names ---------------------------------------------------------------------------------


def test_q_k_v_are_fused_in_timm_order_and_other_names_pass_through() -> None:
    state = {
        "blocks.0.attn.q.weight": torch.full((4, 4), 1.0),
        "blocks.0.attn.k.weight": torch.full((4, 4), 2.0),
        "blocks.0.attn.v.weight": torch.full((4, 4), 3.0),
        "blocks.0.attn.q.bias": torch.tensor([1.0, 1.1, 1.2, 1.3]),
        "blocks.0.attn.k.bias": torch.tensor([2.0, 2.1, 2.2, 2.3]),
        "blocks.0.attn.v.bias": torch.tensor([3.0, 3.1, 3.2, 3.3]),
        "blocks.0.attn.proj.weight": torch.randn(4, 4),
        "blocks.0.ls1.gamma": torch.randn(4),
        "cls_token": torch.randn(1, 1, 4),
    }
    deit = to_deit_names(state)
    assert set(deit) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                         "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "cls_token"}
    assert torch.equal(deit["blocks.0.attn.qkv.weight"][:, 0], torch.tensor([1.0] * 4
                                                                            + [2.0] * 4
                                                                            + [3.0] * 4))
    assert deit["blocks.0.attn.qkv.bias"].tolist() == pytest.approx(
        [1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.2, 2.3, 3.0, 3.1, 3.2, 3.3])
    for key in ("blocks.0.attn.proj.weight", "blocks.0.ls1.gamma", "cls_token"):
        assert torch.equal(deit[key], state[key])
    back = to_backbone_names(deit)  # the loader's split is the exact inverse
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_the_checkpoint_has_deits_parameter_names() -> None:
    model = Classifier(tiny_vit(), num_classes=10)
    names = set(checkpoint_state(model))
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{layer}.{kind}" for kind in ("weight", "bias")
                     for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                   "mlp.fc2")}
    assert names == expected
    assert checkpoint_state(model)["blocks.1.attn.qkv.weight"].shape == (48, 16)
    assert checkpoint_state(model)["head.weight"].shape == (10, 16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("layer_scale", [False, True])
def test_a_written_checkpoint_round_trips(suffix: str, layer_scale: bool,
                                          tmp_path: Path) -> None:
    """``backbone_weights`` (what ``pretrained=PATH`` loads) gives back exactly the trained
    backbone's tensors, q/k/v split again; norm and head are in the file too; LayerScale
    (where the ViT has it) passes through under its own name."""
    if layer_scale and not HAS_LAYER_SCALE:
        pytest.skip("this VisionTransformer has no LayerScale")
    backbone = tiny_vit(**({"layer_scale": 0.1} if layer_scale else {}))
    model = randomised(Classifier(backbone, num_classes=10))
    path = tmp_path / f"ckpt{suffix}"
    write_outputs(checkpoint_state(model), {"epochs": 1}, path)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "ckpt.json"])
    expected = model.backbone.state_dict()
    loaded = backbone_weights(str(path), "custom")
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    if layer_scale:
        assert "blocks.1.ls2.gamma" in read_checkpoint(path)
    raw = read_checkpoint(path)
    assert torch.equal(raw["head.weight"], model.head.weight.detach())
    assert torch.equal(raw["norm.bias"], model.norm.bias.detach())
    if suffix == ".pth":  # facebookresearch/deit's layout: the state dict under "model"
        assert set(torch.load(path, weights_only=True)) == {"model"}
    assert json.loads((tmp_path / "ckpt.json").read_text()) == {"epochs": 1}


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    model = Classifier(tiny_vit(), num_classes=10)
    with pytest.raises(TypeError):  # the JSON cannot be written: both temporaries go
        write_outputs(checkpoint_state(model), {"bad": object()}, tmp_path / "c.safetensors")
    assert not any(tmp_path.iterdir())


# -- options, data, schedule ---------------------------------------------------------------


def test_learning_rate_is_a_cosine_down_to_the_floor() -> None:
    learning_rate = cosine_lr  # the one schedule, shared with the federated rounds
    assert learning_rate(0, 100, 0.002, 0.0001) == pytest.approx(0.002)
    assert learning_rate(50, 100, 0.002, 0.0001) == pytest.approx(0.001)
    assert learning_rate(99, 100, 0.002, 0.0001) == pytest.approx(0.0001)  # floor
    lrs = [learning_rate(s, 100, 0.002, 0.0001) for s in range(100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize(("output", "epochs", "max_examples", "message"), [
    ("c.safetensors", 0, None, "--epochs must be an integer >= 1; got 0"),
    ("c.safetensors", 1, 0, "--max-examples must be an integer >= 1; got 0"),
    ("c.txt", 1, None, "--output must end in .safetensors, .pth, .pt"),
    ("folder.safetensors", 1, None, "is a folder"),
    ("file/sub/c.safetensors", 1, None, "is not a folder this process may write in"),
])
def test_bad_options_are_one_line_errors(output: str, epochs: int, max_examples: int | None,
                                         message: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(PretrainError) as err:
        check_options(tmp_path / output, epochs, max_examples)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert check_options(tmp_path / "new" / "c.pt", 1, None) == tmp_path / "new" / "c.pt"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_pretraining_feeds_the_input_of_a_pretrained_run() -> None:
    """The same pipeline as a run with ``pretrained`` set: 3 channels, ImageNet statistics."""
    from reefl.federation.inputs import run_data

    cfg = RunConfig.from_flat({"pretrained": __file__})  # any file passes the config check
    spec = load_source(cfg.data_options.source)
    ours = input_pipeline(central_data(spec, 0), cfg.img_size, True, cfg.augment)
    _, theirs, task = run_data(cfg)
    assert ours == theirs and ours.channels == task.in_chans == 3
    assert (ours.mean, ours.std) == (IMAGENET_MEAN, IMAGENET_STD)
    data = central_data(spec, 0, max_examples=300)
    assert len(data.client_indices[0]) == 300 and len(data.test_indices) == 0
    assert len(central_data(spec, 0).client_indices[0]) == len(spec.train)  # no partition


def test_the_classifier_starts_from_the_seed(tiny_cfg: RunConfig) -> None:
    one, two = build_classifier(tiny_cfg, 10, 3), build_classifier(tiny_cfg, 10, 3)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(),
                                                 two.state_dict().values(), strict=True))
    assert one(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


def test_a_backbone_with_layer_scale_keeps_it_in_the_checkpoint() -> None:
    """Where a named model's backbone has LayerScale (``cfg.backbone["layer_scale"]``), the
    classifier is built with it and ``ls1``/``ls2.gamma`` go into the file by name."""
    configs = [RunConfig.from_flat({"model": m, "img-size": 224}) for m in MODELS[1:]]
    scaled = [c for c in configs if c.backbone.get("layer_scale") is not None]
    if not scaled:
        pytest.skip("no model of this config has LayerScale")
    bb = scaled[0].backbone
    state = checkpoint_state(build_classifier(scaled[0], 10, 3))
    assert "blocks.0.ls1.gamma" in state and f"blocks.{bb['depth'] - 1}.ls2.gamma" in state
    assert torch.equal(state["blocks.0.ls1.gamma"],
                       torch.full((bb["embed_dim"],), float(bb["layer_scale"])))


# -- the command ---------------------------------------------------------------------------


def _config_error_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "file").write_text("")
    return [
        (["-c", "foo=1"], "unknown run-config key 'foo'"),
        (["-c", "depth=0"], "depth must be"),
        (["--epochs", "0"], "--epochs must be an integer >= 1"),
        (["--threads", "0"], "--threads must be an integer >= 1"),
        (["-o", str(tmp_path / "file" / "c.safetensors")], "cannot be written"),
        (["-o", str(tmp_path / "c.npz")], "--output must end in"),
    ]


def test_bad_values_stop_the_command_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in _config_error_cases(tmp_path):
        code = main(["pretrain", "-c", f'output-dir="{tmp_path}/out"', *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, args
        assert err.startswith("reefl: error: ") and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_pretrain_writes_a_checkpoint_and_its_json(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pretrain", "-c", f'{TINY_BACKBONE} output-dir="{tmp_path}"', "--epochs", "2",
                 "--max-examples", "200"])
    out = capsys.readouterr().out
    assert code == 0
    path = tmp_path / "pretrain-embedded-mnist-custom.safetensors"  # the default name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pretrain-embedded-mnist-custom.json", path.name]
    assert "epoch 1/2  train loss" in out and "epoch 2/2" in out and str(path) in out
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["epochs"] == 2 and info["train_examples"] == 200 and info["steps"] == 14
    assert info["config"]["depth"] == 2 and info["config"]["seed"] == 3
    assert info["in_chans"] == 3 and info["num_classes"] == 10
    assert info["final_test_accuracy"] is None  # the embedded digits have no test split
    assert info["run_test_examples_left_out"] == 1000  # what reefl run tests on: 20 %
    assert "1000 left out: the test examples of 'reefl run' on this data" in out
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert f'pretrained="{path}"' in info["run_config"]
    state = load_file(str(path))
    assert state["patch_embed.proj.weight"].shape == (16, 3, 7, 7)
    assert "blocks.1.attn.qkv.weight" in state and "head.weight" in state


@pytest.mark.skipif(not (Path(os.environ.get("REEFL_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
                         / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_a_source_with_a_test_split_reports_test_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "fm.pth"
    code = main(["pretrain", "-c", f'{TINY_BACKBONE} dataset="fashion-mnist"', "-o", str(out),
                 "--epochs", "1", "--max-examples", "300"])
    assert code == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["test_examples"] == 300
    assert info["final_test_accuracy"] == info["history"][-1]["test_accuracy"]
    # the reported accuracy and loss are those of the checkpoint written, on those 300
    cfg = RunConfig.from_flat({"depth": 2, "num-exits": 2, "embed-dim": 16, "num-heads": 2,
                               "seed": 3, "dataset": "fashion-mnist"})
    data = central_data(load_source(cfg.data_options.source), cfg.seed, 300)
    pipeline = input_pipeline(data, cfg.img_size, pretrained=True, augment=False)
    loader = loaders.test_loader(data, pipeline, cfg.eval_batch_size)
    model = build_classifier(cfg, 10, 3)
    state = read_checkpoint(out)
    model.backbone.load_state_dict(to_backbone_names(state))
    model.norm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("norm.")})
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    accuracy, loss = evaluate(model, loader, cfg, torch.device("cpu"))
    assert accuracy == pytest.approx(info["final_test_accuracy"], abs=1e-9)
    assert loss == pytest.approx(info["history"][0]["test_loss"], rel=1e-5)
    assert set(backbone_weights(str(out), "custom")) == set(tiny_vit().state_dict())


def test_a_federated_run_starts_from_the_pretrained_backbone(tmp_path: Path) -> None:
    """`reefl pretrain`, then a federated run with ``pretrained`` set to its file and a
    frozen backbone: the run's backbone is exactly the pretrained one, and the run finishes.
    In process (the ServerApp loop and ClientApp handlers); a pretrained frozen run through
    the real Flower app is test_end_to_end's reefl-frozen-pretrained row (extended)."""
    from reefl.federation.local import run_local
    from reefl.launch.run_config import parse_overrides

    checkpoint = tmp_path / "digits.safetensors"
    assert main(["pretrain", "-c", TINY_BACKBONE, "-o", str(checkpoint), "--epochs", "1",
                 "--max-examples", "300"]) == 0
    run_dir = run_local(RunConfig.from_flat(parse_overrides([
        f'{TINY_RUN} regime="frozen" pretrained="{checkpoint}" output-dir="{tmp_path}" '
        'run-name="from-pretrained" train-examples=400 test-examples=100'])))
    final = json.loads((run_dir / "final.json").read_text())
    assert final["rounds"] == 2 and len(final["exit_accuracy"]) == 2
    state = load_file(str(run_dir / "model.safetensors"))
    pretrained = backbone_weights(str(checkpoint), "custom")
    backbone = {k.removeprefix("backbone."): v for k, v in state.items()
                if k.startswith("backbone.")}
    assert set(backbone) == set(pretrained)
    assert all(torch.equal(backbone[k], pretrained[k]) for k in pretrained)
