"""CPU emulation of ``mx.fast.metal_kernel`` for testing Metal kernels on Linux.

``metal_kernel(name, input_names, output_names, source, header)`` returns a
callable with the same call signature as the object MLX returns
(``inputs=, output_shapes=, output_dtypes=, grid=, threadgroup=, template=,
init_value=, verbose=``).  Instead of JIT-compiling Metal it wraps the *same*
header and body text in a small C++ shim, compiles it with g++ and runs it on
numpy buffers:

* the signature is generated as MLX generates it: inputs ``const T* name``
  (0-d inputs ``const T& name``), ``name_shape`` / ``name_strides`` /
  ``name_ndim`` when the body mentions them, outputs ``T* name`` and the
  position attributes (``thread_position_in_grid`` ...) the body mentions;
* address-space words (``device``, ``constant``, ``thread``) are defined away;
  ``threadgroup`` makes a static variable in a dedicated section, so each
  threadgroup's arrays are shared by its threads and refilled with NaN bytes
  before every threadgroup (reads of unwritten threadgroup memory show up);
* every thread of a threadgroup is a real OS thread; ``threadgroup_barrier``
  is a barrier over the threadgroup, SIMD-group functions (``simd_sum``,
  ``simd_max``, ``simd_shuffle`` ...) exchange values through a 32-lane buffer
  behind a per-simdgroup barrier; threadgroups run one after another;
* outputs start as NaN bytes unless ``init_value`` is given, so elements a
  kernel forgets to write are visible.

Differences from MLX worth knowing: template arguments become ``constexpr``
constants / typedefs at the top of a plain function (MLX makes a function
template), so discarded ``if constexpr`` branches must still compile;
``threadgroup`` may only declare kernel-scope arrays (no threadgroup pointer
parameters in helpers); the grid must be a multiple of the threadgroup;
``atomic_outputs`` and bfloat16 are not supported; simdgroups execute lanes as
independent threads, so code relying on implicit lockstep without a simd op or
``simdgroup_barrier`` fails here (as it may on hardware).

It is a test tool: a barrier is a context switch, so it is slow. This module
generates a kernel's signature and source and runs it on numpy buffers; the
C++ runtime, prelude and the compilation are in emulator_shim.py.
"""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np

from .emulator_shim import EPILOGUE, PRELUDE, cache_dir, load

__all__ = ["metal_kernel", "EmuKernel", "cache_dir"]

# Attribute name -> C type, in the order MLX declares them.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# numpy dtype -> type name used in MLX-generated signatures.
_TYPE_NAMES = {
    np.dtype(np.bool_): "bool",
    np.dtype(np.uint8): "uint8_t",
    np.dtype(np.uint16): "uint16_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.uint64): "uint64_t",
    np.dtype(np.int8): "int8_t",
    np.dtype(np.int16): "int16_t",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.float16): "float16_t",
    np.dtype(np.float32): "float",
}

def _np_dtype(dt: Any) -> np.dtype:
    try:
        return np.dtype(dt)
    except TypeError:
        pass
    import mlx.core as mx

    table = {
        mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32,
        mx.uint64: np.uint64, mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32,
        mx.int64: np.int64, mx.float16: np.float16, mx.float32: np.float32,
    }
    if dt not in table:
        raise TypeError(f"metal_emu: unsupported dtype {dt}")
    return np.dtype(table[dt])


def _type_name(dt: np.dtype) -> str:
    if dt not in _TYPE_NAMES:
        raise TypeError(f"metal_emu: unsupported dtype {dt}")
    return _TYPE_NAMES[dt]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        a = x
    elif isinstance(x, (bool, int, float, np.generic)):
        a = np.asarray(x)
    else:
        a = np.array(x, copy=True)  # mx.array -> numpy
    _type_name(a.dtype)
    # ascontiguousarray would turn a 0-d input (passed by reference) into 1-d.
    return np.array(a) if a.ndim == 0 else np.ascontiguousarray(a)


