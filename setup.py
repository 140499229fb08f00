"""Build the optional C accelerator of the L1 hit path; nearcache works without it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nearcache._core._speedups",
            ["src/nearcache/_core/_speedups.c"],
            optional=True,  # no compiler: the pure-Python path in _core/store.py is used
            extra_compile_args=["-O2"],
        )
    ]
)
