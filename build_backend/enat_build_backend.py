"""PEP 517 build backend: setuptools, with the build's torch pinned to the installed one.

The compiled extensions use torch's C++ API, whose ABI changes between releases, so
they only load under the torch they were compiled against.  Under build isolation
(plain `pip install .`) the build runs in a fresh environment, and a build requirement
of `torch>=2.11,<2.15` would fetch the newest torch there even when the environment
the package is installed into already has an older one: the extension would then be
refused at import.  So the torch build requirement is computed here: when the target
environment already has torch, the build gets exactly that version; otherwise the
declared range (and pip installs the same newest torch as the runtime dependency).

pip runs this backend with the target environment's interpreter, but with that
environment's site-packages hidden (PYTHONPATH, PYTHONNOUSERSITE); `python -I`
ignores those variables and sees them again.  Front ends that build in a separate
interpreter find no torch there and get the declared range; for them, and offline,
the README says to use `pip install --no-build-isolation .`.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (the other PEP 517 hooks unchanged)

TORCH_RANGE = "torch>=2.11,<2.15"  # as pyproject.toml's dependencies
# A version outside the supported range is not pinned: the build then fails on the
# range, as the runtime dependency would, instead of compiling for an unsupported torch.
SUPPORTED = ((2, 11), (2, 14))


def installed_torch_version(python: str = sys.executable) -> str | None:
    """The torch version installed for `python`, read from its metadata (no import)."""
    code = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        res = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def torch_requirement(installed: str | None) -> str:
    """`torch==<installed public version>` when it is in the supported range, else the range."""
    if os.environ.get("ENAT_KERNELS_BUILD_TORCH"):  # explicit override, e.g. "torch==2.12.0"
        return os.environ["ENAT_KERNELS_BUILD_TORCH"]
    if not installed:
        return TORCH_RANGE
    public = installed.split("+", 1)[0]  # the registry's wheels carry no local tag
    try:
        major_minor = tuple(int(p) for p in public.split(".")[:2])
    except ValueError:
        return TORCH_RANGE
    if not SUPPORTED[0] <= major_minor <= SUPPORTED[1]:
        return TORCH_RANGE
    return f"torch=={public}"


# setuptools' own requirement hooks run setup.py to find setup_requires, and setup.py
# imports torch, which is what is being asked for: so they are not called.  The
# static requirements (pyproject.toml [build-system] requires) are installed already.


def _requires() -> list[str]:
    req = torch_requirement(installed_torch_version())
    print(f"enat_kernels: building against {req}", file=sys.stderr)
    return [req]


def get_requires_for_build_wheel(config_settings=None):
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


def get_requires_for_build_sdist(config_settings=None):
    return _requires()  # setup.py imports torch for an sdist too
