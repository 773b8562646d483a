"""What ``bnrt fold`` and ``bnrt calibrate`` write: the file names, the folded checkpoint
(``bnrt_folded`` entry), the calibrated checkpoint (``bnrt_calibration`` entry), the ONNX metadata
keys, the fold records that the localiser reads back, and the fold report (schema ``bnrt.fold/1``,
bnrt/schemas/fold-1.schema.json). Readers (``bnrt.io.load``, ``bnrt.verify.onnxside``) import the
keys from here. The check's report is ``bnrt.verify.metrics``' (``bnrt.check/3``), quantize's
``bnrt.pipeline.quantize``'s (``bnrt.quantize/1``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from bnrt.version import __version__

if TYPE_CHECKING:
    import onnx

    from bnrt.folding.decision import Decision
    from bnrt.folding.reparam import Merge
    from bnrt.folding.torchfold import FoldResult
    from bnrt.io.source import Loaded

FOLDED_KEY = "bnrt_folded"
CALIBRATION_KEY = "bnrt_calibration"
FOLDS_KEY = "bnrt_folds"
FOLD_SCHEMA = "bnrt.fold/1"


def stem_of(source: Path) -> str:
    """The name bnrt's outputs for ``source`` start with: its file name without the last suffix."""
    return source.name.rsplit(".", 1)[0] if "." in source.name else source.name


def artifact_names(path: Path, kind: str) -> dict[str, str]:
    """File names ``bnrt fold`` writes for the model at ``path`` of ``kind`` (``ModelSource.kind``):
    the folded model (torch checkpoints and ONNX models), the ONNX (all but ONNX models) and the
    report. A TorchScript archive or an ExportedProgram is folded as its ONNX graph only."""
    stem = stem_of(path)
    if kind == "onnx":
        return {"folded": f"{stem}.folded.onnx", "report": f"{stem}.report.json"}
    if kind in ("torchscript", "exported"):
        return {"onnx": f"{stem}.onnx", "report": f"{stem}.report.json"}
    return {"folded": f"{stem}.folded.pt", "onnx": f"{stem}.onnx", "report": f"{stem}.report.json"}


def folds_of(decisions: Iterable[Decision], merges: Iterable[Merge] = ()) -> list[dict]:
    """The folds as plain data, what the check needs to tell a fold's intended differences from a
    divergence: per folded BN ``{"bn", "into", "direction", "through", "functional"}``
    (``through``: the view ops between it and its layers, whose values change too; ``functional``:
    the BN is a call inside a module that may do more, as timm's ``BatchNormAct2d``), per merged
    rep block ``{"bn": None, "into": [target, *branches], "direction": "rep-block", "through": [],
    "functional": False}``."""
    return ([{"bn": d.bn, "into": list(d.into), "direction": d.direction, "through": list(d.through),
              "functional": bool(d.functional)} for d in decisions if d.folded]
            + [{"bn": None, "into": [m.target.name, *(c.name for c in m.convs)], "direction": "rep-block",
                "through": [], "functional": False} for m in merges])


def folds_in(metadata: dict[str, str]) -> list[dict]:
    """The folds bnrt recorded in an ONNX file's metadata (empty for other files)."""
    return json.loads(metadata.get(FOLDS_KEY, "[]"))


def onnx_metadata(source_sha256: str, decisions: list[Decision], merges: Iterable[Merge] = ()) -> dict[str, str]:
    """The metadata_props bnrt writes into an ONNX file it folded."""
    return {"bnrt_version": __version__, "source_sha256": source_sha256,
            "bn_folded": str(sum(d.folded for d in decisions)), "bn_total": str(len(decisions)),
            FOLDS_KEY: json.dumps(folds_of(decisions, merges))}


def set_onnx_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Set (or replace) ``metadata`` in ``model.metadata_props``."""
    present = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        entry = present.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


def folded_checkpoint(result: FoldResult, loaded: Loaded, input_shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    """The folded checkpoint: the user's state_dict structure with folded BNs as ``nn.Identity``
    (``bnrt_folded``: what ``bnrt.folding.structure.apply_folded_structure`` needs, and the fold records)."""
    return {
        FOLDED_KEY: {**result.structure(), "folds": folds_of(result.structured_decisions, result.merges)},
        "state_dict": result.structured.state_dict(),
        "arch": loaded.arch,
        "arch_kwargs": loaded.arch_kwargs,
        "input_shape": [list(s) for s in input_shapes],
        "bnrt_version": __version__,
        "source_sha256": loaded.sha256,
    }


def calibrated_checkpoint(state_dict: dict, loaded: Loaded, input_shapes: list[tuple[int, ...]],
                          calibration: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint with recalibrated statistics and how they were computed (``bnrt_calibration``)."""
    return {"state_dict": state_dict, "arch": loaded.arch, "arch_kwargs": loaded.arch_kwargs,
            "input_shape": [list(s) for s in input_shapes], CALIBRATION_KEY: calibration}


def fold_report(*, source: dict[str, Any], input_names: list[str], output_names: list[str],
                input_shapes: list, opset: int | None, exporter: str | None, tracer: str,
                decisions: list[Decision], merges: list, fp16_overflow: dict[str, float], batchnorm_nodes: int,
                check: dict | None, timings: dict[str, float], outputs: dict[str, str],
                checkpoint_keeps: list[str] = (), unshared: dict | None = None,
                peaks: dict[str, float] | None = None) -> dict[str, Any]:
    """The fold report (schema ``bnrt.fold/1``), for torch and ONNX sources alike.
    ``checkpoint_keeps``: BNs folded in the ONNX file but kept in the folded checkpoint;
    ``unshared``: the copies ``--unshare`` made and the parameters they add; ``peaks``: the process's
    peak memory (MB) when each step ended."""
    folded = sum(d.folded for d in decisions)
    return {
        "schema": FOLD_SCHEMA,
        "bnrt_version": __version__,
        "source": source,
        "input_names": input_names,
        "output_names": output_names,
        "input_shapes": [list(s) for s in input_shapes],
        "opset": opset,
        "exporter": exporter,
        "tracer": tracer,
        "summary": {"bn_total": len(decisions), "folded": folded, "skipped": len(decisions) - folded,
                    "merged_blocks": len(merges), "fp16_overflow": fp16_overflow,
                    "batchnorm_nodes_in_onnx": batchnorm_nodes,
                    **({"checkpoint_keeps": list(checkpoint_keeps)} if checkpoint_keeps else {}),
                    **({"unshared": unshared} if unshared else {})},
        "decisions": [d.to_json() for d in decisions],
        "merges": [m.to_json() for m in merges],
        "check": check,
        "timings_s": timings,
        **({"peak_rss_mb": peaks} if peaks else {}),
        "outputs": outputs,
    }
