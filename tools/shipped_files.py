"""Model files the way users ship them, written by the libraries that really write them.

    python -m tools.shipped_files OUT_DIR      # in the zoo environment (.venv-zoo + ultralytics, lightning)

bnrt's own checkpoints (a dict with ``state_dict``, ``arch``, ``input_shape``) are not what people
hand over. They hand over an Ultralytics ``best.pt``, a TorchScript archive, a ``torch.export``
``.pt2``, a Lightning ``.ckpt``, the state_dict of a ``torch.compile``-d model, a ``.safetensors``
file. This script writes one of each with the real library code paths (no hand-made imitations, no
downloads), random weights and randomised BatchNorm statistics (running_mean ~ N(0, 0.5),
running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2); ``torch.manual_seed(0)`` before each
file), so that folding them is not a no-op. Files:

- ``yolov8n_best.pt``, ``yolo11n_best.pt``: a ``DetectionModel`` built from its YAML, saved as
  ``BaseTrainer.save_model`` writes a checkpoint (EMA copy in float16) and then finalised by
  ``strip_optimizer``, as the trainer does to best.pt: ``model`` holds the pickled float16 module;
- ``resnet18_traced.pt`` (``torch.jit.trace``), ``mobilenet_v3_small_scripted.pt`` (``torch.jit.script``);
- ``resnet18.pt2``: ``torch.export.save`` of an ExportedProgram with a dynamic batch dimension;
- ``lightning_resnet18.ckpt``: ``Trainer.save_checkpoint`` after two training steps of ``LitResNet``;
- ``resnet18_compiled_prefix.pt``: ``{"state_dict": torch.compile(model).state_dict()}`` (``_orig_mod.`` keys);
- ``resnet18.safetensors``: ``safetensors.torch.save_file`` of the plain state_dict.

``OUT_DIR/manifest.json`` lists them: file, what, flags (extra bnrt CLI flags beyond
``--input-shape``, which comes from input_shape), input_shape, original (Python that rebuilds the
model the file's own ecosystem's way, for comparison). Weights are deterministic; the Ultralytics and
Lightning files also record the date and library versions, as those libraries always do.
"""

from __future__ import annotations

import os

# Ultralytics: no DNS probe, no pip auto-install, no console chatter (set before it is imported).
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "0")

import argparse
import copy
import json
import logging
import time
import warnings
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import lightning
import torch
import torchvision
from torch import nn

SEED = 0
IMAGENET = [1, 3, 224, 224]
YOLO = [1, 3, 640, 640]
RESNET18 = "torchvision.models:resnet18"
TV_ORIGINAL = "m = torchvision.models.{name}(); m.load_state_dict({sd}); m.eval()"


def randomise_bn(model: nn.Module) -> nn.Module:
    """Random statistics and affine parameters in every BatchNorm, so that folding changes weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
    return model


def torchvision_model(name: str, **kwargs) -> nn.Module:
    """``torchvision.models.<name>`` with seeded random weights and randomised BN, in eval mode."""
    torch.manual_seed(SEED)
    return randomise_bn(getattr(torchvision.models, name)(**kwargs)).eval()


def entry(file: str, what: str, flags: list[str], shape: list[int], original: str) -> dict:
    return {"file": file, "what": what, "flags": flags, "input_shape": shape, "original": original}


# --- Ultralytics -------------------------------------------------------------------------------

def yolo_model(yaml_name: str):
    """A ``DetectionModel`` with the attributes ``DetectionTrainer`` gives it, plus its EMA and optimizer."""
    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG, ROOT, YAML
    from ultralytics.utils.torch_utils import ModelEMA

    torch.manual_seed(SEED)
    args = get_cfg(DEFAULT_CFG, {"model": yaml_name, "data": "coco8.yaml", "epochs": 1, "device": "cpu",
                                 "optimizer": "SGD", "amp": False})
    names = YAML.load(ROOT / "cfg" / "datasets" / "coco8.yaml")["names"]  # COCO class names, no download
    model = DetectionModel(yaml_name, nc=len(names), ch=3, verbose=False)  # DetectionTrainer.get_model
    model.nc, model.names, model.args = len(names), names, args  # DetectionTrainer.set_model_attributes
    randomise_bn(model)
    ema = ModelEMA(model)
    fake_trainer = SimpleNamespace(args=args, data={"nc": len(names)})  # read only for optimizer="auto"
    optimizer = BaseTrainer.build_optimizer(fake_trainer, model, name=args.optimizer, lr=args.lr0,
                                            momentum=args.momentum, decay=args.weight_decay)
    return model, ema, optimizer, args


def yolo_validate(model: nn.Module, args) -> None:
    """What the epoch's validation pass (``BaseValidator`` with a trainer) leaves on the EMA model: float32,
    eval mode, ``end2end`` set, and the Detect head's anchor cache (``anchors``, ``strides``, ``shape``)
    for the last val batch, here coco8's 4 val images at 640x640."""
    model.end2end = args.nms is False
    model.float().eval()
    with torch.no_grad():
        model(torch.zeros(4, 3, args.imgsz, args.imgsz))


