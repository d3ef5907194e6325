"""Builds the cffi extension `engine._ring` (csrc/ring.c) next to the pure-Python package."""
from setuptools import setup

setup(cffi_modules=["csrc/ring_build.py:ffibuilder"])
