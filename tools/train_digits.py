"""Train models/digits.py's DigitsNet on scikit-learn's digits and write the checkpoint.

    python -m tools.train_digits [-o models/digits_cnn.pt] [--epochs 30]

The checkpoint is a dict: state_dict, arch, arch_kwargs, input_shape (bnrt's checkpoint format).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from bnrt.save import write_torch
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


if __name__ == "__main__":
    main()
