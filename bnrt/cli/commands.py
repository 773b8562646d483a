"""One function per command: build the library objects from the flags (``bnrt.cli.groups``), call
one library function, print what it returns. Exit codes: 0 ok, 1 a check failed or a budget was
exceeded; errors are raised (``bnrt.cli.main`` turns them into one line and exit code 2)."""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

from bnrt.cli.groups import CheckArgs, ImageArgs, ProgressArgs, RuntimeArgs, ShapeArgs, SourceArgs, positive
from bnrt.errors import EXIT_NO_ONNX, InputError, OptionError
from bnrt.io.export import DEFAULT_OPSET
from bnrt.io.shapes import ShapeOptions, format_axes
from bnrt.io.source import PROGRAMS


def _print_dynamic(report: dict, shapes: ShapeOptions) -> None:
    """The dynamic axes, when any besides the batch was asked for, and those fixed by --static-ok."""
    held = report.get("dynamic_axes")
    if held is None or not (shapes.dynamic or shapes.static_ok):
        return
    print(f"dynamic axes: {format_axes(held)}")
    asked = shapes.dynamic or {}
    fixed = [f"axis {a} of {n!r}" for n, axes in held.items() for a in asked.get(n, asked.get(None, (0,)))
             if a not in axes]
    if fixed:
        print(f"fixed at the example's size (--static-ok; no exporter kept it dynamic): {', '.join(fixed)}")


def _print_unshared(report: dict) -> None:
    unshared = report["summary"].get("unshared")
    if unshared:
        added, before = unshared["parameters_added"], unshared["parameters_before"]
        print("unshared (a copy per further call, in the ONNX file): " + ", ".join(
            f"'{layer}' x{len(copies) + 1}" for layer, copies in unshared["copies"].items())
              + f"; +{added:,} parameters (+{100 * added / max(before, 1):.2f} % of {before:,})")


