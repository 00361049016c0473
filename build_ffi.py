"""cffi builder for pulse's compiled module ``pulse._sys._pulse_ffi``.

API mode, out of line: ``pip install .`` compiles it into a C extension
(setuptools' ``cffi_modules``, see setup.py).  The C lives in
``pulse/_sys/csrc/``, where compilers and editors check it: ``pulse.h`` says
what the module is for and why it batches work; ``common.c`` holds the socket
calls every platform shares, and one backend file per readiness API
(``epoll.c``, ``kqueue.c``) the rest.  Each ``.c`` has a ``.cdef`` beside it
that declares to cffi what Python may call.

``PULSE_STRICT_BUILD=1`` adds ``-Wall -Wextra -Werror``.  CI sets it; users'
installs do not, so that a newer compiler's new warning cannot break them.
"""

import os
import sys

from cffi import FFI

# Beside this file, wherever it is run from (the project root, an unpacked
# sdist).  Not made absolute: setuptools' cffi_modules gives __file__ relative
# to the setup.py directory, and setuptools refuses absolute source paths.
CSRC = os.path.join(os.path.dirname(__file__), "pulse", "_sys", "csrc")

# This platform's readiness API: csrc/<BACKEND>.{c,h,cdef}.  (Windows builds
# nothing: setup.py leaves cffi_modules empty there.)
BACKEND = "epoll" if sys.platform.startswith("linux") else "kqueue"

COMPILE_ARGS = ["-O2", "-std=gnu99"]
STRICT_ARGS = ["-Wall", "-Wextra", "-Werror"]

# The wrapper cffi generates checks every declared struct field by taking its
# address, and glibc packs struct epoll_event on x86-64: the check of its
# `data` field warns (-Waddress-of-packed-member, on by default since gcc 9)
# in code that is not ours.  The pragma silences that warning in the wrapper
# alone; common.c and the backend are compiled apart and keep every warning.
WRAPPER_PRAGMA = '#pragma GCC diagnostic ignored "-Waddress-of-packed-member"\n'


def csrc(name: str) -> str:
    """The path of ``name`` in the C source directory."""
    return os.path.join(CSRC, name)


def read(name: str) -> str:
    """The text of ``name`` in the C source directory."""
    with open(csrc(name), encoding="utf-8") as file:
        return file.read()


def strict() -> bool:
    """Whether the environment asks for warnings as errors (CI)."""
    return os.environ.get("PULSE_STRICT_BUILD", "") not in ("", "0")


ffibuilder = FFI()
ffibuilder.cdef(read("common.cdef") + read(BACKEND + ".cdef"))
ffibuilder.set_source(
    "pulse._sys._pulse_ffi",
    WRAPPER_PRAGMA + '#include "pulse.h"\n#include "{}.h"\n'.format(BACKEND),
    sources=[csrc("common.c"), csrc(BACKEND + ".c")],
    include_dirs=[CSRC],
    # Rebuild when a header changes, not only a .c file.
    depends=[csrc("pulse.h"), csrc(BACKEND + ".h")],
    extra_compile_args=COMPILE_ARGS + (STRICT_ARGS if strict() else []),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
