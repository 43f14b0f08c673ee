"""The one place that decides how a detjax kernel runs.

Choices (``DETJAX_BACKEND`` environment variable, or ``backend=`` on any call):

* ``auto`` (default): ``gpu`` when JAX's default backend is a CUDA/ROCm GPU, ``tpu`` on a TPU,
  ``interpret`` otherwise (CPU).
* ``gpu``: compiled Pallas kernels on the GPU.
* ``tpu``: Pallas kernels lowered through Mosaic TPU.
* ``interpret``: the same kernel bodies run by Pallas' interpreter on any device (the CPU path).
* ``tpu-interpret``: the TPU kernels run in Pallas' TPU interpret mode (simulated VMEM, DMAs and
  race detection) on any device.

Every choice runs a kernel with a fixed reduction order; there is no fallback to XLA's own dot or
reduce. An unknown name, or a hardware backend that is not present, raises ``ValueError``.

``resolve(backend)`` turns a request into one of the concrete names; ``chosen_backend()`` reports
what a call with no override would use right now.
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax

ENV_VAR = "DETJAX_BACKEND"
CONCRETE = ("gpu", "tpu", "interpret", "tpu-interpret")
CHOICES = ("auto",) + CONCRETE

_local = threading.local()


def _platform() -> str:
    return jax.default_backend()  # 'cpu', 'gpu' (cuda/rocm), 'tpu'


def _auto() -> str:
    p = _platform()
    if p in ("gpu", "cuda", "rocm"):
        return "gpu"
    if p == "tpu":
        return "tpu"
    return "interpret"


def _validate(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a string, one of {CHOICES}; got {name!r}")
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(f"{source}={name!r} is not a detjax backend; choose one of {CHOICES}")
    return name


def resolve(backend: str | None = None) -> str:
    """Return the concrete backend for a call.

    Precedence: the per-call ``backend`` argument, then an active ``use(...)`` context, then the
    ``DETJAX_BACKEND`` environment variable (read at call time), then ``auto``.
    """
    if backend is not None:
        name = _validate(backend, "backend")
    elif getattr(_local, "stack", None):
        name = _local.stack[-1]
    else:
        name = _validate(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    if name == "auto":
        return _auto()
    p = _platform()
    if name == "gpu" and p not in ("gpu", "cuda", "rocm"):
        raise ValueError(
            f"backend 'gpu' was requested but JAX's default device is {p!r}; "
            "use 'interpret' (or 'auto') on this machine")
    if name == "tpu" and p != "tpu":
        raise ValueError(
            f"backend 'tpu' was requested but JAX's default device is {p!r}; "
            "use 'tpu-interpret' to simulate the TPU kernels here")
    return name


def chosen_backend(backend: str | None = None) -> str:
    """What a call with this override (or none) would run on: one of ``CONCRETE``."""
    return resolve(backend)


@contextlib.contextmanager
def use(backend: str):
    """Context manager forcing a backend for calls traced inside it (thread-local)."""
    name = _validate(backend, "backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield resolve(None)
    finally:
        stack.pop()


def is_interpret(backend: str) -> bool:
    return backend in ("interpret", "tpu-interpret")


def interpret_arg(backend: str):
    """The value for ``pl.pallas_call(interpret=...)``."""
    if backend == "interpret":
        return True
    if backend == "tpu-interpret":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams(detect_races=True)
    return False


def opaque_trip_count(n):
    """A loop bound XLA cannot see through, for loops inside kernel bodies.

    On the interpret backend XLA compiles the kernel body; with a static trip count it unrolls or
    deletes loops of one trip and then fuses (and CSEs) differently, which was measured to change the
    bits of ``exp`` by an ulp between a 1-chunk and a 2-chunk row. Reading the bound through a
    program id makes the loop body one compiled piece of code whatever the length.
    """
    from jax.experimental import pallas as pl
    return n + 0 * pl.program_id(0)
