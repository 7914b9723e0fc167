"""Generate the CustomResourceDefinitions from the pydantic models (the one source of the schema).

pydantic's JSON schema is turned into a Kubernetes *structural* schema: ``$ref`` inlined, ``Optional``
unwrapped (absent means unset), enums and patterns kept, CEL ``x-kubernetes-validations`` carried over.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import names
from .resources import (BaseModelPoolSpec, BaseModelPoolStatus, LoRAAdapterSpec, LoRAAdapterStatus, LoRATenantSpec,
                        LoRATenantStatus)

_KEEP = {
    "type", "properties", "required", "items", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "description", "format", "default",
    "additionalProperties", "nullable", "x-kubernetes-validations", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Structural openAPIV3Schema for a pydantic JSON schema."""
    defs = defs if defs is not None else schema.get("$defs", {})
    s = copy.deepcopy(schema)
    if "$ref" in s:
        ref = defs[s.pop("$ref").split("/")[-1]]
        merged = {**copy.deepcopy(ref), **s}  # the field's own description wins over the def's
        return structural(merged, defs)
    if "anyOf" in s:
        options = [o for o in s.pop("anyOf") if o.get("type") != "null"]
        if s.get("x-kubernetes-int-or-string"):
            s.pop("type", None)
            return {k: v for k, v in s.items() if k in _KEEP and not (k == "default" and v is None)}
        if len(options) == 1:
            return structural({**options[0], **s}, defs)
        raise ValueError(f"cannot express anyOf {options} in a structural schema")
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.pop("default", None) if not isinstance(s.get("default"), (int, str)) else None
    if "const" in s:
        s["enum"] = [s.pop("const")]
    out: dict[str, Any] = {}
    for key, value in s.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {k: structural(v, defs) for k, v in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = structural(value, defs)
            elif value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False: structural schemas prune unknown fields already
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in out and isinstance(out["default"], dict) and not out["default"]:
        out.pop("default")
    return out


def _schema_of(model) -> dict[str, Any]:
    js = model.model_json_schema(by_alias=True, mode="validation")
    return structural(js)


def _crd(kind: str, plural: str, short: str, spec_model, status_model, columns: list[dict], desc: str):
    spec = _schema_of(spec_model)
    status = _schema_of(status_model)
    # Defaults of nested objects that the server fills are fine; status carries none.
    status = _strip_defaults(status)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{names.GROUP}", "labels": {"app.kubernetes.io/name": "lorafleet"}},
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind, "plural": plural, "singular": kind.lower(), "shortNames": [short],
                "listKind": f"{kind}List", "categories": ["lorafleet"],
            },
            "versions": [{
                "name": names.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": desc,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


def _strip_defaults(s: Any) -> Any:
    if isinstance(s, dict):
        return {k: _strip_defaults(v) for k, v in s.items() if k != "default"}
    if isinstance(s, list):
        return [_strip_defaults(v) for v in s]
    return s


def crd_manifests() -> dict[str, dict[str, Any]]:
    """File name -> CRD manifest."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    adapter = _crd(
        names.ADAPTER_KIND, names.ADAPTER_PLURAL, names.ADAPTER_SHORT, LoRAAdapterSpec, LoRAAdapterStatus,
        [
            {"name": "Pool", "type": "string", "jsonPath": ".spec.pool"},
            {"name": "Tenant", "type": "string", "jsonPath": ".spec.tenant"},
            # What the replicas serve (the draining version mid-rollout), then what the spec wants.
            {"name": "Version", "type": "string", "jsonPath": ".status.servedVersion",
             "description": "the version ready replicas serve"},
            {"name": "Wanted", "type": "string", "jsonPath": ".spec.version",
             "description": "the version the spec asks for"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {"name": "Placed", "type": "integer", "jsonPath": ".status.placed",
             "description": "replicas the adapter is placed on"},
            age,
            {"name": "Pods", "type": "string", "jsonPath": ".status.placement", "priority": 1,
             "description": "the pods it is placed on (when placed on some replicas, not all)"},
        ],
        "One tenant's LoRA adapter, at an exact version and digest, served by a BaseModelPool.",
    )
    pool = _crd(
        names.POOL_KIND, names.POOL_PLURAL, names.POOL_SHORT, BaseModelPoolSpec, BaseModelPoolStatus,
        [
            {"name": "Task", "type": "string", "jsonPath": ".spec.model.task"},
            {"name": "Engine", "type": "string", "jsonPath": ".spec.runtime.engine",
             "description": "what runs the model: auto, torch or vllm"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {"name": "Adapters", "type": "integer", "jsonPath": ".status.adapters"},
            {"name": "Adapters-Ready", "type": "integer", "jsonPath": ".status.adaptersReady"},
            # ModelLoaded, ModelLoading, or ModelRefused / ModelLoadFailed (the reason is in -o wide).
            {"name": "Model", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"ModelReady\")].reason",
             "description": "the ModelReady condition's reason"},
            age,
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
        ],
        "A base model and the pods that serve its tenants' adapters.",
    )
    tenant = _crd(
        names.TENANT_KIND, names.TENANT_PLURAL, names.TENANT_SHORT, LoRATenantSpec, LoRATenantStatus,
        [
            {"name": "Sources", "type": "string", "jsonPath": ".spec.sources"},
            {"name": "RPS", "type": "number", "jsonPath": ".spec.rateLimit.requestsPerSecond"},
            {"name": "Concurrency", "type": "integer", "jsonPath": ".spec.maxConcurrency"},
            # How many of its API key digests the gateway accepts (the operator writes it).
            {"name": "Keys", "type": "integer", "jsonPath": ".status.keys"},
            age,
        ],
        "A tenant: where its adapters may come from, its API keys' digests, its rate limit and concurrency.",
    )
    return {
        f"{names.GROUP}_{names.ADAPTER_PLURAL}.yaml": adapter,
        f"{names.GROUP}_{names.POOL_PLURAL}.yaml": pool,
        f"{names.GROUP}_{names.TENANT_PLURAL}.yaml": tenant,
    }


HEADER = "# Generated by `lorafleet gen-crds` from lorafleet.contracts. Do not edit by hand.\n"


def render(manifest: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(manifest, sort_keys=False, width=120)
