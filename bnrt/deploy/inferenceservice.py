"""Deploy stage, for KServe on Kubernetes: an ``InferenceService`` manifest that serves a Triton
model repository (``bnrt triton``) with KServe's Triton runtime.

The repository is uploaded by the user to ``storage_uri`` (``gs://``, ``s3://``, ``pvc://``…);
KServe's storage initializer copies it to ``/mnt/models`` and the ``kserve-tritonserver`` runtime
starts ``tritonserver --model-store=/mnt/models``, which serves every model of the repository under
its own name (``/v2/models/NAME/infer``, the protocol ``bnrt serve`` speaks). The manifest is the
``serving.kserve.io/v1beta1`` schema of KServe's Python SDK (``V1beta1InferenceService``), written
as YAML by hand (strings double-quoted, the JSON escapes YAML shares), so bnrt needs no YAML
library; the tests read it back into the SDK's model classes.

Resources: CPU and memory requested and limited alike (Guaranteed QoS: a model server evicted under
pressure drops requests). Memory by default is 1 GiB (Triton and the ONNX Runtime backend) plus
twice the repository's model files per instance (the weights as loaded, and ORT's copies of them
while it optimises the graph), rounded up to 256 MiB. One GPU when a model's ``instance_group`` is
``KIND_GPU`` (``bnrt triton --gpu``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bnrt.errors import InputError, OptionError
from bnrt.deploy.triton import model_config_pb2
from bnrt.io.save import atomic_path

API_VERSION = "serving.kserve.io/v1beta1"
SCHEMES = ("gs", "s3", "pvc", "hdfs", "webhdfs", "https", "http", "oci", "hf")  # KServe's storage initializer
PROTOCOLS = ("v2", "grpc-v2")
MIB = 1 << 20
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # a DNS-1035 label: KServe's names for services
# KServe names the predictor NAME-predictor and Knative adds a revision suffix and host labels:
# longer names pass validation but do not reconcile
MAX_NAME = 45
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label
_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # a DNS-1123 subdomain
_TAG = re.compile(r"[\w][\w.-]{0,127}")  # an image tag
_CPU = re.compile(r"\d+(\.\d+)?m?")
_MEMORY = re.compile(r"\d+(\.\d+)?([kMGTPE]|[KMGTPE]i)?")


@dataclass(frozen=True)
class ServiceOptions:
    """What the manifest says beyond the repository: the service's ``name`` (default: the
    repository folder's name made a DNS label) and ``namespace``, the wire ``protocol`` (``v2``:
    HTTP/REST, ``grpc-v2``), Triton's image tag (``runtime_version``; None: the runtime's own),
    ``cpu`` and ``memory`` as Kubernetes quantities (None: see the module), ``gpus`` (None: one
    when a model asks for GPU instances), replicas, and the ``service_account`` holding the
    storage credentials."""

    name: str | None = None
    namespace: str | None = None
    protocol: str = "v2"
    runtime_version: str | None = None
    cpu: str = "1"
    memory: str | None = None
    gpus: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    service_account: str | None = None

    def check(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise OptionError(f"`protocol` {self.protocol!r}: one of {', '.join(PROTOCOLS)}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas == 0:
            raise OptionError(f"replicas {self.min_replicas}..{self.max_replicas}: need 0 <= min <= max and max >= 1")
        if self.gpus is not None and self.gpus < 0:
            raise OptionError(f"`gpus` {self.gpus}: not negative")
        if not _CPU.fullmatch(self.cpu) or float(self.cpu.rstrip("m")) <= 0:
            raise OptionError(f"`cpu` {self.cpu!r}: a Kubernetes CPU quantity like 2 or 500m")
        if self.memory is not None and not _MEMORY.fullmatch(self.memory):
            raise OptionError(f"`memory` {self.memory!r}: a Kubernetes memory quantity like 4Gi or 512Mi")
        for what, value, pattern, most, wanted in (
                ("name", self.name, _NAME, MAX_NAME, "lowercase letters, digits and '-', starting with a letter"),
                ("namespace", self.namespace, _NAMESPACE, 63, "lowercase letters, digits and '-'"),
                ("service_account", self.service_account, _ACCOUNT, 253, "lowercase letters, digits, '-' and '.'"),
                ("runtime_version", self.runtime_version, _TAG, 128, "an image tag: letters, digits, '_', '.', '-'")):
            if value is not None and not (pattern.fullmatch(value) and len(value) <= most):
                raise OptionError(f"`{what}` {value!r}: {wanted}, at most {most} characters")


@dataclass(frozen=True)
class RepoModel:
    """A model of a Triton repository: ``name``, its ``versions`` (numbered folders), ``bytes`` of
    the files of the versions Triton loads (its ``version_policy``: by default the latest),
    ``instances`` (instance_group counts, 1 without a group) and ``gpu``."""

    name: str
    versions: tuple[int, ...]
    bytes: int
    instances: int
    gpu: bool


def read_repository(repo: str | Path) -> list[RepoModel]:
    """The models of the Triton repository ``repo`` (``NAME/config.pbtxt`` and ``NAME/N/`` version
    folders); ``InputError`` naming the file for what Triton would refuse to load."""
    from google.protobuf import text_format

    repo = Path(repo)
    if not repo.is_dir():
        raise InputError(f"{repo}: no such folder (a Triton model repository, as bnrt triton writes)")
    schema = model_config_pb2()
    models = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_path = folder / "config.pbtxt"
        if not config_path.is_file():
            raise InputError(f"{config_path}: missing; every model folder of a Triton repository needs one")
        try:
            config = text_format.Parse(config_path.read_text(), schema.ModelConfig())
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise InputError(f"{config_path}: not a Triton model config ({exc})") from exc
        if config.name and config.name != folder.name:
            raise InputError(f"{config_path}: names model {config.name!r} in folder {folder.name!r}; Triton "
                             "refuses a config whose name differs from its folder")
        versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            raise InputError(f"{folder}: no version folder (1/model.onnx)")
        files = [f for v in _loaded(config, versions) for f in (folder / str(v)).rglob("*") if f.is_file()]
        groups = list(config.instance_group)
        models.append(RepoModel(folder.name, tuple(versions), sum(f.stat().st_size for f in files),
                                sum(max(g.count, 1) for g in groups) or 1,
                                any(g.kind == schema.ModelInstanceGroup.KIND_GPU for g in groups)))
    if not models:
        raise InputError(f"{repo}: no model folders (NAME/config.pbtxt); write one with bnrt triton")
    return models


def _loaded(config, versions: list[int]) -> list[int]:
    """The versions Triton loads under the config's ``version_policy`` (default: the latest one)."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return versions
    if kind == "specific":
        return [v for v in versions if v in set(policy.specific.versions)]
    return versions[-max(policy.latest.num_versions, 1):] if kind == "latest" else versions[-1:]


