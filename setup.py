"""The one compiled module, agent.proxy._hotpath (agent/proxy/hotpath.py), built from source with the
machine's C compiler by `pip install` (so by `make setup`). ``optional=True``: without a compiler or
Python's headers the build warns and the install goes on, and the pure-Python path runs."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("agent.proxy._hotpath", ["agent/proxy/_hotpath.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"])])
