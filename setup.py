"""The project's C extensions; everything else about the package is in pyproject.toml.

optional=True: where they cannot be compiled (no C compiler) the install still succeeds and
data_prep.clean and data_prep.json_blocks fall back to their Arrow implementations, and
data_prep.sp_encode to SentencePiece's own normaliser. An editable
install (`pip install -e .`, as `make setup` does) builds them next to their sources.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data_prep._whitespace", ["data_prep/_whitespace.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("data_prep._jsonlines", ["data_prep/_jsonlines.c"], depends=["data_prep/_utf8.h"], optional=True,
                  extra_compile_args=["-O2"]),
        Extension("data_prep._spm_premap", ["data_prep/_spm_premap.c"], depends=["data_prep/_utf8.h"], optional=True,
                  extra_compile_args=["-O2"]),
    ],
)
