"""`bnrt kserve REPO --storage-uri URI -o DIR`: the InferenceService manifest, read back into the
kserve SDK's model classes (and Kubernetes' for metadata and resources): every key a field of its
class, every value of its type, required fields present, nothing lost on the way back."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper, numpy_helper

from bnrt.deploy.inferenceservice import ServiceOptions, manifest, to_yaml
from bnrt.deploy.triton import TritonOptions, write_repository

from ..conftest import ROOT, assert_one_line_error, bn_node, bn_params, onnx_graph, run_cli

def validated(*paths) -> list[dict]:
    """The manifests at ``paths`` read back by the kserve SDK (``tests/deploy/kserve_sdk.py``, in a
    process of its own: kserve's and tritonclient's protocol definitions cannot share one), as the
    SDK objects' fields."""
    proc = subprocess.run([sys.executable, "-m", "tests.deploy.kserve_sdk", *map(str, paths)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _repo(tmp_path, name="digits", gpu=False, instances=1):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), bn_node("h", "y")]
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(np.float32), "w"), *bn_params(3, rng)]
    src = tmp_path / f"{name}.onnx"
    onnx.save(onnx_graph(nodes, inits, [None, 2, 4, 4]), str(src))
    write_repository(src, tmp_path / "model-repo", name=name, options=TritonOptions(gpu=gpu, instances=instances))
    return tmp_path / "model-repo", src.stat().st_size


def test_the_cli_writes_a_manifest_the_kserve_sdk_reads_back(tmp_path):
    repo, size = _repo(tmp_path)
    proc = run_cli("kserve", str(repo), "--storage-uri", "gs://bucket/models/digits", "-o", str(tmp_path / "deploy"),
                   "--runtime-version", "25.01-py3", "--min-replicas", "0", "--max-replicas", "3")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "deploy" / "model-repo.yaml"
    assert f"wrote {path}; serves digits" in proc.stdout
    assert size < 10_000  # memory: 1 GiB + twice a few kB, rounded up to 256 MiB
    assert validated(path) == [{
        "api_version": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": "model-repo",
        "namespace": None, "annotations": {"bnrt/models": "digits"}, "min_replicas": 0, "max_replicas": 3,
        "service_account": None, "format": ["triton", "2"], "runtime": "kserve-tritonserver",
        "runtime_version": "25.01-py3", "protocol": "v2", "storage_uri": "gs://bucket/models/digits",
        "limits": {"cpu": "1", "memory": "1280Mi"}, "requests": {"cpu": "1", "memory": "1280Mi"}}]


