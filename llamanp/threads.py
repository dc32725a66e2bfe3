"""How many threads NumPy's BLAS uses: read it and set it at run time.

    from llamanp.threads import set_threads, get_threads
    set_threads(1)        # True when the BLAS now uses 1 thread
    get_threads()         # 1 (None when it cannot be told)

Matrix products are where llamanp spends its time, and NumPy hands them to a
BLAS library with its own thread pool. There is no NumPy API for its size, so
three routes are tried, in this order:

1. threadpoolctl, when it is installed (it knows OpenBLAS, MKL and BLIS);
2. ctypes on the BLAS that NumPy loaded: NumPy's wheels carry scipy-openblas,
   whose exported names have a prefix and a suffix
   (`scipy_openblas_set_num_threads64_`); a system OpenBLAS exports
   `openblas_set_num_threads`, MKL `MKL_Set_Num_Threads`. The library is found
   among the shared objects mapped into this process (/proc/self/maps), or in
   the folder of libraries that NumPy's wheel ships;
3. the environment variables (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS,
   MKL_NUM_THREADS, ...), which a BLAS reads once, when it is loaded: they work
   when NumPy has not been imported yet, or, with `reexec=True`, by starting
   this program again with them set.

`blas_kernels()` also names the kernels OpenBLAS runs on this CPU, which set
the speed of every batched matrix product.

This module imports nothing heavy at import time, so that route 3 can still
work when it is imported before NumPy.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from contextlib import contextmanager
from typing import Optional

#: the environment variables that BLAS and OpenMP libraries read at load time
ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# set by set_threads(..., reexec=True) in the new process, so it never loops
_REEXEC_MARK = "LLAMANP_THREADS_REEXEC"

# (setter, getter) symbol names, most specific first
_SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)

_limiter = None       # threadpoolctl's limits object, kept alive while in force
_ctypes_api = None    # (setter, getter, library path) once found; False = none
_last_method = ""     # how the last successful set_threads did it
_wanted = None        # the count the last set_threads call asked for


def _blas_loaded() -> bool:
    return "numpy" in sys.modules


def _candidate_libraries() -> list[str]:
    """Shared objects that may be NumPy's BLAS: mapped ones first."""
    names = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                low = os.path.basename(path).lower()
                if any(k in low for k in ("openblas", "mkl_rt", "libblis", "libblas")) \
                        and path not in names:
                    names.append(path)
    except OSError:
        pass   # not Linux: fall back to the wheel's own folder
    np_mod = sys.modules.get("numpy")
    if np_mod is not None and getattr(np_mod, "__file__", None):
        root = os.path.dirname(os.path.dirname(np_mod.__file__))
        for folder in (os.path.join(root, "numpy.libs"), os.path.join(root, "numpy", ".dylibs")):
            for path in sorted(glob.glob(os.path.join(folder, "*"))):
                low = os.path.basename(path).lower()
                if "blas" in low and path not in names:
                    names.append(path)
    return names


