"""setuptools shim: cffi_modules has no pyproject.toml spelling yet."""
import sys

from setuptools import setup

# Windows has neither epoll nor kqueue: pulse runs there on the pure-Python
# portable backend, so there is no cffi module to compile (build_ffi.py would
# try the kqueue source and fail).
setup(cffi_modules=[] if sys.platform == "win32" else ["build_ffi.py:ffibuilder"])
