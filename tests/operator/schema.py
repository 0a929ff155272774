"""Checks an object against a CRD's openAPIV3Schema the way the API server's structural
validation does, for the keywords our CRDs use (CEL rules are evaluated by the test that
needs them). Returns every violation with its path, so a failing test says what broke."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def crd_schema(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the CRD document, the schema of its storage version) for a kind."""
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["storage"])
            return crd, version["schema"]["openAPIV3Schema"]
    raise LookupError(f"no CRD for kind {kind}")


def violations(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
    where = path or "<root>"
    kind = schema.get("type")
    if kind is not None:
        expected = _TYPES[kind]
        if (isinstance(value, bool) and kind != "boolean") or not isinstance(value, expected):
            return [f"{where}: expected {kind}, got {type(value).__name__}"]
    found: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            found.append(f"{where}: shorter than {schema['minLength']}")
        if len(value) > schema.get("maxLength", len(value)):
            found.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value <= low if schema.get("exclusiveMinimum") else value < low):
            found.append(f"{where}: {value} below minimum {low}")
        if high is not None and value > high:
            found.append(f"{where}: {value} above maximum {high}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            found.append(f"{where}: fewer than {schema['minItems']} items")
        if len(value) > schema.get("maxItems", len(value)):
            found.append(f"{where}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            found += violations(schema.get("items", {}), item, f"{path}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                found.append(f"{where}: {key} is required")
        if len(value) < schema.get("minProperties", 0):
            found.append(f"{where}: fewer than {schema['minProperties']} properties")
        if len(value) > schema.get("maxProperties", len(value)):
            found.append(f"{where}: more than {schema['maxProperties']} properties")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if key in properties:
                found += violations(properties[key], item, child)
            elif isinstance(extra, Mapping):
                found += violations(extra, item, child)
            elif kind == "object" and properties and key != "metadata":
                # Structural schemas prune unknown fields; a manifest relying on one is wrong.
                found.append(f"{child}: unknown field")
    return found
