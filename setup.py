"""setuptools shim: cffi_modules has no pyproject.toml spelling yet."""
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
