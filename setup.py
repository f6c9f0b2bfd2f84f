"""Builds the optional C++/CUDA extension in csrc/ when it has sources and a compiler is present.

Everything else (packages, dependencies, entry points) lives in pyproject.toml. Every op in csrc/ has a
pure-torch fallback, so a machine without a compiler installs and runs the same package.
"""

from pathlib import Path

from setuptools import setup

CSRC = Path(__file__).parent / "csrc"


def _extensions() -> list:
    sources = sorted(str(p) for p in CSRC.glob("*.cpp")) + sorted(str(p) for p in CSRC.glob("*.cu"))
    if not sources:
        return []
    from torch.utils.cpp_extension import CppExtension

    return [CppExtension("lorafusion._csrc", sources)]


def _cmdclass() -> dict:
    if not _extensions():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
