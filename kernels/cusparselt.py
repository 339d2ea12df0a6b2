"""The 2:4 region on Hopper's and Ampere's sparse tensor cores at prefill and batched decode (from
``spense_gemm.SPARSE_CORES_MIN_M`` rows): cuSPARSELt through ctypes, with plans kept across calls.

Triton's MMAs are dense, so at prefill (compute-bound) the fused kernels cannot beat cuBLAS on the whole
weight; only sparse MMAs can do the 2:4 region's work in less time (on the H200, through cuSPARSELt, 1.0-1.15x
faster than dense cuBLAS on the same columns of the Qwen3-8B shapes, docs/KERNELS.md). torch ships the
library and ``torch._cslt_sparse_mm``, but that op builds its cuSPARSELt plan on every call: 482-562 us of
host time per call on an H200, more than cuBLAS takes for the 8B qkv GEMM up to M = 4096. Here a plan is built once per
(weight shape, rows, row stride, dtype, device) and a call costs one ``cusparseLtMatmul`` (22-32 us of host
time).

The operand is what ``torch._cslt_compress`` makes of the 2:4 region ``[N, 4 * GS]``: the kept values in
``sparse_weight``'s own order (row-major ``[N, 2 * GS]``, measured equal) followed by cuSPARSELt's metadata.
``compress`` returns that buffer, and the caller makes ``sparse_weight`` a view into it, so the extra memory
is only cuSPARSELt's copy of the positions (as many bytes as ``sparse_meta``).

Layouts as torch's op uses them: A (the compressed 2:4 region) row-major ``[N, Ks]``; B the 2:4 columns of
the permuted activations, row-major ``[M, Ks]`` with row stride ``ld`` (a view into the permuted x), used
transposed; C = D the output ``y [M, N]`` row-major, i.e. column-major ``[N, M]``, accumulated into with
beta = 1 (the dense region's cuBLAS GEMM writes it first).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import threading

import torch

from vllm_spense.format import GROUP_SIZE, sparse_region

logger = logging.getLogger(__name__)

# cuSPARSELt / cuSPARSE / CUDA enum values (cusparseLt.h 0.6+, cusparse.h, library_types.h). bf16 only:
# with fp16 values cuSPARSELt 0.8.0's algorithm search hit an illegal instruction on the H200, which ends
# the CUDA context (docs/KERNELS.md), so fp16 weights keep the expansion path.
_CUDA_R = {torch.bfloat16: 14}
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_SPARSITY_50_PERCENT = 0
_COMPUTE_32F = 2
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _ALG_SPLIT_K = 0, 1, 3  # cusparseLtMatmulAlgAttribute_t
_ALIGNMENT = 16  # bytes: every pointer and leading dimension must be a multiple
_OPAQUE_BYTES = 4096  # cuSPARSELt's opaque structs are 512-1024 bytes (by version); room for any of them
_ARCHITECTURES = ((8, 0), (8, 6), (8, 7), (8, 9), (9, 0))  # sparse tensor cores cuSPARSELt 0.6-0.8 serves


class CusparseLtError(RuntimeError):
    """A cuSPARSELt call failed; the message names the call and the library's status."""


def _opaque() -> ctypes.Array:
    return ctypes.create_string_buffer(_OPAQUE_BYTES)


