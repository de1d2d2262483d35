"""The project's one C extension; everything else about the package is in pyproject.toml.

optional=True: where it cannot be compiled (no C compiler) the install still succeeds and
data_prep.clean falls back to its Arrow-kernel implementation. An editable install
(`pip install -e .`, as `make setup` does) builds it next to its source, where it is imported.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data_prep._whitespace", ["data_prep/_whitespace.c"], optional=True, extra_compile_args=["-O2"]),
    ],
)