def _storage_uri(uri: str) -> str:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES or not rest.strip("/") or any(c.isspace() or not c.isprintable() for c in uri):
        raise OptionError(f"`storage_uri` {uri!r}: where the repository was uploaded, e.g. gs://BUCKET/PATH or "
                          f"pvc://CLAIM/PATH ({', '.join(s + '://' for s in SCHEMES)})")
    return uri


def default_name(repo: Path) -> str:
    """The repository folder's name as a DNS label: lowercase, other characters '-'."""
    name = re.sub(r"[^a-z0-9-]+", "-", repo.resolve().name.lower()).strip("-")[:MAX_NAME].strip("-")
    if not _NAME.fullmatch(name or "-"):
        raise OptionError(f"{repo}: its folder name makes no service name; give --name")
    return name


def default_memory(models: list[RepoModel]) -> str:
    total = 1024 * MIB + sum(2 * m.bytes * m.instances for m in models)
    return f"{math.ceil(total / (256 * MIB)) * 256}Mi"


def manifest(repo: str | Path, storage_uri: str, options: ServiceOptions = ServiceOptions()) -> dict:
    """The ``InferenceService`` for the repository ``repo`` uploaded to ``storage_uri``."""
    options.check()
    models = read_repository(repo)
    storage_uri = _storage_uri(storage_uri)
    name = options.name or default_name(Path(repo))
    memory = options.memory or default_memory(models)
    gpus = options.gpus if options.gpus is not None else int(any(m.gpu for m in models))
    limits = {"cpu": options.cpu, "memory": memory} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    model = {"modelFormat": {"name": "triton", "version": "2"}, "runtime": "kserve-tritonserver",
             "protocolVersion": options.protocol, "storageUri": storage_uri}
    if options.runtime_version:
        model["runtimeVersion"] = options.runtime_version
    model["resources"] = {"limits": limits, "requests": {"cpu": options.cpu, "memory": memory}}
    predictor = {"minReplicas": options.min_replicas, "maxReplicas": options.max_replicas}
    if options.service_account:
        predictor["serviceAccountName"] = options.service_account
    metadata = {"name": name} | ({"namespace": options.namespace} if options.namespace else {})
    metadata["annotations"] = {"bnrt/models": ",".join(m.name for m in models)}
    return {"apiVersion": API_VERSION, "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor | {"model": model}}}


_LINE_BREAKS = {"\u0085": "\\N", "\u2028": "\\L", "\u2029": "\\P"}  # YAML 1.1 reads these as line breaks


def _scalar(value) -> str:
    """A YAML scalar: a double-quoted string (JSON's escapes for what is not printable, every other
    character as it is: JSON's surrogate pairs for characters beyond the BMP are not YAML)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(_LINE_BREAKS.get(c, c if c.isprintable() or c in "\\\"" else
                                    f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}") for c in text)


def to_yaml(data, indent: int = 0) -> str:
    """``data`` (dicts, lists, strings, ints) as block YAML; strings double-quoted."""
    pad = " " * indent
    lines = []
    items = data.items() if isinstance(data, dict) else ((None, v) for v in data)
    for key, value in items:
        head = f"{pad}{key}:" if key is not None else f"{pad}-"
        if isinstance(value, (dict, list)) and value:
            lines.append(head)
            lines.append(to_yaml(value, indent + 2))
        else:
            lines.append(f"{head} {_scalar(value) if not isinstance(value, (dict, list)) else json.dumps(value)}")
    return "\n".join(lines)


def write_manifest(repo: str | Path, storage_uri: str, out_dir: str | Path,
                   options: ServiceOptions = ServiceOptions()) -> tuple[Path, dict]:
    """Write ``out_dir/NAME.yaml`` (atomically); returns its path and the manifest."""
    data = manifest(repo, storage_uri, options)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from exc
    path = out_dir / f"{data['metadata']['name']}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(f"# bnrt kserve: the Triton repository {json.dumps(Path(repo).resolve().name)} at "
                       f"{storage_uri}\n{to_yaml(data)}\n")
    return path, data
