"""The C extension; everything else is in pyproject.toml."""
import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pylvs._fast",
            sources=sorted(glob.glob("pylvs/_fast/*.c")),
            depends=glob.glob("pylvs/_fast/*.h"),
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-std=gnu11"],
        )
    ],
)