class _Library:
    """The loaded library and one handle per GPU (a cuSPARSELt handle belongs to the device current when it
    is made)."""

    def __init__(self):
        torch.backends.cusparselt.version()  # makes torch load libcusparseLt, so its soname resolves below
        self.lib = ctypes.CDLL("libcusparseLt.so.0")
        self.lib.cusparseLtGetErrorString.restype = ctypes.c_char_p
        self.handles: dict[int, ctypes.Array] = {}

    def handle(self, device: torch.device) -> ctypes.Array:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            handle = _opaque()
            with torch.cuda.device(index):
                self.check("cusparseLtInit", handle)
            self.handles[index] = handle
        return self.handles[index]

    def check(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            message = self.lib.cusparseLtGetErrorString(status).decode()
            raise CusparseLtError(f"cuSPARSELt: {name} failed with status {status} ({message})")


@functools.lru_cache(maxsize=None)
def library() -> _Library:
    return _Library()


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the 2:4 region of ``dtype`` values can run on cuSPARSELt on ``device``: an NVIDIA GPU with
    sparse tensor cores (sm80-sm90), bf16 values, and torch built with the library."""
    return (device.type == "cuda" and torch.version.hip is None and dtype in _CUDA_R
            and torch.backends.cusparselt.is_available()
            and torch.cuda.get_device_capability(device) in _ARCHITECTURES)


def _metadata_for(region: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """``sparse_meta`` rows that place ``values`` ``[rows, GS, 2]`` back into ``region`` ``[rows, GS, 4]``: per
    group the first ascending pair of positions holding the two values with zeros at the other two, or None
    if some group has no such pair."""
    found = torch.zeros(region.shape[:2], dtype=torch.bool, device=region.device)
    nibble = torch.zeros(region.shape[:2], dtype=torch.uint8, device=region.device)
    for i0, i1 in itertools.combinations(range(GROUP_SIZE), 2):
        rest = [p for p in range(GROUP_SIZE) if p not in (i0, i1)]
        fits = ((region[..., i0] == values[..., 0]) & (region[..., i1] == values[..., 1])
                & (region[..., rest] == 0).all(-1) & ~found)
        nibble[fits] = i0 | (i1 << 2)
        found |= fits
    if not found.all():
        return None
    return nibble[:, 0::2] | (nibble[:, 1::2] << 4)


def compress(sparse_weight: torch.Tensor, sparse_meta: torch.Tensor, row_stride: int,
             rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The 2:4 region as cuSPARSELt's compressed operand (``torch._cslt_compress``): a flat buffer whose first
    ``sparse_weight.numel()`` values are the kept values, row by row, followed by cuSPARSELt's metadata; and
    the ``sparse_meta`` that goes with those values. A group with fewer than two nonzeros can be stored
    with its zero at other positions than ``pack`` chose; the metadata is then rebuilt for cuSPARSELt's
    choice, so both share one copy of the values.

    Before it is returned, the operand multiplies ``CHECK_ROWS`` random rows, ``row_stride`` apart as the
    permuted x's 2:4 columns will be (K), through ``add_sparse_product`` against the region in fp32 (which
    also builds the shape's first plan and picks its algorithm for that plan's rows, ``_alg_id``). None,
    with a warning, where cuSPARSELt refuses the shape, a group cannot be matched (NaN values) or that
    product is off: the caller then keeps the paths of weights without sparse tensor cores."""
    n, ks = sparse_weight.shape[0], 2 * sparse_weight.shape[1]
    try:
        region = torch.cat([sparse_region(sparse_weight[r:r + rows_per_step], sparse_meta[r:r + rows_per_step])
                            for r in range(0, n, rows_per_step)]).view(n, ks)
        compressed = torch._cslt_compress(region).reshape(-1)
        values = compressed[:sparse_weight.numel()].view(n, -1, 2)
        meta = sparse_meta
        if not torch.equal(values.reshape(sparse_weight.shape), sparse_weight):
            metas = [_metadata_for(region[r:r + rows_per_step].view(-1, values.shape[1], GROUP_SIZE),
                                   values[r:r + rows_per_step]) for r in range(0, n, rows_per_step)]
            if any(m is None for m in metas):
                raise CusparseLtError("some 2:4 group's values do not fit any pair of its positions")
            meta = torch.cat(metas)
        x = torch.randn(CHECK_ROWS, row_stride, device=region.device, dtype=region.dtype)[:, row_stride - ks:]
        y = torch.zeros(CHECK_ROWS, n, device=region.device, dtype=region.dtype)
        add_sparse_product(compressed, x, y)
        reference = x.float() @ region.float().t()
        error = ((y.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if not error < CHECK_TOLERANCE:
            raise CusparseLtError(f"a {CHECK_ROWS}-row product is off by {error:.2e} (relative) against fp32")
    except Exception as error:  # noqa: BLE001 - at load, anything cuSPARSELt cannot do leaves the old path
        logger.warning("Spense: 2:4 region [%d, %d] %s stays off cuSPARSELt: %s", n, ks, sparse_weight.dtype,
                       error)
        return None
    return compressed, meta


CHECK_ROWS = 128
CHECK_TOLERANCE = 1e-2  # bf16 products against fp32: 1.96e-3 at worst in check_kernels_h200_v29.txt


class Plan:
    """Descriptors and plan of one ``y[M, N] += x_s[M, Ks] @ W_s^T`` shape on one GPU with one algorithm
    (cuSPARSELt's default where ``alg_id`` is None); the descriptors stay alive as long as the plan, which
    refers to them. ``max_alg_id``: how many algorithm configs cuSPARSELt has for this problem.
    ``y_transposed``: y is ``[N, M]`` row-major instead (the layout torch's 2:4 ``F.linear`` writes;
    benchmarks/bench_cusparselt.py ``--layout`` times it). ``split_k``: cuSPARSELt's split-K factor
    (``--algs --split-k``; 0.8 on an H200 refused every factor but 1)."""

    def __init__(self, lib: _Library, device: torch.device, n: int, ks: int, m: int, ld_x: int,
                 dtype: torch.dtype, alg_id: int | None = None, y_transposed: bool = False,
                 split_k: int | None = None):
        self.lib, self.handle = lib, lib.handle(device)
        self._made: list[tuple[str, ctypes.Array]] = []  # what was initialised, with its destroy function
        self.sparse, self.x, self.y = _opaque(), _opaque(), _opaque()
        self.matmul, self.alg, self.plan = _opaque(), _opaque(), _opaque()
        i64, u32, value, handle = ctypes.c_int64, ctypes.c_uint32, _CUDA_R[dtype], self.handle
        self._init("cusparseLtMatDescriptorDestroy", "cusparseLtStructuredDescriptorInit", handle, self.sparse,
                   i64(n), i64(ks), i64(ks), u32(_ALIGNMENT), value, _ORDER_ROW, _SPARSITY_50_PERCENT)
        self._init("cusparseLtMatDescriptorDestroy", "cusparseLtDenseDescriptorInit", handle, self.x, i64(m), i64(ks),
                   i64(ld_x), u32(_ALIGNMENT), value, _ORDER_ROW)
        self._init("cusparseLtMatDescriptorDestroy", "cusparseLtDenseDescriptorInit", handle, self.y, i64(n), i64(m),
                   i64(m if y_transposed else n), u32(_ALIGNMENT), value, _ORDER_ROW if y_transposed else _ORDER_COL)
        self._init("cusparseLtMatmulDescriptorDestroy", "cusparseLtMatmulDescriptorInit", handle, self.matmul, _OP_N,
                   _OP_T, self.sparse, self.x, self.y, self.y, _COMPUTE_32F)
        self._init("cusparseLtMatmulAlgSelectionDestroy", "cusparseLtMatmulAlgSelectionInit", handle, self.alg,
                   self.matmul, _ALG_DEFAULT)
        config = ctypes.c_int(0)
        lib.check("cusparseLtMatmulAlgGetAttribute", handle, self.alg, _ALG_CONFIG_MAX_ID, ctypes.byref(config),
                  ctypes.sizeof(config))
        self.max_alg_id = config.value
        if alg_id is not None:
            config.value = alg_id
            lib.check("cusparseLtMatmulAlgSetAttribute", handle, self.alg, _ALG_CONFIG_ID, ctypes.byref(config),
                      ctypes.sizeof(config))
        if split_k is not None:
            config.value = split_k
            lib.check("cusparseLtMatmulAlgSetAttribute", handle, self.alg, _ALG_SPLIT_K, ctypes.byref(config),
                      ctypes.sizeof(config))
        self._init("cusparseLtMatmulPlanDestroy", "cusparseLtMatmulPlanInit", handle, self.plan, self.matmul,
                   self.alg)
        size = ctypes.c_size_t(0)
        lib.check("cusparseLtMatmulGetWorkspace", handle, self.plan, ctypes.byref(size))
        self.workspace_bytes = size.value

    def _init(self, destroy: str, name: str, handle: ctypes.Array, struct: ctypes.Array, *args) -> None:
        self.lib.check(name, handle, struct, *args)
        self._made.append((destroy, struct))

    def __del__(self):
        for destroy, struct in reversed(getattr(self, "_made", ())):  # only what was initialised, plan first
            function = getattr(self.lib.lib, destroy, None)  # cusparseLtMatmulDescriptorDestroy: 0.7+
            if function is not None:
                function(struct)


# Plans by (N, Ks, M, x's row stride, dtype, device), algorithms by the same with M as searched
# (``_search_rows``), and what cuSPARSELt refused, all built outside CUDA-graph capture (``has_plan``). One
# workspace per device, calls on one stream running one after another; one it outgrows is kept, since CUDA
# graphs captured before still point to it.
_plans: dict[tuple, Plan] = {}
_alg_ids: dict[tuple, int] = {}
_refused: dict[tuple, str] = {}
_workspaces: dict[torch.device, torch.Tensor] = {}
_outgrown_workspaces: list[torch.Tensor] = []
_lock = threading.Lock()
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)
# Rows of the problem each weight shape's algorithm is chosen on (``_alg_id``): plans of up to
# SEARCH_OWN_ROWS_MAX rows (those vLLM's CUDA graphs capture, built at warm-up) get their own search, where
# the 4096-row choice ran the 8B shapes' 2:4 region 1.14-1.49x slower than the best at 128 rows
# (cusparselt_algs_small_m_h200.json); larger plans, built while serving, share one search at SEARCH_ROWS.
SEARCH_ROWS = 4096
SEARCH_OWN_ROWS_MAX = 512
# How ``_alg_id`` times an algorithm: SEARCH_CALLS calls back to back between two CUDA events, queued while the
# GPU spins (``torch.cuda._sleep``, SEARCH_SPIN_CYCLES clock cycles: about 1 ms), so the events time the GPU's
# work and not the host's ~25 us a call of queueing it; SEARCH_ROUNDS rounds over every algorithm in turn, the
# median of each. One call between two events, as before, timed the host's queueing too and picked algorithms
# up to 1.15x the best one's time under a CUDA graph (1.00-1.07x at 128-256 rows), CPU quiet or busy; this
# picked the best on the 8B shapes at 128-512 rows (H200, cusparselt_search_h200.json, docs/KERNELS.md).
SEARCH_CALLS = 8
SEARCH_ROUNDS = 3
SEARCH_SPIN_CYCLES = 2_000_000


def time_algorithms(compressed: torch.Tensor, n: int, x_sparse: torch.Tensor, calls: int = SEARCH_CALLS,
                    rounds: int = SEARCH_ROUNDS, spin_cycles: int = SEARCH_SPIN_CYCLES) -> dict[int, float]:
    """Milliseconds a call of every algorithm config cuSPARSELt has for this problem (a config that fails is
    skipped): ``calls`` calls between two CUDA events after ``spin_cycles`` of GPU spin, the median over
    ``rounds`` rounds, each over every algorithm in turn (so a GPU clock that ramps up favours none)."""
    ks, ld, dtype, device = x_sparse.shape[1], x_sparse.stride(0), x_sparse.dtype, x_sparse.device
    rows = x_sparse.shape[0]
    y = torch.zeros(rows, n, device=device, dtype=dtype)
    runs = {}
    for alg in range(Plan(library(), device, n, ks, rows, ld, dtype).max_alg_id):
        try:
            plan = Plan(library(), device, n, ks, rows, ld, dtype, alg)
            workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=device)
            run_plan(plan, compressed, x_sparse, y, workspace)
        except CusparseLtError:
            continue
        runs[alg] = (plan, workspace)
    samples: dict[int, list[float]] = {alg: [] for alg in runs}
    for _ in range(rounds):
        events = {}
        for alg, (plan, workspace) in runs.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if spin_cycles and hasattr(torch.cuda, "_sleep"):  # a private torch API: without it, no spin
                torch.cuda._sleep(spin_cycles)
            start.record()
            for _ in range(calls):
                run_plan(plan, compressed, x_sparse, y, workspace)
            stop.record()
            events[alg] = (start, stop)
        torch.cuda.synchronize(device)
        for alg, (start, stop) in events.items():
            samples[alg].append(start.elapsed_time(stop) / calls)
    return {alg: sorted(times)[len(times) // 2] for alg, times in samples.items()}


def _alg_id(compressed: torch.Tensor, n: int, x_sparse: torch.Tensor) -> int:
    """The fastest of cuSPARSELt's algorithm configs for this weight shape (``time_algorithms``), on
    ``_search_rows`` rows of random activations laid out as ``x_sparse`` (same row stride). Our own timing
    rather than torch's ``_cslt_sparse_mm_search``, which times another layout (contiguous activations) and
    picked algorithms up to 8% slower than the best on the 8B shapes (docs/KERNELS.md)."""
    ks, ld, dtype, device = x_sparse.shape[1], x_sparse.stride(0), x_sparse.dtype, x_sparse.device
    rows = _search_rows(x_sparse.shape[0])
    key = (n, ks, rows, ld, dtype, device)
    if key in _alg_ids:
        return _alg_ids[key]
    times = time_algorithms(compressed, n, torch.randn(rows, ld, device=device, dtype=dtype)[:, :ks])
    if not times:
        raise CusparseLtError(f"cuSPARSELt: no algorithm runs a [{n}, {ks}] {dtype} region")
    _alg_ids[key] = min(times, key=times.get)
    return _alg_ids[key]


def _search_rows(rows: int) -> int:
    """The rows ``_alg_id`` times a plan of ``rows`` rows on: its own up to ``SEARCH_OWN_ROWS_MAX``."""
    return rows if rows <= SEARCH_OWN_ROWS_MAX else SEARCH_ROWS


def chosen_algorithm(n: int, ks: int, rows: int, row_stride: int, dtype: torch.dtype,
                     device: torch.device) -> int | None:
    """The algorithm ``_alg_id`` chose for a plan of this weight shape, rows and activation row stride, None
    before it ran."""
    return _alg_ids.get((n, ks, _search_rows(rows), row_stride, dtype, device))


def has_plan(n: int, ks: int, rows: int, row_stride: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the plan for ``n`` outputs, ``ks`` 2:4 columns and ``rows`` activation rows ``row_stride`` apart
    exists already: during CUDA-graph capture none may be built (its search and workspace allocate and
    synchronise), so the caller takes another path then."""
    return (n, ks, rows, row_stride, dtype, device) in _plans


def refused(n: int, ks: int, rows: int, row_stride: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether building that plan failed before (logged once): the caller takes another path."""
    return (n, ks, rows, row_stride, dtype, device) in _refused


def _plan(compressed: torch.Tensor, n: int, x_sparse: torch.Tensor) -> Plan:
    """The plan for this shape, built the first time: with the shape's algorithm (``_alg_id``), or
    cuSPARSELt's default where that one refuses this row count. A failure (or no memory for the workspace)
    is remembered and raised as ``CusparseLtError``, for the caller to fall back on."""
    ks, device, dtype = x_sparse.shape[1], x_sparse.device, x_sparse.dtype
    key = (n, ks, x_sparse.shape[0], x_sparse.stride(0), dtype, device)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    with _lock:
        if key in _refused:
            raise CusparseLtError(_refused[key])
        if key in _plans:
            return _plans[key]
        try:
            alg_id = _alg_id(compressed, n, x_sparse)
            try:
                plan = Plan(library(), device, n, ks, x_sparse.shape[0], x_sparse.stride(0), dtype, alg_id)
            except CusparseLtError:
                plan = Plan(library(), device, n, ks, x_sparse.shape[0], x_sparse.stride(0), dtype)
            workspace = _workspaces.get(device)
            if workspace is None or workspace.numel() < plan.workspace_bytes:
                if workspace is not None:
                    _outgrown_workspaces.append(workspace)
                _workspaces[device] = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=device)
        except Exception as error:  # noqa: BLE001 - while serving, a refusal must not stop the server
            _refused[key] = f"cuSPARSELt: no plan for {list(key[:4])} {dtype}: {error}"
            logger.warning("Spense: %s; that size takes the MMA kernel (up to 256 rows) or the expansion path",
                           _refused[key])
            raise CusparseLtError(_refused[key]) from error
        _plans[key] = plan
    return plan


def check_operands(compressed: torch.Tensor, x_sparse: torch.Tensor, y: torch.Tensor) -> None:
    """What ``add_sparse_product`` needs, checked before any call: bf16 x and y, the compressed buffer
    of a ``[N, Ks]`` region on x's device, and 16-byte aligned pointers and row strides."""
    m, ks = x_sparse.shape
    n = y.shape[1]
    if x_sparse.dtype not in _CUDA_R or y.dtype != x_sparse.dtype or compressed.dtype != x_sparse.dtype:
        raise ValueError(f"cusparselt: x, y and the compressed weight must all be bfloat16, found "
                         f"{x_sparse.dtype}, {y.dtype}, {compressed.dtype}")
    if not compressed.get_device() == y.get_device() == x_sparse.get_device():
        raise ValueError(f"cusparselt: the compressed weight ({compressed.device}) and y ({y.device}) must be on "
                         f"x's device ({x_sparse.device})")
    if y.shape[0] != m or not y.is_contiguous() or x_sparse.stride(1) != 1:
        raise ValueError(f"cusparselt: y must be a contiguous [{m}, N] tensor and x's rows contiguous, found "
                         f"y {list(y.shape)}, x strides {x_sparse.stride()}")
    if compressed.numel() < n * ks // 2 + n * ks // 16:
        raise ValueError(f"cusparselt: a compressed [{n}, {ks}] region holds at least {n * ks // 2 + n * ks // 16} "
                         f"values, found {compressed.numel()}")
    size = x_sparse.element_size()
    for name, address in (("x", x_sparse.data_ptr()), ("x's row stride", x_sparse.stride(0) * size),
                          ("y", y.data_ptr()), ("the compressed weight", compressed.data_ptr())):
        if address % _ALIGNMENT:
            raise ValueError(f"cusparselt: {name} must be a multiple of {_ALIGNMENT} bytes, found {address}")


def add_sparse_product(compressed: torch.Tensor, x_sparse: torch.Tensor, y: torch.Tensor,
                       accumulate: bool = True) -> None:
    """``y += x_sparse @ W_s^T`` in place on the current stream (without ``accumulate``, ``y = ...``: y's
    contents are not read, beta = 0), ``W_s [N, Ks]`` the 2:4 region in its compressed form (``compress``),
    ``x_sparse [M, Ks]`` its activation columns (a row-strided view), ``y [M, N]`` contiguous. One plan per
    shape (``_plan``)."""
    check_operands(compressed, x_sparse, y)
    run_plan(_plan(compressed, y.shape[1], x_sparse), compressed, x_sparse, y, _workspaces[x_sparse.device],
             accumulate)


def run_plan(plan: Plan, compressed: torch.Tensor, x_sparse: torch.Tensor, y: torch.Tensor,
             workspace: torch.Tensor, accumulate: bool = True) -> None:
    """One ``cusparseLtMatmul`` of ``plan`` (D = C = y, alpha = 1, beta = 1, or 0 without ``accumulate``) on
    the current stream; the operands as ``add_sparse_product`` checks them (benchmarks/bench_cusparselt.py
    times plans of chosen algorithms).
    The stream is read raw, as Triton's launcher reads it, and x's GPU made current only where it is not:
    without ``torch.cuda.current_stream`` and ``torch.cuda.device`` a call's host time fell from 38.8 to
    23.2 us on an H200 machine (docs/PERFORMANCE.md), paid on every Linear of a host-bound prefill."""
    index = x_sparse.get_device()
    args = (plan.handle, plan.plan, ctypes.byref(_ONE), ctypes.c_void_p(compressed.data_ptr()),
            ctypes.c_void_p(x_sparse.data_ptr()), ctypes.byref(_ONE if accumulate else _ZERO),
            ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(workspace.data_ptr()),
            ctypes.byref(ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(index))), 1)
    if index == torch.cuda.current_device():
        plan.lib.check("cusparseLtMatmul", *args)
    else:
        with torch.cuda.device(index):
            plan.lib.check("cusparseLtMatmul", *args)
