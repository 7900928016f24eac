"""Generate the Python stubs for every proto tree, or check they are current.

Usage:
    python scripts/generate_stubs.py          # write the stubs
    python scripts/generate_stubs.py --check  # exit 1 if any committed stub differs

Two trees, each generated into a place of its own:

- proto/ (the PetSage API) into petsage_grpc/_generated;
- examples/proto/ (the embedding example's own service) into examples/example_stubs,
  which examples/embed.py imports with examples/ on sys.path (as when run as a script).

grpcio-tools writes absolute imports (``from petsage.v1 import ...``) that only work
with the proto root on sys.path; they are rewritten to the stubs' package path.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


@dataclass(frozen=True)
class _Tree:
    proto_root: Path
    out: Path
    package: str
    """The import path of *out*, which replaces the proto package in generated imports."""


TREES = (
    _Tree(ROOT / "proto", ROOT / "petsage_grpc" / "_generated", "petsage_grpc._generated"),
    _Tree(ROOT / "examples" / "proto", ROOT / "examples" / "example_stubs", "example_stubs"),
)


def _generate(tree: _Tree, out: Path) -> None:
    protos = sorted(str(p.relative_to(tree.proto_root)) for p in tree.proto_root.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{tree.proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pattern = re.compile(r"^from (petsage(?:\.\w+)*) import ", re.MULTILINE)
    for path in out.rglob("*"):
        if not path.name.endswith(GENERATED_SUFFIXES):
            continue  # __pycache__/*.pyc once the stubs have been imported, __init__.py
        text = path.read_text()
        fixed = pattern.sub(lambda m: f"from {tree.package}.{m.group(1)} import ", text)
        path.write_text(fixed)


def _generated_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def _write(tree: _Tree) -> None:
    tree.out.mkdir(exist_ok=True)
    for path in _generated_files(tree.out):
        (tree.out / path).unlink()
    _generate(tree, tree.out)
    # Packages for the import path (protoc writes modules only).
    for folder in [tree.out, *(p for p in tree.out.rglob("*") if p.is_dir())]:
        if folder.name != "__pycache__" and not (folder / "__init__.py").exists():
            (folder / "__init__.py").touch()
    print(f"stubs written to {tree.out.relative_to(ROOT)}")


def _is_current(tree: _Tree) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        _generate(tree, Path(tmp))
        expected = _generated_files(Path(tmp))
    actual = _generated_files(tree.out)
    if expected == actual:
        return True
    where = tree.out.relative_to(ROOT)
    for name in sorted(expected.keys() | actual.keys()):
        diff = difflib.unified_diff(
            actual.get(name, "").splitlines(keepends=True),
            expected.get(name, "").splitlines(keepends=True),
            f"committed/{where}/{name}",
            f"generated/{where}/{name}",
        )
        sys.stdout.writelines(diff)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        for tree in TREES:
            _write(tree)
        return 0
    stale = [tree for tree in TREES if not _is_current(tree)]
    if not stale:
        print("stubs are current")
        return 0
    print("stubs are stale: run `python scripts/generate_stubs.py` and commit the result")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
