"""The common alternative to `bnrt fold`, as a user writes it: load a dict checkpoint, torch.fx
``fuse`` (conv -> BN only), ``torch.onnx.export`` (dynamo, dynamic batch). No check. With
``--no-fuse``, the export alone (tools/fold_cost.py's baseline); with ``--trust-pickle
--input-shape N,C,H,W``, a pickled nn.Module instead of a dict checkpoint.

    python -m tools.fx_fuse_export CHECKPOINT OUT.onnx [--no-fuse] [--trust-pickle --input-shape SHAPE]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
from torch.fx.experimental.optimization import fuse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("output")
    parser.add_argument("--no-fuse", action="store_true", help="export the model as it is")
    parser.add_argument("--trust-pickle", action="store_true", help="CHECKPOINT is a pickled nn.Module")
    parser.add_argument("--input-shape", help="N,C,H,W of a pickled module's input")
    args = parser.parse_args()
    if args.trust_pickle and not args.input_shape:
        parser.error("--trust-pickle needs --input-shape N,C,H,W")
    if args.trust_pickle:
        model = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        shape = [int(d) for d in args.input_shape.split(",")]
    else:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        module, _, name = ckpt["arch"].partition(":")
        sys.path.insert(0, os.getcwd())
        model = getattr(importlib.import_module(module), name)(**ckpt.get("arch_kwargs", {}))
        model.load_state_dict(ckpt["state_dict"])
        shape = ckpt["input_shape"]
    fused = model.eval() if args.no_fuse else fuse(model.eval())
    program = torch.onnx.export(fused, (torch.randn(2, *shape[1:]),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(args.output)


if __name__ == "__main__":
    main()
