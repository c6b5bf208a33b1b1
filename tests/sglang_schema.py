"""SGLang's own request/response schema, to validate what the client sends and the engine answers.

``sglang/api/v1/api_types.py`` of sglang 0.5.23 imports only msgspec, so it is read from the wheel
(``make test`` downloads it into .cache/wheels without installing SGLang, which needs CUDA) and
loaded on its own. Without the wheel, ``tests/data/sglang_0.5.23_fields.json`` (the field lists of
the same classes, recorded from that file) checks key names instead.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = "0.5.23"
CLASSES = ("GenerateRequest", "SamplingParams", "GenerateResponse", "GenerateMetaInfo", "GetModelInfoResponse",
           "GetServerInfoResponse", "AbortRequest", "FinishStop", "FinishLength", "FinishAbort")


def load_api_types(cache_dir: str):
    """The generated module, or None when the wheel is not there."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".cache", "wheels", f"sglang-{VERSION}-*.whl")))
    if not wheels:
        return None
    target = os.path.join(cache_dir, "sglang_api_types.py")
    with zipfile.ZipFile(wheels[0]) as wheel, open(target, "wb") as out:
        out.write(wheel.read("sglang/api/v1/api_types.py"))
    spec = importlib.util.spec_from_file_location("sglang_api_types_0_5_23", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves forward references through the module
    spec.loader.exec_module(module)
    return module


def recorded_fields() -> dict[str, list[str]]:
    with open(os.path.join(ROOT, "tests", "data", f"sglang_{VERSION}_fields.json")) as f:
        return json.load(f)


def fields_of(api, name: str) -> list[str]:
    return list(getattr(api, name).__struct_fields__)


class Schema:
    """``check(name, value)`` decodes ``value`` with SGLang's decoder for class ``name`` (raising
    its JsonContractError on a violation), or without the wheel checks key names against the
    recorded list (SamplingParams rejects unknown keys, the others ignore them)."""

    def __init__(self, cache_dir: str):
        self.api = load_api_types(cache_dir)
        self.source = f"sglang {VERSION} wheel" if self.api else f"recorded sglang {VERSION} field list"

    def check(self, name: str, value):
        if self.api is not None:
            return getattr(self.api, f"decode_{name}")(value)
        fields = recorded_fields()[name]
        if name == "SamplingParams":
            unknown = set(value) - set(fields)
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)} in {name}")
        if name == "GenerateRequest" and isinstance(value.get("sampling_params"), dict):
            self.check("SamplingParams", value["sampling_params"])
        return value
