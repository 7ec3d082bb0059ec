"""CPU platform layer: what megatron-core needs to run on a machine without CUDA (gloo, fp32/bf16).

megatron-core assumes CUDA in many places; docs/cpu-platform.md lists each one and why it fails
(the numbers below are the rows of its table). On a machine with CUDA none of this is applied:
``activate()`` returns False and touches nothing. On a CPU-only machine ``activate()`` applies, once:

  #2, #5, #6, #9  ``torch.cuda.current_device`` returns the CPU device; ``current_stream``,
              ``default_stream``, ``Stream``, ``stream``, ``Event`` and ``synchronize`` become inert
              objects (there is one in-order "stream" on a CPU, so waiting on it is a no-op).
  #3          megatron's RNG tracker is replaced by one that keeps CPU ``torch.Generator`` states, so
              ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` work and
              tensor-parallel-region dropout differs across TP ranks exactly as on GPU.
  #4, #9      a ``TorchFunctionMode`` rewrites device arguments naming CUDA (``device="cuda"``,
              ``torch.device("cuda")``, ``.cuda()``, ``.to("cuda")``) to the CPU. Only calls that would
              otherwise raise on this machine change behaviour. It covers the literal ``device="cuda"``
              allocations in the pipeline schedules, clip_grads, DDP buffers and p2p shape exchange.
  #7          megatron's optimizers dispatch on ``param.type() == 'torch.cuda.FloatTensor'`` (Float16 and
              distributed optimizer constructors) and ``clip_grad_by_total_norm_fp32`` asserts it:
              only inside those functions, ``Tensor.type()`` reports the CUDA name of a CPU tensor.

Two import-time problems are handled separately, each only where it occurs:
  * megatron-core >= 0.17 imports triton unconditionally (one leaf module); when triton is missing,
    ``install_triton_leaf_standin()`` (called from ``megatron_cppo/__init__.py``) puts a stand-in for
    that leaf into ``sys.modules``. triton itself is never stubbed (torch inductor would crash).
  * qwen-vl-utils imports torchvision at module level, and no torchvision works with the CPU torch
    build. ``import_qwen_vl_utils()`` provides a stand-in only for the duration of that import.

  #10         activation recomputation (megatron's ``tensor_parallel.checkpoint``) saves and restores
              the CUDA RNG state besides the CPU one and the tracker's: without CUDA, that part is
              an empty state and restoring it does nothing.

Not covered (refused or unsupported on CPU): sequence parallelism with the local spec (#8), CUDA
graphs, transformer-engine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_ORIGINALS: dict[tuple[Any, str], Any] = {}
_DEVICE_MODE: TorchFunctionMode | None = None

_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


def is_active() -> bool:
    """True once ``activate()`` has applied the CPU measures in this process."""
    return _ACTIVE


# ----------------------------------------------------------------------------------------------
# import-time: megatron-core >= 0.17 needs triton for one MoE leaf module


def install_triton_leaf_standin() -> bool:
    """Put a stand-in for megatron's paged-stash MoE kernels into sys.modules if (and only if) this
    megatron-core has that module and triton is not installed. Returns True when installed."""
    if _PAGED_STASH in sys.modules or importlib.util.find_spec("triton") is not None:
        return False
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        return False
    rel = os.path.join("core", "transformer", "moe", "ops", "paged_stash.py")
    if not any(os.path.exists(os.path.join(p, rel)) for p in spec.submodule_search_locations):
        return False

    def _unavailable(*_args, **_kwargs):
        raise RuntimeError(
            "megatron-core's paged-stash MoE kernels need triton, which is not installed "
            "(megatron_cppo installed a stand-in so that megatron.core imports on this machine)"
        )

    class _Kernel:
        def __getitem__(self, _grid):
            return _unavailable

        __call__ = _unavailable

    mod = types.ModuleType(_PAGED_STASH)
    mod.__doc__ = "megatron_cppo stand-in: triton is not installed on this machine."
    mod.GLOBAL_BLOCK_SIZE = 1024
    mod.paged_stash_copy_kernel = _Kernel()
    mod.paged_stash_pop_kernel = _Kernel()
    def _other_kernel(name):  # any other kernel the module exports; dunders stay absent
        if name.startswith("_"):
            raise AttributeError(name)
        return _Kernel()

    mod.__getattr__ = _other_kernel
    sys.modules[_PAGED_STASH] = mod
    return True


# ----------------------------------------------------------------------------------------------
# run-time: CUDA shims, RNG tracker, device rewriting, clip-grad assert


class _InertStream:
    """The single in-order CPU "stream": every wait and synchronisation is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *_):
        pass

    def wait_event(self, *_):
        pass

    def record_event(self, event=None):
        return event if event is not None else _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *_):
        pass

    def wait(self, *_):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, _other):
        raise RuntimeError("CUDA event timing is not available on a CPU-only machine")


