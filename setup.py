"""Build the optional C accelerators (the L1 store, the message codec); nearcache works
without them."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nearcache._core._speedups",
            ["src/nearcache/_core/_speedups.c"],
            optional=True,  # no compiler: the pure-Python path in _core/store.py is used
            extra_compile_args=["-O2"],
        ),
        Extension(
            "nearcache._core._wire",
            ["src/nearcache/_core/_wire.c"],
            optional=True,  # no compiler: the Python codec in _core/codec.py is used
            extra_compile_args=["-O2"],
        ),
    ]
)
