"""The C extensions and the BPF objects; everything else is in pyproject.toml.

``pylvs._fast`` is the engine and the AF_PACKET I/O. ``pylvs._bpf`` loads
the BPF programs of pylvs/bpf/*.bpf.c (linked with libbpf), which are
compiled here with clang for the BPF target: build_ext fails with a clear
message when clang or libbpf's headers are missing (Debian: clang,
libbpf-dev; `make deps` installs them).
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BPF_SOURCES = sorted(glob.glob("pylvs/bpf/*.bpf.c"))
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-std=gnu11"]


def multiarch_include() -> list[str]:
    """Debian keeps asm/types.h under /usr/include/<triplet>, which clang
    -target bpf does not search by itself."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    path = f"/usr/include/{triplet}" if triplet else None
    return [f"-I{path}"] if path and os.path.isdir(path) else []


class BuildWithBpf(build_ext):
    """build_ext that first compiles every pylvs/bpf/*.bpf.c to a .bpf.o
    beside it (and into the build tree when not --inplace)."""

    def run(self):
        clang = os.environ.get("CLANG", "clang")
        if shutil.which(clang) is None:
            sys.exit(f"error: '{clang}' not found: pylvs's BPF programs ({', '.join(BPF_SOURCES)}) "
                     "are compiled with clang -target bpf. Install clang and libbpf-dev "
                     "(Debian: apt-get install clang llvm libbpf-dev), or run `make deps`.")
        if not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
            sys.exit("error: libbpf headers (bpf/bpf_helpers.h) not found: install libbpf-dev")
        # Every program includes the shared headers: a changed header
        # rebuilds them all.
        headers = glob.glob("pylvs/bpf/*.h")
        for src in BPF_SOURCES:
            obj = src[:-2] + ".o"
            newest = max(os.path.getmtime(f) for f in (src, *headers))
            if not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                cmd = [clang, "-O2", "-g", "-Wall", "-target", "bpf", *multiarch_include(),
                       "-c", src, "-o", obj]
                self.announce(" ".join(cmd), level=2)
                if subprocess.run(cmd).returncode:
                    sys.exit(f"error: compiling {src} with clang -target bpf failed (see above)")
            if not self.inplace:
                dest = os.path.join(self.build_lib, obj)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(obj, dest)
        super().run()


setup(
    cmdclass={"build_ext": BuildWithBpf},
    ext_modules=[
        Extension(
            "pylvs._fast",
            sources=sorted(glob.glob("pylvs/_fast/*.c")),
            depends=glob.glob("pylvs/_fast/*.h"),
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "pylvs._bpf",
            sources=["pylvs/bpf/loader.c"],
            libraries=["bpf"],
            extra_compile_args=CFLAGS,
        ),
    ],
)
