"""The compiled core of the caching allocator (sim/allocator/caching_core.c). Optional: where it cannot be compiled, the
install goes on and sim runs the same algorithm in Python (sim/allocator/caching.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("_sim_caching", ["sim/allocator/caching_core.c"], optional=True)])