def test_gpu_instances_ask_for_a_gpu_and_options_reach_the_manifest(tmp_path):
    repo, _ = _repo(tmp_path, gpu=True, instances=2)
    options = ServiceOptions(name="ocr", namespace="serving", protocol="grpc-v2", cpu="500m", memory="6Gi",
                             service_account="storage")
    (tmp_path / "a.yaml").write_text(to_yaml(manifest(repo, "pvc://claim/repo", options)))
    (tmp_path / "b.yaml").write_text(to_yaml(manifest(repo, "s3://b/r", ServiceOptions(gpus=0))))
    given, no_gpu = validated(tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert (given["name"], given["namespace"], given["service_account"], given["protocol"]) == (
        "ocr", "serving", "storage", "grpc-v2")
    assert given["limits"] == {"cpu": "500m", "memory": "6Gi", "nvidia.com/gpu": "1"}
    assert given["requests"] == {"cpu": "500m", "memory": "6Gi"}
    assert no_gpu["limits"] == {"cpu": "1", "memory": "1280Mi"}


def test_the_sdk_check_catches_a_misspelt_field_and_a_wrong_type(tmp_path):
    repo, _ = _repo(tmp_path)
    data = manifest(repo, "gs://b/r")
    data["spec"]["predictor"]["model"]["storageURI"] = data["spec"]["predictor"]["model"].pop("storageUri")
    (tmp_path / "misspelt.yaml").write_text(to_yaml(data))
    data = manifest(repo, "gs://b/r")
    data["spec"]["predictor"]["minReplicas"] = "1"
    (tmp_path / "typed.yaml").write_text(to_yaml(data))
    for name, fragment in (("misspelt", "V1beta1ModelSpec has no field(s) ['storageURI']"), ("typed", "'int', '1'")):
        proc = subprocess.run([sys.executable, "-m", "tests.deploy.kserve_sdk", str(tmp_path / f"{name}.yaml")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr


def test_default_memory_counts_the_versions_triton_loads_and_every_instance(tmp_path):
    repo, _ = _repo(tmp_path, instances=3)
    big = repo / "digits" / "2"
    big.mkdir()
    (big / "model.onnx").write_bytes(b"\0" * (300 << 20))  # a second, larger version: 300 MiB

    def memory() -> str:
        return manifest(repo, "gs://b/r")["spec"]["predictor"]["model"]["resources"]["limits"]["memory"]

    # the latest version (Triton's default policy): 1 GiB + 2 x (300 MiB + a few kB) x 3 instances, to 256 MiB
    assert memory() == "3072Mi"
    (repo / "digits" / "3").mkdir()
    (repo / "digits" / "3" / "model.onnx").write_bytes(b"\0" * 1000)  # a small latest version
    assert memory() == "1280Mi"
    config = repo / "digits" / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy { all { } }\n")
    assert memory() == "3072Mi"
    config.write_text(config.read_text().replace("all { }", "specific { versions: 1 versions: 3 }"))
    assert memory() == "1280Mi"


def test_the_yaml_quotes_what_yaml_would_read_otherwise():
    data = {"a": "yes", "b": "0123", "c": 'say "hi"\n', "d": 7, "e": ["on", 1], "f": {}, "g": "a\U0001f600b",
            "h": "line\u2028sep\x85nel\x01"}
    assert yaml.safe_load(to_yaml(data)) == data


@pytest.mark.parametrize("args,fragments", [
    (["--storage-uri", "ftp://host/repo"], ["--storage-uri 'ftp://host/repo'", "gs://"]),
    (["--storage-uri", "gs://"], ["--storage-uri 'gs://'"]),
    (["--storage-uri", "gs://b/r", "--min-replicas", "2", "--max-replicas", "1"], ["replicas 2..1"]),
    (["--storage-uri", "gs://b/r", "--name", "Bad_Name"], ["--name 'Bad_Name'"]),
    (["--storage-uri", "gs://b/r", "--name", "a" * 46], ["at most 45 characters"]),
    (["--storage-uri", "gs://b/r", "--runtime-version", "25.01 py3"], ["--runtime-version '25.01 py3'"]),
    (["--storage-uri", "gs://b/r", "--service-account", "Storage"], ["--service-account 'Storage'"]),
    (["--storage-uri", "gs://b/r", "--cpu", "lots"], ["--cpu 'lots'"]),
    (["--storage-uri", "gs://b/r", "--memory", "4GB"], ["--memory '4GB'"]),
])
def test_bad_options_are_one_line(tmp_path, args, fragments):
    repo, _ = _repo(tmp_path)
    proc = run_cli("kserve", str(repo), *args, "-o", str(tmp_path / "deploy"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "deploy").exists() or not any((tmp_path / "deploy").iterdir())


def test_what_is_not_a_repository_is_one_line_naming_the_file(tmp_path):
    out = str(tmp_path / "deploy")
    assert_one_line_error(run_cli("kserve", str(tmp_path / "none"), "--storage-uri", "gs://b/r", "-o", out),
                          "none: no such folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("kserve", str(tmp_path / "empty"), "--storage-uri", "gs://b/r", "-o", out),
                          "empty: no model folders")
    repo, _ = _repo(tmp_path)
    (repo / "digits" / "config.pbtxt").write_text("name: 'other'\n")
    assert_one_line_error(run_cli("kserve", str(repo), "--storage-uri", "gs://b/r", "-o", out),
                          "config.pbtxt: names model 'other' in folder 'digits'")
    (repo / "digits" / "config.pbtxt").write_text("not a config {")
    assert_one_line_error(run_cli("kserve", str(repo), "--storage-uri", "gs://b/r", "-o", out),
                          "config.pbtxt: not a Triton model config")
    assert not (tmp_path / "deploy").exists()
