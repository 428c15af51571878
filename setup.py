"""The compiled core of the caching allocator (csrc/sim_caching.c). Optional: where it cannot be compiled, the
install goes on and sim runs the same algorithm in Python (sim/allocator/caching.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("_sim_caching", ["csrc/sim_caching.c"], optional=True)])