_INERT_STREAM = _InertStream()


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites device arguments that name CUDA to the CPU (only ever active without CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and _CUDA_TYPE_NAMES and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if any(_is_cuda_device(a) for a in args):
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def _make_cpu_rng_tracker_class(base):
    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker with CPU generator states (the default generator is swapped)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


_CUDA_TYPE_NAMES = 0  # > 0 while inside a megatron function that checks CUDA tensor type names


def _reporting_cuda_type_names(fn):
    """Run ``fn`` with ``Tensor.type()`` answering 'torch.cuda.FloatTensor' for a CPU fp32 tensor,
    and so on: megatron's optimizers dispatch on (and assert) those names (#7)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _CUDA_TYPE_NAMES
        _CUDA_TYPE_NAMES += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _CUDA_TYPE_NAMES -= 1

    wrapper._megatron_cppo_original = fn
    return wrapper


def _set(obj: Any, name: str, value: Any) -> None:
    key = (obj, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(obj, name, None)
    setattr(obj, name, value)


def activate() -> bool:
    """Apply the CPU measures if CUDA is absent. Idempotent. Returns True if the layer is active."""
    global _ACTIVE, _DEVICE_MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    install_triton_leaf_standin()
    cpu = torch.device("cpu")
    cuda = torch.cuda
    _set(cuda, "current_device", lambda: cpu)
    _set(cuda, "current_stream", lambda device=None: _INERT_STREAM)
    _set(cuda, "default_stream", lambda device=None: _INERT_STREAM)
    _set(cuda, "Stream", _InertStream)
    _set(cuda, "Event", _InertEvent)
    _set(cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _set(cuda, "synchronize", lambda device=None: None)

    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = _make_cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker)
    _set(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker_cls())
    _set(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    _set(mrandom, "initialize_rng_tracker", _keep_cpu_tracker(mrandom.initialize_rng_tracker))
    # #10: activation recomputation saves and restores the CUDA RNG state next to the CPU one
    # (which it saves anyway, as do our tracker's states): without CUDA there is none.
    _set(mrandom, "_get_cuda_rng_state",
         lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8))
    _set(mrandom, "_set_cuda_rng_state", lambda *args, **kwargs: None)

    # Functions that dispatch on or assert CUDA type names. Module-level functions are replaced in
    # every module that imported them by name; constructors are replaced on the class.
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for mod in (importlib.import_module("megatron.core.optimizer.clip_grads"), optimizer,
                distrib_optimizer):
        fn = getattr(mod, "clip_grad_by_total_norm_fp32", None)
        if fn is not None:
            _set(mod, "clip_grad_by_total_norm_fp32",
                 _reporting_cuda_type_names(getattr(fn, "_megatron_cppo_original", fn)))
    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        _set(cls, "__init__", _reporting_cuda_type_names(cls.__init__))

    _DEVICE_MODE = _CudaToCpuMode()
    _DEVICE_MODE.__enter__()
    _ACTIVE = True
    return True


def _keep_cpu_tracker(original):
    """initialize_rng_tracker(force_reset=True) would install a CUDA tracker again; keep ours."""

    def initialize_rng_tracker(*args, **kwargs):
        from megatron.core.tensor_parallel import random as mrandom

        if kwargs.get("force_reset") or (len(args) >= 4 and args[3]):
            mrandom._CUDA_RNG_STATE_TRACKER.reset()
        return None

    initialize_rng_tracker.__wrapped__ = original
    return initialize_rng_tracker


def deactivate() -> None:
    """Undo ``activate()`` (tests only: a process normally keeps the layer until it exits)."""
    global _ACTIVE, _DEVICE_MODE
    if _DEVICE_MODE is not None:
        _DEVICE_MODE.__exit__(None, None, None)
        _DEVICE_MODE = None
    for (obj, name), value in reversed(list(_ORIGINALS.items())):
        setattr(obj, name, value)
    _ORIGINALS.clear()
    _ACTIVE = False


# ----------------------------------------------------------------------------------------------
# qwen-vl-utils imports torchvision at module level; no torchvision works with CPU torch 2.13


def import_qwen_vl_utils():
    """Import ``qwen_vl_utils``; where torchvision cannot be imported, a stand-in module (``io``,
    ``transforms``, ``transforms.InterpolationMode``) is visible for the duration of the import only,
    so image paths work (video needs a real torchvision) and transformers never sees the stand-in."""
    if "qwen_vl_utils" in sys.modules:
        return sys.modules["qwen_vl_utils"]
    try:
        import torchvision  # noqa: F401

        return importlib.import_module("qwen_vl_utils")
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]

    import enum

    def _no_video(*_a, **_k):
        raise RuntimeError("video input needs a working torchvision, which this machine lacks")

    tv = types.ModuleType("torchvision")
    io_mod = types.ModuleType("torchvision.io")
    io_mod.read_video = _no_video
    tr = types.ModuleType("torchvision.transforms")
    tr.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    tr.functional = types.ModuleType("torchvision.transforms.functional")
    tr.functional.resize = _no_video
    tv.io, tv.transforms, tv.__version__ = io_mod, tr, "0.0+megatron_cppo_standin"
    standins = {"torchvision": tv, "torchvision.io": io_mod, "torchvision.transforms": tr,
                "torchvision.transforms.functional": tr.functional}
    sys.modules.update(standins)
    try:
        return importlib.import_module("qwen_vl_utils")
    finally:
        for name in standins:
            sys.modules.pop(name, None)


def quiet_library_warnings() -> None:
    """megatron-core and torch warn on import about missing apex / transformer-engine (optional
    GPU accelerations, absent on CPU by design) and about deprecations, once per process: with
    tp x pp ranks that buries a command's own output (pytest.ini filters the same messages)."""
    import warnings

    for pattern in (r".*Apex is not installed.*", r".*Transformer Engine and Apex are not.*",
                    r"full scope is deprecated.*", r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                    r".*deprecating ShardedTensor.*", r".*`load_state_dict` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
