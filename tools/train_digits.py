"""Train models/digits.py's DigitsNet on scikit-learn's digits and write the checkpoint.

    python -m tools.train_digits [-o models/digits_cnn.pt] [--epochs 30]

The checkpoint is a dict: state_dict, arch, arch_kwargs, input_shape (bnrt's checkpoint format).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from bnrt.io.save import write_torch
from models.digits import INPUT_SHAPE, DigitsNet, digits_split


def train(epochs: int, seed: int) -> tuple[DigitsNet, float]:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * ((len(x_tr) + 63) // 64))
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            if len(idx) < 2:  # BatchNorm needs more than one value per channel in training
                continue
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return model, acc


def reference_agreement(model: DigitsNet, seed: int = 0) -> dict[str, float]:
    """Max abs difference, relative to the largest |torch value|, between torch's BatchNorm and
    bnrt's numpy reference on the stem BN in training mode: output, input gradient, running
    statistics after the update (torch computes in float32, the reference in float64)."""
    from bnrt.train.reference import ReferenceBatchNorm

    x_tr, _, _, _ = digits_split()
    bn = model.stem[1]
    trained = copy.deepcopy(bn).train()
    captured = {}
    handle = model.stem[0].register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach()))
    with torch.no_grad():
        model.eval()(torch.from_numpy(x_tr[:64]))
    handle.remove()
    x = captured["x"].clone().requires_grad_(True)
    mirror = ReferenceBatchNorm(bn.num_features, bn.eps, bn.momentum, weight=bn.weight.detach().double().numpy(),
                                bias=bn.bias.detach().double().numpy(),
                                running_mean=bn.running_mean.double().numpy(),
                                running_var=bn.running_var.double().numpy(),
                                num_batches_tracked=int(bn.num_batches_tracked))
    y = trained(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    y.backward(dy)
    y_ref = mirror.forward(x.detach().double().numpy())
    dx_ref, _, _ = mirror.backward(dy.double().numpy())
    def diff(a, b) -> float:
        b = b.detach().double().numpy()
        return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())

    return {"output": diff(y_ref, y), "grad_input": diff(dx_ref, x.grad),
            "running_mean": diff(mirror.running_mean, trained.running_mean),
            "running_var": diff(mirror.running_var, trained.running_var)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="models/digits_cnn.pt")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    model, acc = train(args.epochs, args.seed)
    write_torch(args.output, {
        "state_dict": model.state_dict(),
        "arch": "models.digits:DigitsNet",
        "arch_kwargs": {},
        "input_shape": list(INPUT_SHAPE),
    })
    print(f"test accuracy {100 * acc:.2f}% after {args.epochs} epochs in {time.perf_counter() - start:.1f} s; wrote {args.output}")
    agreement = reference_agreement(model)
    print("reference BatchNorm vs torch on stem.1 (training mode), max difference relative to max |torch|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))


if __name__ == "__main__":
    main()