def cmd_fold(args: argparse.Namespace) -> int:
    from bnrt.folding.capture import RECORDED
    from bnrt.pipeline.convert import fold_file
    from bnrt.verify.report import check_table, decision_table

    start = time.perf_counter()
    source, check = SourceArgs.build(args, args.model), None if args.no_check else CheckArgs.build(args)
    shapes = ShapeArgs.build(args)
    SourceArgs.refuse_on_onnx(args, source, "; an ONNX file is folded as it is",
                              ("opset", "exporter", "unshare", *ShapeArgs.FLAGS))
    outcome = fold_file(source, args.output_dir, check=check,
                        opset=DEFAULT_OPSET if args.opset is None else args.opset, exporter=args.exporter or "dynamo",
                        progress=ProgressArgs.build(args), shapes=shapes, unshare=args.unshare)
    for note in outcome.report["source"].get("notes", []):
        print(f"{source.path}: {note}")
    print(decision_table(outcome.result.decisions))
    if outcome.report["tracer"] == RECORDED:
        print("graph: recorded from one eager run (neither torch.fx nor torch.export could capture the model; the "
              "check runs the eager model)")
    for merge in outcome.result.merges:
        print(f"merged into '{merge.target.name}': " + ", ".join(
            [*(f"'{c.name}'" for c in merge.convs), *(f"identity BN '{b.name}'" for b in merge.bns),
             *(["the input"] * merge.inputs), *(["a per-channel scale"] if merge.scaled else []),
             *(["a constant shift"] if merge.constant is not None else [])])
              + "".join(f"; kept '{conv.name}' beside it ({why})" for conv, why in merge.kept))
    not_written = outcome.report["summary"].get("onnx_not_written")
    if not_written is None:
        print(f"BatchNormalization nodes in {'the folded ONNX' if outcome.kind == 'onnx' else 'ONNX'}: "
              f"{outcome.onnx_batchnorm_nodes}")
    _print_dynamic(outcome.report, shapes)
    used = outcome.report["exporter"]
    if outcome.kind not in ("onnx", *PROGRAMS) and used not in (None, args.exporter or "dynamo"):
        print(f"exported by the {used} exporter: the {args.exporter or 'dynamo'} one failed or fixed the batch axis")
    read = outcome.report["source"].get("precision", "float32")
    if read != "float32" and outcome.kind != "onnx":
        print(f"precision: read {read}, folded in float64, wrote float32")
    _print_unshared(outcome.report)
    keeps = outcome.report["summary"].get("checkpoint_keeps", [])
    if keeps:
        print(f"kept in the folded checkpoint (the forward it keeps still computes the blocks the ONNX merged): {', '.join(keeps)}")
    for layer, largest in outcome.result.fp16_overflow.items():
        print(f"warning: folded weights of '{layer}' reach {largest:.3g}, beyond float16's range (65504)")
    if outcome.check is not None:
        print()
        print(check_table(outcome.check))
    print()
    if outcome.passed:
        print(f"wrote {', '.join(str(p) for p in outcome.written)} in {time.perf_counter() - start:.2f} s")
        if not_written:
            print(f"{source.path}: no ONNX written (the folded checkpoint is): {not_written}", file=sys.stderr)
            return EXIT_NO_ONNX
        return 0
    print(f"wrote only {outcome.report_path}: the folded model is not written when the check fails", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    from bnrt.io.save import refuse_overwrite
    from bnrt.io.shards import parse_shard, process_group
    from bnrt.verify.check import check_files
    from bnrt.verify.parts import check_part, gather, merge, read_part, write_part
    from bnrt.verify.report import check_table, save_report

    if args.merge:
        if args.reference or args.candidate or args.shard:
            raise OptionError("`merge` takes parts only: no models, no `shard`")
        refuse_overwrite([args.json, args.plot], args.merge)
        report = merge([read_part(path) for path in args.merge])
    else:
        if not (args.reference and args.candidate):
            raise OptionError("give a reference and a candidate model (or `merge` parts)")
        shard = parse_shard(args.shard) if args.shard else None
        if shard and not args.json:
            raise OptionError("`shard` writes its part with `json` FILE")
        arrays = Path(args.json).with_suffix(".npz") if shard else None  # a part's outputs, beside its JSON
        refuse_overwrite([args.json, args.plot, args.save_inputs, arrays],
                         [args.reference, args.candidate, *([args.data] if args.data else [])])
        group, rank, world = (None, 0, 1) if shard else process_group()  # torchrun: a shard per rank
        part = shard or ((rank, world) if group is not None else None)
        found = check_files(SourceArgs.build(args, args.reference), SourceArgs.build(args, args.candidate),
                            CheckArgs.build(args), reference_provider=args.reference_provider,
                            save_inputs=args.save_inputs, progress=ProgressArgs.build(args),
                            run=partial(check_part, index=part[0], count=part[1]) if part else None)
        if shard:
            write_part(found, args.json)
            count = len(found.seen.ref_out[0])
            rows = f"samples {found.start}-{found.start + count - 1}" if count else "no samples"
            print(f"shard {shard[0]}/{shard[1]}: {rows} of {found.size}; wrote {args.json} and {arrays}; "
                  f"`bnrt check --merge` the {shard[1]} parts for the report")
            return 0
        parts = gather(found) if group is not None else None
        if group is not None and parts is None:
            return 0  # rank 0 reports
        report = merge(parts) if parts is not None else found
    print(check_table(report))
    save_report(report, args.json, args.plot)
    return 0 if report.passed else 1


def _calibration_progress(stage: str, i: int, total: int | None) -> None:
    sys.stderr.write(f"\rcalibrate {stage}: batch {i}" + (f"/{total}" if total else "") + " " * 8)
    sys.stderr.flush()


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bnrt.train.calibrate import calibrate_file

    start = time.perf_counter()
    shown = ProgressArgs.build(args)
    outcome = calibrate_file(SourceArgs.build(args, args.model), args.data, args.output, mode=args.mode,
                             batch_size=args.batch_size, progress=_calibration_progress if shown else None,
                             measure=not args.no_residuals, preprocess=ImageArgs.build(args), workers=args.workers)
    if shown:
        sys.stderr.write("\n")
    if outcome.rank != 0:
        return 0
    r = outcome.report
    print(f"calibrated {len(r.bn)} BatchNorm ({r.mode}) on {r.samples} samples in {r.batches} batches, "
          f"{r.passes} pass(es), {time.perf_counter() - start:.2f} s")
    if outcome.residuals:
        worst_mean = max(v[0] for v in outcome.residuals.values())
        worst_var = max(v[1] for v in outcome.residuals.values())
        print(f"residuals over the data (standardised BN inputs): max |mean| {worst_mean:.3g}, max |var - 1| {worst_var:.3g}")
    print(f"wrote {outcome.written}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bnrt.deploy.run import run_file

    positive(args, "batch_size")
    outcome = run_file(args.model, args.input, args.output, batch_size=args.batch_size, **RuntimeArgs.build(args))
    if outcome.tf32 is not None:
        print(f"TF32 {'on' if outcome.tf32 else 'off'}" + (" (ORT's CUDA default)" if args.tf32 is None else ""))
    for name, (dtype, shape) in outcome.outputs.items():
        print(f"{name}: {dtype} {shape}")
    print(f"wrote {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bnrt.deploy.serve import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
          max_queue=args.max_queue, max_request_mb=args.max_request_mb, keep_alive_s=args.keep_alive_s,
          max_connections=args.max_connections, grpc_port=args.grpc_port, poll_repo_s=args.poll_repo,
          instances=args.instances, announce=lambda m: print(m, flush=True),
          **RuntimeArgs.build(args))
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from bnrt.deploy.triton import TritonOptions, write_repository

    options = TritonOptions(args.max_batch, args.gpu, args.instances, args.threads, args.inter_threads,
                            args.preferred_batch_sizes, args.max_queue_delay_us, args.tf32, args.tensorrt, args.fp16)
    target = write_repository(args.model, args.output, name=args.name, options=options, warmup=args.warmup_data)
    print((target / "config.pbtxt").read_text().rstrip())
    print(f"wrote {target}/config.pbtxt and {target}/1/model.onnx")
    return 0


def cmd_kserve(args: argparse.Namespace) -> int:
    from bnrt.deploy.inferenceservice import ServiceOptions, to_yaml, write_manifest

    options = ServiceOptions(args.name, args.namespace, args.protocol, args.runtime_version, args.cpu, args.memory,
                             args.gpus, args.min_replicas, args.max_replicas, args.service_account)
    path, data = write_manifest(args.repo, args.storage_uri, args.output_dir, options)
    print(to_yaml(data))
    models = data["metadata"]["annotations"]["bnrt/models"].split(",")
    print(f"wrote {path}; serves {', '.join(models)} once {args.repo} is uploaded to {args.storage_uri}: "
          f"kubectl apply -f {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bnrt.pipeline.bench import bench_file, markdown, save_bench

    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise InputError(f"--batch-sizes {args.batch_sizes!r}: expected integers like 1,8,32") from None
    if not batches or min(batches) <= 0 or args.threads <= 0 or args.repeats <= 0 or args.iterations <= 0:
        raise InputError("--batch-sizes, --threads, --repeats and --iterations must be positive")
    report = bench_file(SourceArgs.build(args, args.model), data=args.data, batch_sizes=batches, threads=args.threads,
                        repeats=args.repeats, iterations=args.iterations, refuse=[args.json, args.plot])
    print(markdown(report))
    save_bench(report, args.json, args.plot)
    return 0


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def _print_quantize(r: dict) -> None:
    for kept in r["batchnorm_kept"]:
        print(f"warning: BatchNorm '{kept['bn']}' is not folded and stays float32 between quantize/dequantize "
              f"pairs: {kept['reason']}")
    for kept in r.get("fp16", {}).get("kept_float32", []):
        print(f"kept in float32: {kept['node']} ({kept['op']}): {kept['why']}")
    for o in r["outputs"]:
        print(f"output {o['name']}: SQNR {_db(o['sqnr_db'])}, max abs error {o['max_abs']:.3g}"
              + (f", top-1 agreement {100 * o['top1_agreement']:.2f}%" if o["top1_agreement"] is not None else "")
              + (f" ({o['problem']})" if o.get("problem") else ""))
    if r["accuracy"]:
        print("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["accuracy"].items()))


def cmd_quantize(args: argparse.Namespace) -> int:
    from bnrt.pipeline.quantize import QuantizeOptions, quantize_file

    start = time.perf_counter()
    options = QuantizeOptions(args.precision, args.calibration, args.calibration_samples, tuple(args.exclude),
                              not args.no_keep_io_types, args.max_accuracy_drop, args.max_disagreement)
    source = SourceArgs.build(args, args.model)
    SourceArgs.refuse_on_onnx(args, source, "")
    outcome = quantize_file(source, args.data, args.output_dir, options, progress=ProgressArgs.build(args))
    r = outcome.report
    _print_quantize(r)
    b = r["budget"]
    print(f"{b['kind']}: {b['value']:.3g} (budget {b['limit']:g}) -> {'ok' if outcome.passed else 'OVER BUDGET'}")
    if outcome.passed:
        print(f"wrote {', '.join(str(p) for p in outcome.written)} in {time.perf_counter() - start:.2f} s")
        return 0
    if r["worst_layers"]:
        print("worst layers by SQNR (exclude with --exclude NODE …): " + ", ".join(
            f"{w['node']} ({_db(w['sqnr_db'])})" for w in r["worst_layers"]))
    print(f"wrote only {outcome.report_path}: the {r['precision']} model is not written when it is over budget",
          file=sys.stderr)
    return 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from bnrt.pipeline.convert import inspect_file
    from bnrt.verify.report import decision_table

    loaded, decisions = inspect_file(SourceArgs.build(args, args.model), data=args.data)
    if loaded is not None:
        print(f"{loaded.path}  {loaded.source_format}  arch {loaded.arch}  {loaded.precision}  sha256 {loaded.sha256[:12]}")
        for note in loaded.notes:
            print(f"{loaded.path}: {note}")
    print(decision_table(decisions))
    return 0


COMMANDS = {"fold": cmd_fold, "check": cmd_check, "calibrate": cmd_calibrate, "run": cmd_run, "serve": cmd_serve,
            "triton": cmd_triton, "kserve": cmd_kserve, "bench": cmd_bench, "inspect": cmd_inspect, "quantize": cmd_quantize}
