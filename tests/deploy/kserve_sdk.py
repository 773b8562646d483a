"""Reads InferenceService manifests into the kserve SDK's model classes (and Kubernetes' for
metadata and resources), strictly, and prints each one's fields as the SDK objects hold them, a
JSON line per file. Run as ``python -m tests.deploy.kserve_sdk FILE.yaml...``, in a process of its
own: the kserve package registers KServe's protocol messages under the names tritonclient's use,
so the two cannot be imported in one process."""

from __future__ import annotations

import json
import re
import sys

import kserve
import kubernetes.client
import yaml

_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": float, "object": object}


def sdk_object(data, kind: str):
    """``data`` (parsed YAML) as an instance of the SDK class ``kind`` (kserve's, else Kubernetes'),
    strictly: an unknown key or a value of another type is an AssertionError; the classes' own
    client-side validation (required fields, allowed values) runs in their constructors."""
    container = re.fullmatch(r"(?:list\[(.*)\]|dict\(str, (.*)\)|Dict\[str, (.*)\])", kind)
    if container:
        inner = next(g for g in container.groups() if g)
        if kind.startswith("list"):
            assert isinstance(data, list), (kind, data)
            return [sdk_object(v, inner) for v in data]
        assert isinstance(data, dict), (kind, data)
        return {k: sdk_object(v, inner) for k, v in data.items()}
    if kind in _PRIMITIVES:
        assert isinstance(data, _PRIMITIVES[kind]) and not (kind == "int" and isinstance(data, bool)), (kind, data)
        return data
    cls = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind)
    assert isinstance(data, dict), (kind, data)
    fields = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = set(data) - set(fields)
    assert not unknown, f"{kind} has no field(s) {sorted(unknown)}"
    return cls(**{fields[k]: sdk_object(v, cls.openapi_types[fields[k]]) for k, v in data.items()})


def _within(data, back) -> bool:
    """Every key of ``data`` is in ``back`` with an equal value (``back`` may hold more)."""
    if isinstance(data, dict):
        return isinstance(back, dict) and all(k in back and _within(v, back[k]) for k, v in data.items())
    return data == back and type(data) is type(back)


def validated(data: dict) -> kserve.V1beta1InferenceService:
    service = sdk_object(data, "V1beta1InferenceService")
    back = kserve.ApiClient().sanitize_for_serialization(service)
    assert _within(data, back), (data, back)  # nothing dropped or converted (the SDK adds defaults: name '')
    return service


def fields(service: kserve.V1beta1InferenceService) -> dict:
    predictor = service.spec.predictor
    model = predictor.model
    return {"api_version": service.api_version, "kind": service.kind, "name": service.metadata.name,
            "namespace": service.metadata.namespace, "annotations": service.metadata.annotations,
            "min_replicas": predictor.min_replicas, "max_replicas": predictor.max_replicas,
            "service_account": predictor.service_account_name, "format": [model.model_format.name,
            model.model_format.version], "runtime": model.runtime, "runtime_version": model.runtime_version,
            "protocol": model.protocol_version, "storage_uri": model.storage_uri,
            "limits": model.resources.limits, "requests": model.resources.requests}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(json.dumps(fields(validated(yaml.safe_load(f)))))