def yolo_checkpoint(ema_holder, optimizer, args) -> dict:
    """The dict ``BaseTrainer.save_model`` (ultralytics 8.4) pickles, after one epoch."""
    from ultralytics import __version__
    from ultralytics.utils import GIT
    from ultralytics.utils.torch_utils import (
        convert_optimizer_state_dict_to_fp16,
        qat_state,
        strip_qat,
    )

    ema = ema_holder.ema
    modelopt = qat_state(ema)
    ema = copy.deepcopy(ema).half().to(memory_format=torch.contiguous_format)
    if hasattr(ema, "criterion"):
        ema.criterion = None
    for v in ema.state_dict().values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.nan_to_num_(v)
    strip_qat(ema)
    metrics = {"metrics/precision(B)": 0.0, "metrics/recall(B)": 0.0, "metrics/mAP50(B)": 0.0,
               "metrics/mAP50-95(B)": 0.0, "val/box_loss": 0.0, "val/cls_loss": 0.0, "val/dfl_loss": 0.0}
    fitness = 0.0
    return {
        "epoch": 0,
        "best_fitness": fitness,
        "stopper": {"best_fitness": fitness, "best_epoch": 0},
        "model": None,
        "ema": ema,
        "updates": ema_holder.updates,
        "modelopt": modelopt,
        "optimizer": convert_optimizer_state_dict_to_fp16(copy.deepcopy(optimizer.state_dict())),
        "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
        "train_args": vars(args),
        "train_metrics": {**metrics, "fitness": fitness},
        "train_results": yolo_results(metrics),
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "git": {"root": str(GIT.root), "branch": GIT.branch, "commit": GIT.commit, "message": GIT.message,
                "origin": GIT.origin},
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
    }


def yolo_results(metrics: dict) -> dict:
    """What ``read_results_csv`` returns for a one-epoch results.csv (column -> list of values)."""
    row = {"epoch": 1, "time": 1.0, "train/box_loss": 3.0, "train/cls_loss": 5.0, "train/dfl_loss": 4.0,
           **metrics, "lr/pg0": 0.0, "lr/pg1": 0.0, "lr/pg2": 0.0}
    return {k: [v] for k, v in row.items()}


def write_yolo(out: Path, yaml_name: str, file: str) -> dict:
    from ultralytics.utils.torch_utils import strip_optimizer

    _, ema, optimizer, args = yolo_model(yaml_name)
    yolo_validate(ema.ema, args)
    ckpt = yolo_checkpoint(ema, optimizer, args)
    path = out / file
    torch.save(ckpt, path)  # save_model writes these bytes to last.pt and best.pt
    strip_optimizer(path, updates={"train_results": ckpt["train_results"]})  # BaseTrainer.final_eval on best.pt
    return entry(file, f"Ultralytics {yaml_name} best.pt: save_model + strip_optimizer, pickled float16 "
                       "DetectionModel under 'model'", ["--trust-pickle"], YOLO,
                 "torch.load(f, weights_only=False)['model'].float().eval()  # forward returns (y, preds)")


# --- TorchScript, torch.export, torch.compile, safetensors --------------------------------------