class EmuKernel:
    """Callable mirroring the object returned by ``mx.fast.metal_kernel``."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 source: str, header: str = "", ensure_row_contiguous: bool = True,
                 atomic_outputs: bool = False, compile_options: Any = None):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("metal_emu: atomic_outputs is not emulated")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        # Same detection as MLX: plain substring search of the body.
        self.shape_infos = [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
                            for n in self.input_names]
        self.attributes = [(a, t) for a, t in _ATTRIBUTES if a in source]

    # ----------------------------------------------------------------- source
    def cpp_source(self, arrays: Sequence[np.ndarray], out_dtypes: Sequence[np.dtype],
                   template: Sequence[tuple[str, Any]]) -> str:
        params, unpack = [], []
        k = 0
        for name, arr, (sh, st, nd) in zip(self.input_names, arrays, self.shape_infos):
            t = _type_name(arr.dtype)
            if arr.ndim == 0:
                params.append(f"const {t}& {name}")
                unpack.append(f"*(const {t}*)args[{k}]")
            else:
                params.append(f"const {t}* {name}")
                unpack.append(f"(const {t}*)args[{k}]")
            k += 1
            if arr.ndim > 0:
                if sh:
                    params.append(f"const int* {name}_shape")
                    unpack.append(f"(const int*)args[{k}]")
                    k += 1
                if st:
                    params.append(f"const int64_t* {name}_strides")
                    unpack.append(f"(const int64_t*)args[{k}]")
                    k += 1
                if nd:
                    params.append(f"const int& {name}_ndim")
                    unpack.append(f"*(const int*)args[{k}]")
                    k += 1
        for name, dt in zip(self.output_names, out_dtypes):
            t = _type_name(dt)
            params.append(f"{t}* {name}")
            unpack.append(f"({t}*)args[{k}]")
            k += 1
        attr_values = {
            "dispatch_quadgroups_per_threadgroup": "(a.tg_size[0]*a.tg_size[1]*a.tg_size[2] + 3) / 4",
            "dispatch_simdgroups_per_threadgroup": "a.n_simd",
            "dispatch_threads_per_threadgroup": "uint3{a.tg_size[0], a.tg_size[1], a.tg_size[2]}",
            "grid_origin": "uint3{0, 0, 0}",
            "grid_size": "uint3{a.grid[0], a.grid[1], a.grid[2]}",
            "quadgroup_index_in_threadgroup": "a.t_index / 4",
            "quadgroups_per_threadgroup": "(a.tg_size[0]*a.tg_size[1]*a.tg_size[2] + 3) / 4",
            "simdgroup_index_in_threadgroup": "a.simd_index",
            "simdgroups_per_threadgroup": "a.n_simd",
            "thread_execution_width": "a.simd_width",
            "thread_index_in_quadgroup": "a.t_index % 4",
            "thread_index_in_simdgroup": "a.simd_lane",
            "thread_index_in_threadgroup": "a.t_index",
            "thread_position_in_grid": "uint3{a.t_pos_grid[0], a.t_pos_grid[1], a.t_pos_grid[2]}",
            "thread_position_in_threadgroup": "uint3{a.t_pos_tg[0], a.t_pos_tg[1], a.t_pos_tg[2]}",
            "threadgroup_position_in_grid": "uint3{a.tg_pos[0], a.tg_pos[1], a.tg_pos[2]}",
            "threadgroups_per_grid": "uint3{a.n_tg[0], a.n_tg[1], a.n_tg[2]}",
            "threads_per_grid": "uint3{a.grid[0], a.grid[1], a.grid[2]}",
            "threads_per_simdgroup": "a.simd_width",
            "threads_per_threadgroup": "uint3{a.tg_size[0], a.tg_size[1], a.tg_size[2]}",
        }
        for a, t in self.attributes:
            params.append(f"{t} {a}")
            unpack.append(attr_values[a])

        consts = []
        for tname, val in template:
            if isinstance(val, bool):
                consts.append(f"  constexpr bool {tname} = {'true' if val else 'false'};")
            elif isinstance(val, (int, np.integer)):
                consts.append(f"  constexpr int {tname} = {int(val)};")
            else:
                consts.append(f"  typedef {_type_name(_np_dtype(val))} {tname};")

        fn = f"kvq_kernel_{self.name}"
        sep = ",\n    "
        return "\n".join([
            PRELUDE,
            '#line 1 "metal_kernel_header"',
            self.header,
            "namespace {",
            f"void {fn}(\n    {sep.join(params)}) {{",
            *consts,
            '#line 1 "metal_kernel_source"',
            self.source,
            "}",
            "}  // namespace",
            EPILOGUE,
            "static void kvq_entry(void** args, const kvq_rt::Attrs& a) {",
            f"  {fn}(\n      {(',' + chr(10) + '      ').join(unpack)});",
            "}",
            'extern "C" int kvq_emu_run(const uint32_t* grid, const uint32_t* tg, void** args,',
            "                           unsigned seed, double timeout, char* err, int err_len) {",
            "  return kvq_rt_launch(grid, tg, kvq_entry, args, __start_kvq_tg_mem, __stop_kvq_tg_mem,",
            "                       seed, timeout, err, err_len);",
            "}",
            "",
        ])

    # ------------------------------------------------------------------- call
    def __call__(self, *, inputs: Sequence[Any], output_shapes: Sequence[Sequence[int]],
                 output_dtypes: Sequence[Any], grid: Sequence[int], threadgroup: Sequence[int],
                 template: Sequence[tuple[str, Any]] | None = None, init_value: float | None = None,
                 verbose: bool = False, stream: Any = None, jitter_seed: int = 1,
                 timeout: float = 60.0, return_numpy: bool = False) -> list:
        """Run the kernel. Extra keywords (emulator only): ``jitter_seed``
        (0 disables the random yields that shake thread interleavings),
        ``timeout`` (seconds before a stuck barrier is reported as a deadlock),
        ``return_numpy``."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                             f"but got size {len(inputs)}.")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] output_shapes/output_dtypes do not match output_names.")
        grid = tuple(int(g) for g in grid)
        tg = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3 or min(tg) < 1 or min(grid) < 1:
            raise ValueError("metal_emu: grid and threadgroup must be 3 positive ints")
        if any(g % t for g, t in zip(grid, tg)):
            raise ValueError(f"metal_emu: grid {grid} must be a multiple of threadgroup {tg}")
        if tg[0] * tg[1] * tg[2] > 1024:
            raise ValueError("metal_emu: more than 1024 threads per threadgroup")
        arrays = [_to_numpy(x) for x in inputs]
        out_dtypes = [_np_dtype(d) for d in output_dtypes]
        src = self.cpp_source(arrays, out_dtypes, list(template or []))
        if verbose:
            print(f"Generated emulation source for `{self.name}`:\n```\n{src}\n```")
        lib = load(self.name, src)

        outs = []
        for shape, dt in zip(output_shapes, out_dtypes):
            o = np.empty(tuple(int(s) for s in shape), dtype=dt)
            if init_value is None:
                o.view(np.uint8).fill(0xFF)  # NaN for floats: unwritten elements show up
            else:
                o.fill(init_value)
            outs.append(o)

        keep: list[Any] = []
        ptrs: list[int] = []
        for arr, (sh, st, nd) in zip(arrays, self.shape_infos):
            keep.append(arr)
            ptrs.append(arr.ctypes.data)
            if arr.ndim > 0:
                if sh:
                    a = np.asarray(arr.shape, dtype=np.int32)
                    keep.append(a)
                    ptrs.append(a.ctypes.data)
                if st:
                    a = np.asarray([s // arr.itemsize for s in arr.strides], dtype=np.int64)
                    keep.append(a)
                    ptrs.append(a.ctypes.data)
                if nd:
                    a = np.asarray([arr.ndim], dtype=np.int32)
                    keep.append(a)
                    ptrs.append(a.ctypes.data)
        for o in outs:
            ptrs.append(o.ctypes.data)
        c_args = (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)
        c_grid = (ctypes.c_uint32 * 3)(*grid)
        c_tg = (ctypes.c_uint32 * 3)(*tg)
        err = ctypes.create_string_buffer(1024)
        rc = lib.kvq_emu_run(c_grid, c_tg, c_args, int(jitter_seed), float(timeout), err, len(err))
        if rc != 0:
            raise RuntimeError(f"metal_emu: kernel {self.name!r} failed: {err.value.decode(errors='replace')}")
        if return_numpy:
            return outs
        import mlx.core as mx

        return [mx.array(o) for o in outs]


def metal_kernel(name: str, input_names: Sequence[str], output_names: Sequence[str], source: str,
                 header: str = "", ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 compile_options: Any = None) -> EmuKernel:
    """Drop-in for ``mx.fast.metal_kernel`` that runs on the CPU (see module docs)."""
    return EmuKernel(name, input_names, output_names, source, header,
                     ensure_row_contiguous, atomic_outputs, compile_options)
