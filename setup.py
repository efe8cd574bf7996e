"""Build script: the pure-Python engine, the Triton kernels (installed as ``veofast.kernels``) and the
optional pybind11 extension ``veofast._C``.

If no C++ compiler (or pybind11) is available the extension is skipped with one warning and veofast uses
its pure-Python fallbacks.
"""

import glob
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Builds the C++ extension if it can; otherwise warns once and leaves the pure-Python paths in use."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            message = f"veofast: C++ extension veofast._C not built ({exc}); using pure-Python fallbacks."
            warnings.warn(message, stacklevel=1)


def extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        message = "veofast: pybind11 not installed; veofast._C not built, using pure-Python fallbacks."
        warnings.warn(message, stacklevel=1)
        return []
    sources = sorted(glob.glob("csrc/*.cpp"))
    return [Pybind11Extension("veofast._C", sources, cxx_std=17, extra_compile_args=["-O3"])]


packages = find_packages(include=["veofast", "veofast.*"]) + ["veofast.kernels"]
setup(
    packages=packages,
    package_dir={"veofast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
