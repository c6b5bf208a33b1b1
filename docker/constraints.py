"""Write the pip constraints of the image's trainer environment (stdlib only; run during the build).

The NGC base image ships PyTorch built from source (a version such as ``2.14.0a0+<git>.nv26.09``)
and compiles its extensions (TransformerEngine, apex, flash-attn, ...) against exactly that build.
A plain ``pip install`` of anything that requires ``torch==X`` would replace it with a PyPI wheel
and silently break those extensions. NGC points ``PIP_CONSTRAINT`` at ``/etc/pip/constraint.txt``
for this reason; its content varies between releases (recent ones ship it empty), so this script
rewrites it with:

1. the base file's own lines (if any), minus the packages this image replaces or pins itself;
2. ``name==<installed version>`` for every ``--keep`` distribution found in the environment
   (the torch stack: its exact local version string, so pip can only keep it);
3. ``--pin`` arguments and ``--pins-file`` lines (the Dockerfile's versions; they win over 1).

Usage (see docker/Dockerfile)::

    python constraints.py --out /etc/pip/constraint.txt --base /etc/pip/constraint.txt \
        --keep torch torchvision triton --pin megatron-core==0.16.1 --pins-file pins.txt \
        --drop transformer-engine apex
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    """The project named by a constraints line, or None for comments, blanks and options."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = NAME.match(text)
    return canonical(match.group(1)) if match else None


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.rstrip("\n") for line in path.read_text().splitlines()]


def installed_pins(names: list[str]) -> list[str]:
    pins = []
    for name in names:
        try:
            pins.append(f"{canonical(name)}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def merge(base: list[str], keep: list[str], pins: list[str], drop: set[str]) -> list[str]:
    ours = keep + pins
    owned = {requirement_name(line) for line in ours} | {canonical(d) for d in drop}
    owned.discard(None)
    out = ["# written by docker/constraints.py during the image build: the torch stack stays as "
           "the base image built it"]
    kept_base = [line for line in base if requirement_name(line) not in (owned | {None})]
    if kept_base:
        out.append("# --- from the base image's constraint file")
        out += kept_base
    out.append("# --- the base image's torch stack, exactly as installed")
    out += keep
    out.append("# --- this image's pins")
    out += pins
    seen: dict[str, str] = {}
    for line in out:
        name = requirement_name(line)
        if name is None:
            continue
        if name in seen and seen[name] != line.strip():
            raise SystemExit(f"conflicting constraints for {name}: {seen[name]!r} and {line.strip()!r}")
        seen[name] = line.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, help="the base image's constraint file (may be missing or empty)")
    parser.add_argument("--keep", nargs="*", default=[], help="installed distributions to pin at their version")
    parser.add_argument("--pin", action="append", default=[], help="name==version (repeatable)")
    parser.add_argument("--pins-file", type=Path, action="append", default=[])
    parser.add_argument("--drop", nargs="*", default=[], help="projects to remove from the base file")
    args = parser.parse_args(argv)

    keep = installed_pins(args.keep)
    if not any(requirement_name(p) == "torch" for p in keep) and "torch" in map(canonical, args.keep):
        print("constraints.py: torch is not installed in this environment", file=sys.stderr)
        return 1
    pins = [p.strip() for p in args.pin]
    for path in args.pins_file:
        pins += [line.strip() for line in read_lines(path) if requirement_name(line)]
    for pin in pins:
        if "==" not in pin:
            print(f"constraints.py: {pin!r} is not an exact pin (name==version)", file=sys.stderr)
            return 1
    lines = merge(read_lines(args.base) if args.base else [], keep, pins, set(args.drop))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