def _find_ctypes_api():
    global _ctypes_api
    if _ctypes_api is None:
        _ctypes_api = False
        for path in _candidate_libraries():
            try:
                lib = ctypes.CDLL(path)   # already loaded: the same handle, no second copy
            except OSError:
                continue
            for set_name, get_name in _SYMBOLS:
                setter = getattr(lib, set_name, None)
                getter = getattr(lib, get_name, None)
                if setter is None:
                    continue
                setter.argtypes, setter.restype = [ctypes.c_int], None
                if getter is not None:
                    getter.argtypes, getter.restype = [], ctypes.c_int
                _ctypes_api = (setter, getter, path)
                break
            if _ctypes_api:
                break
    return _ctypes_api or None


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def set_threads(n: int, reexec: bool = False) -> bool:
    """Make NumPy's BLAS use `n` threads; True if that is now (or, before
    NumPy is imported, will be) in force.

    With reexec=True, when NumPy is already loaded and its BLAS cannot be
    reached at run time, the environment variables are set and this program
    is started again (os.execv, same arguments); that call then does not
    return.
    """
    global _limiter, _last_method, _wanted
    n = int(n)
    if n < 1:
        raise ValueError(f"the number of threads must be >= 1, got {n}")
    _wanted = n
    for var in ENV_VARS:      # child processes (and a BLAS not loaded yet) follow too
        os.environ[var] = str(n)
    if not _blas_loaded():
        _last_method = "environment"
        return True
    tpc = _threadpoolctl()
    if tpc is not None:
        info = [i for i in tpc.threadpool_info() if i.get("user_api") == "blas"]
        if info:
            _limiter = tpc.threadpool_limits(limits=n, user_api="blas")
            _last_method = "threadpoolctl"
            return get_threads() == n
    api = _find_ctypes_api()
    if api is not None:
        api[0](n)
        _last_method = f"ctypes ({os.path.basename(api[2])})"
        got = get_threads()
        return got is None or got == n
    if reexec and not os.environ.get(_REEXEC_MARK):
        os.environ[_REEXEC_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable] + sys.argv)
    return False


def get_threads() -> Optional[int]:
    """The number of threads NumPy's BLAS uses, or None if it cannot be told
    (before NumPy is loaded: what the environment asks for, if anything)."""
    if not _blas_loaded():
        for var in ENV_VARS[:3]:
            if os.environ.get(var, "").isdigit():
                return int(os.environ[var])
        return None
    tpc = _threadpoolctl()
    if tpc is not None:
        info = [i for i in tpc.threadpool_info() if i.get("user_api") == "blas"]
        if info:
            return int(info[0]["num_threads"])
    api = _find_ctypes_api()
    if api is not None and api[1] is not None:
        return int(api[1]())
    return None


def wanted_threads() -> int:
    """How many threads llamanp's own row-parallel work (llamanp.parallel)
    should use: what set_threads last asked for, else what the environment
    asks the BLAS for, else one per core this process may run on."""
    if _wanted is not None:
        return _wanted
    for var in ENV_VARS[:2]:
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) >= 1:
            return int(os.environ[var])
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def one_blas_thread():
    """Run the block with NumPy's BLAS on one thread (the caller's), then
    restore the count: for work that is already split over llamanp's own
    threads, where a BLAS thread pool would only fight them for the cores.
    Through ctypes, which costs about a microsecond; a no-op where the
    BLAS cannot be reached that way."""
    api = _find_ctypes_api() if _blas_loaded() else None
    before = api[1]() if api is not None and api[1] is not None else None
    if before is None or before == 1:
        yield
        return
    api[0](1)
    try:
        yield
    finally:
        api[0](before)


def method() -> str:
    """How the last successful set_threads call worked ("" before any):
    "threadpoolctl", "ctypes (LIBRARY)" or "environment"."""
    return _last_method


def blas_library() -> Optional[str]:
    """The path of the BLAS library that set_threads drives by ctypes, if any."""
    api = _find_ctypes_api() if _blas_loaded() else None
    return api[2] if api else None


#: the exported names of OpenBLAS's function that names the kernels it chose
#: for this CPU (or was told to use by the OPENBLAS_CORETYPE environment
#: variable): Haswell is AVX2, SkylakeX / Cooperlake / SapphireRapids AVX-512
_CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename64_", "openblas_get_corename")


def blas_kernels() -> Optional[str]:
    """The kernel set OpenBLAS runs on this CPU ("Haswell", "SkylakeX", ...),
    or None for another BLAS or before NumPy is loaded."""
    api = _find_ctypes_api() if _blas_loaded() else None
    if api is None:
        return None
    lib = ctypes.CDLL(api[2])
    for name in _CORENAME_SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = [], ctypes.c_char_p
            raw = fn()
            return raw.decode(errors="replace").strip() if raw else None
    return None