def write_jit(out: Path) -> list[dict]:
    resnet, mobilenet = torchvision_model("resnet18"), torchvision_model("mobilenet_v3_small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace/script is deprecated"
        traced = torch.jit.trace(resnet, torch.randn(2, 3, 224, 224))
        scripted = torch.jit.script(mobilenet)
    traced.save(str(out / "resnet18_traced.pt"))
    scripted.save(str(out / "mobilenet_v3_small_scripted.pt"))
    return [
        entry("resnet18_traced.pt", "TorchScript archive of torchvision resnet18, torch.jit.trace at batch 2",
              [], IMAGENET, "torch.jit.load(f).eval()"),
        entry("mobilenet_v3_small_scripted.pt", "TorchScript archive of torchvision mobilenet_v3_small, "
              "torch.jit.script", [], IMAGENET, "torch.jit.load(f).eval()"),
    ]


def write_export(out: Path) -> dict:
    model = torchvision_model("resnet18")
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "resnet18.pt2")
    with torch.no_grad():
        for n in (1, 4):  # the dynamic batch dimension really is dynamic
            x = torch.randn(n, 3, 224, 224)
            torch.testing.assert_close(program.module()(x), model(x))
    return entry("resnet18.pt2", "torch.export ExportedProgram of torchvision resnet18, batch dynamic in [1, 1024]",
                 [], IMAGENET, "torch.export.load(f).module()")


def write_compiled(out: Path) -> dict:
    compiled = torch.compile(torchvision_model("resnet18"))  # never run: state_dict() compiles nothing
    torch.save({"state_dict": compiled.state_dict()}, out / "resnet18_compiled_prefix.pt")
    sd = "{k.removeprefix('_orig_mod.'): v for k, v in torch.load(f)['state_dict'].items()}"
    return entry("resnet18_compiled_prefix.pt", "state_dict of torch.compile(resnet18): every key starts "
                 "with '_orig_mod.'", ["--arch", RESNET18], IMAGENET, TV_ORIGINAL.format(name="resnet18", sd=sd))


def write_safetensors(out: Path) -> dict | None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        return None
    save_file(torchvision_model("resnet18").state_dict(), str(out / "resnet18.safetensors"))
    sd = "safetensors.torch.load_file(f)"
    return entry("resnet18.safetensors", "safetensors file of torchvision resnet18's state_dict",
                 ["--arch", RESNET18], IMAGENET, TV_ORIGINAL.format(name="resnet18", sd=sd))


# --- Lightning ----------------------------------------------------------------------------------

class LitResNet(lightning.LightningModule):
    """The usual LightningModule: a torchvision network under ``self.model``, hyper-parameters saved."""

    def __init__(self, lr: float = 0.01, num_classes: int = 1000):
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def write_lightning(out: Path) -> dict:
    torch.manual_seed(SEED)
    module = LitResNet(lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 64, 64), torch.randint(0, 1000, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=0)
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "does not have many workers", etc.
        warnings.simplefilter("ignore", FutureWarning)  # Lightning's own use of deprecated torch APIs (LeafSpec)
        trainer.fit(module, loader)
        randomise_bn(module)
        trainer.save_checkpoint(out / "lightning_resnet18.ckpt")
    return entry("lightning_resnet18.ckpt", "Lightning Trainer.save_checkpoint of LitResNet (torchvision resnet18 "
                 "under self.model) after 2 steps; state_dict keys 'model.*' (bnrt strips the prefix), "
                 "hyper_parameters lr/num_classes", ["--arch", RESNET18], IMAGENET,
                 "tools.shipped_files.LitResNet.load_from_checkpoint(f, map_location='cpu').eval()")


# --- main ---------------------------------------------------------------------------------------

def quiet_libraries() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.shipped_files", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the files and manifest.json into")
    out = parser.parse_args(argv).out_dir
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    start = time.perf_counter()
    writers = [
        lambda: write_yolo(out, "yolov8n.yaml", "yolov8n_best.pt"),
        lambda: write_yolo(out, "yolo11n.yaml", "yolo11n_best.pt"),
        lambda: write_jit(out),
        lambda: write_export(out),
        lambda: write_lightning(out),
        lambda: write_compiled(out),
        lambda: write_safetensors(out),
    ]
    manifest = []
    for write in writers:
        t = time.perf_counter()
        result = write()
        entries = result if isinstance(result, list) else [result] if result else []
        for e in entries:
            size = (out / e["file"]).stat().st_size / 1e6
            print(f"wrote {out / e['file']} ({size:.1f} MB, {time.perf_counter() - t:.1f} s): {e['what']}", flush=True)
        manifest.extend(entries)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out / 'manifest.json'} ({len(manifest)} files, {time.perf_counter() - start:.1f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
