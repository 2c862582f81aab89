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

It is a test tool: a barrier is a context switch, so it is slow.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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

_CXX_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-pthread", "-fno-strict-aliasing"]

# Shared between the runtime and every kernel translation unit.
_RUNTIME_H = r"""
#pragma once
#include <cstdint>
namespace kvq_rt {
struct Attrs {
  uint32_t grid[3], tg_size[3], n_tg[3];
  uint32_t tg_pos[3], t_pos_tg[3], t_pos_grid[3];
  uint32_t t_index, simd_lane, simd_index, n_simd, simd_width;
};
void tg_barrier();
void simd_barrier();
// Publishes `size` bytes from this lane and returns the values of all lanes of
// the simdgroup (slot i = lane i, 16 bytes each) and the simdgroup size.
unsigned simd_exchange(const void* value, unsigned size, unsigned char (*all)[16]);
unsigned simd_lane();
}
extern "C" int kvq_rt_launch(
    const uint32_t* grid, const uint32_t* tg,
    void (*entry)(void**, const kvq_rt::Attrs&), void** args,
    char* tg_mem_begin, char* tg_mem_end, unsigned jitter_seed,
    double timeout_s, char* err, int err_len);
"""

_RUNTIME_CPP = r"""
#include "kvq_runtime.h"
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>
#include <sched.h>

namespace kvq_rt {
namespace {

struct Poisoned {};

struct Shared {
  std::atomic<bool> poisoned{false};
  std::mutex err_mu;
  std::string err;
  double timeout_s = 30.0;
  void poison(const std::string& why) {
    std::lock_guard<std::mutex> g(err_mu);
    if (err.empty()) err = why;
    poisoned = true;
  }
};

struct Barrier {
  Shared* sh = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  unsigned n = 0, count = 0;
  uint64_t gen = 0;
  const char* what = "";
  void wait() {
    std::unique_lock<std::mutex> lk(mu);
    if (sh->poisoned) throw Poisoned{};
    const uint64_t g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
      cv.notify_all();
      return;
    }
    auto start = std::chrono::steady_clock::now();
    while (gen == g) {
      cv.wait_for(lk, std::chrono::milliseconds(50));
      if (gen != g) break;
      if (sh->poisoned) throw Poisoned{};
      std::chrono::duration<double> el = std::chrono::steady_clock::now() - start;
      if (el.count() > sh->timeout_s) {
        sh->poison(std::string("deadlock: not all threads reached a ") + what +
                   " (barrier or simd op in divergent control flow?)");
        throw Poisoned{};
      }
    }
  }
};

struct SimdGroup {
  Barrier bar;
  unsigned char buf[2][32][16];
};

struct ThreadCtx {
  Barrier* tg_bar;
  SimdGroup* simd;
  unsigned lane;
  unsigned parity;
  std::mt19937* rng;
};

thread_local ThreadCtx* tls = nullptr;

void jitter() {
  // Perturb the order in which released threads run, to expose races.
  if (tls->rng) {
    unsigned x = (*tls->rng)() & 15u;
    if (x < 4) sched_yield();
    else if (x == 4) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace

void tg_barrier() { tls->tg_bar->wait(); jitter(); }
unsigned simd_lane() { return tls->lane; }
void simd_barrier() { tls->simd->bar.wait(); jitter(); }

unsigned simd_exchange(const void* value, unsigned size, unsigned char (*all)[16]) {
  // Two buffers alternate: a lane can only reach the next-but-one exchange
  // after every lane has arrived at the next one, i.e. finished reading this.
  SimdGroup* s = tls->simd;
  const unsigned p = tls->parity;
  tls->parity ^= 1u;
  std::memcpy(s->buf[p][tls->lane], value, size);
  s->bar.wait();
  const unsigned n = s->bar.n;
  for (unsigned i = 0; i < n; ++i) std::memcpy(all[i], s->buf[p][i], 16);
  jitter();
  return n;
}

}  // namespace kvq_rt

using namespace kvq_rt;

extern "C" int kvq_rt_launch(
    const uint32_t* grid, const uint32_t* tg,
    void (*entry)(void**, const Attrs&), void** args,
    char* tg_mem_begin, char* tg_mem_end, unsigned jitter_seed,
    double timeout_s, char* err, int err_len) {
  const unsigned T = tg[0] * tg[1] * tg[2];
  unsigned n_tg[3];
  for (int i = 0; i < 3; ++i) n_tg[i] = grid[i] / tg[i];
  const unsigned n_simd = (T + 31) / 32;
  Shared sh;
  sh.timeout_s = timeout_s;
  Barrier tg_bar;
  tg_bar.sh = &sh;
  tg_bar.n = T;
  tg_bar.what = "threadgroup_barrier";
  std::vector<SimdGroup> simds(n_simd);
  for (unsigned i = 0; i < n_simd; ++i) {
    simds[i].bar.sh = &sh;
    simds[i].bar.n = (i + 1 < n_simd || T % 32 == 0) ? 32u : T % 32;
    simds[i].bar.what = "simdgroup barrier / simd op";
  }

  auto worker = [&](unsigned lin) {
    std::mt19937 rng(jitter_seed * 7919u + lin);
    ThreadCtx ctx{&tg_bar, &simds[lin / 32], lin % 32, 0, jitter_seed ? &rng : nullptr};
    tls = &ctx;
    Attrs a{};
    for (int i = 0; i < 3; ++i) {
      a.grid[i] = grid[i];
      a.tg_size[i] = tg[i];
      a.n_tg[i] = n_tg[i];
    }
    a.t_pos_tg[0] = lin % tg[0];
    a.t_pos_tg[1] = (lin / tg[0]) % tg[1];
    a.t_pos_tg[2] = lin / (tg[0] * tg[1]);
    a.t_index = lin;
    a.simd_lane = lin % 32;
    a.simd_index = lin / 32;
    a.n_simd = n_simd;
    a.simd_width = 32;
    try {
      for (unsigned z = 0; z < n_tg[2]; ++z)
        for (unsigned y = 0; y < n_tg[1]; ++y)
          for (unsigned x = 0; x < n_tg[0]; ++x) {
            // Threadgroup memory starts as NaN bytes for every threadgroup.
            tg_bar.wait();
            if (lin == 0) std::memset(tg_mem_begin, 0xff, tg_mem_end - tg_mem_begin);
            tg_bar.wait();
            ctx.parity = 0;
            a.tg_pos[0] = x; a.tg_pos[1] = y; a.tg_pos[2] = z;
            for (int i = 0; i < 3; ++i) a.t_pos_grid[i] = a.tg_pos[i] * tg[i] + a.t_pos_tg[i];
            entry(args, a);
          }
    } catch (const Poisoned&) {
    } catch (const std::exception& e) {
      sh.poison(std::string("exception in kernel thread: ") + e.what());
    } catch (...) {
      sh.poison("unknown exception in kernel thread");
    }
    if (sh.poisoned) {
      // Wake threads parked on barriers so they can observe the poison.
      tg_bar.cv.notify_all();
      for (auto& s : simds) s.bar.cv.notify_all();
    }
  };

  std::vector<std::thread> threads;
  threads.reserve(T);
  for (unsigned lin = 0; lin < T; ++lin) threads.emplace_back(worker, lin);
  for (auto& t : threads) t.join();
  if (sh.poisoned) {
    std::snprintf(err, err_len, "%s", sh.err.c_str());
    return 1;
  }
  return 0;
}
"""

# Included at the top of every kernel translation unit, before the user header.
_PRELUDE = r"""
#include "kvq_runtime.h"
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

typedef _Float16 half;
typedef _Float16 float16_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

template <class T> struct kvq_vec2 { T x, y; };
template <class T> struct kvq_vec3 { T x, y, z; };
template <class T> struct kvq_vec4 { T x, y, z, w; };
typedef kvq_vec2<uint> uint2;
typedef kvq_vec3<uint> uint3;
typedef kvq_vec4<uint> uint4;
typedef kvq_vec2<int> int2;
typedef kvq_vec3<int> int3;
typedef kvq_vec4<int> int4;
typedef kvq_vec2<float> float2;
typedef kvq_vec3<float> float3;
typedef kvq_vec4<float> float4;

#ifndef MAXFLOAT
#define MAXFLOAT 3.40282346638528859812e+38F
#endif

namespace metal {
enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
inline void threadgroup_barrier(mem_flags) { kvq_rt::tg_barrier(); }
inline void simdgroup_barrier(mem_flags) { kvq_rt::simd_barrier(); }

template <class T> using numeric_limits = std::numeric_limits<T>;

template <class T, class U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type size mismatch");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

#define KVQ_UNARY(name, fn)                                           \
  inline float name(float x) { return fn(x); }                       \
  inline float name(double x) { return fn(float(x)); }               \
  inline half name(half x) { return half(fn(float(x))); }
KVQ_UNARY(exp, std::exp)
KVQ_UNARY(exp2, std::exp2)
KVQ_UNARY(log, std::log)
KVQ_UNARY(log2, std::log2)
KVQ_UNARY(sqrt, std::sqrt)
KVQ_UNARY(tanh, std::tanh)
KVQ_UNARY(floor, std::floor)
KVQ_UNARY(ceil, std::ceil)
KVQ_UNARY(round, std::round)
KVQ_UNARY(fabs, std::fabs)
#undef KVQ_UNARY
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::rsqrt; using metal::sqrt; }
namespace precise { using metal::exp; using metal::exp2; using metal::log; using metal::rsqrt; using metal::sqrt; }

template <class T> inline T abs(T x) { return x < T(0) ? T(-x) : x; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fmin(float a, float b) { return std::fmin(a, b); }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> inline T fma(T a, T b, T c) { return a * b + c; }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isfinite(float x) { return std::isfinite(x); }

// SIMD-group functions: every lane publishes its value and all lanes reduce
// the same 32 values in lane order, so all lanes get identical results.
template <class T>
inline unsigned kvq_gather(T x, T* out) {
  static_assert(sizeof(T) <= 16, "simd op on a type wider than 16 bytes");
  unsigned char all[32][16];
  const unsigned n = kvq_rt::simd_exchange(&x, sizeof(T), all);
  for (unsigned i = 0; i < n; ++i) std::memcpy(&out[i], all[i], sizeof(T));
  return n;
}
template <class T> inline T simd_sum(T x) {
  T v[32]; const unsigned n = kvq_gather(x, v); T s = v[0];
  for (unsigned i = 1; i < n; ++i) s += v[i];
  return s;
}
template <class T> inline T simd_max(T x) {
  T v[32]; const unsigned n = kvq_gather(x, v); T s = v[0];
  for (unsigned i = 1; i < n; ++i) s = (s < v[i]) ? v[i] : s;
  return s;
}
template <class T> inline T simd_min(T x) {
  T v[32]; const unsigned n = kvq_gather(x, v); T s = v[0];
  for (unsigned i = 1; i < n; ++i) s = (v[i] < s) ? v[i] : s;
  return s;
}
template <class T> inline T simd_shuffle(T x, unsigned short lane) {
  T v[32]; const unsigned n = kvq_gather(x, v); return v[lane % n];
}
template <class T> inline T simd_broadcast(T x, unsigned short lane) { return simd_shuffle(x, lane); }
template <class T> inline T simd_shuffle_xor(T x, unsigned short mask) {
  T v[32]; const unsigned n = kvq_gather(x, v);
  return v[(kvq_rt::simd_lane() ^ mask) % n];
}
}  // namespace metal
using namespace metal;

#define device
#define constant
#define thread
#define kernel
#define threadgroup static __attribute__((used, section("kvq_tg_mem")))
static __attribute__((used, section("kvq_tg_mem"))) char kvq_tg_anchor[16];
"""

_EPILOGUE = r"""
#undef device
#undef constant
#undef thread
#undef kernel
#undef threadgroup
extern "C" char __start_kvq_tg_mem[], __stop_kvq_tg_mem[];
"""

# Headers a Metal kernel may include; the prelude already provides what the
# emulation supports, so they are empty here.
_METAL_HEADERS = ["metal_stdlib", "metal_math", "metal_simdgroup", "metal_atomic",
                  "metal_integer", "metal_common", "metal_compute"]

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def cache_dir() -> Path:
    """Directory for compiled kernels (``MLX_KVQ_EMU_CACHE`` overrides)."""
    d = os.environ.get("MLX_KVQ_EMU_CACHE")
    if d:
        p = Path(d)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        p = Path(base) / "mlx_kvq" / "metal_emu"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _atomic_write(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _run_cxx(args: list[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"metal_emu: compiling {what} failed:\n{proc.stderr[-8000:]}")


def _runtime() -> tuple[Path, Path]:
    """Include dir (runtime header + empty metal headers) and runtime object."""
    tag = _sha(_RUNTIME_H, _RUNTIME_CPP, _cxx(), *_CXX_FLAGS)
    root = cache_dir()
    inc = root / f"include_{tag}"
    obj = root / f"kvq_runtime_{tag}.o"
    if not (inc / "kvq_runtime.h").exists():
        inc.mkdir(parents=True, exist_ok=True)
        for h in _METAL_HEADERS:
            _atomic_write(inc / h, "")
        _atomic_write(inc / "kvq_runtime.h", _RUNTIME_H)
    if not obj.exists():
        src = root / f"kvq_runtime_{tag}.cpp"
        _atomic_write(src, _RUNTIME_CPP)
        _compile_to(obj, ["-I", str(inc), "-c", str(src)], "the emulator runtime")
    return inc, obj


def _compile_to(out: Path, args: list[str], what: str) -> None:
    """Compile into a temporary file and rename it into place (atomic for readers)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=out.suffix)
    os.close(fd)
    try:
        _run_cxx([_cxx(), *_CXX_FLAGS, *args, "-o", tmp], what)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(name: str, source: str) -> ctypes.CDLL:
    inc, obj = _runtime()
    key = _sha(source, obj.name, _cxx(), *_CXX_FLAGS)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        root = cache_dir()
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in name)[:40]
        so = root / f"{safe}_{key}.so"
        if not so.exists():
            src = root / f"{safe}_{key}.cpp"
            _atomic_write(src, source)
            _compile_to(so, ["-shared", "-I", str(inc), str(src), str(obj)],
                        f"kernel {name!r} (source: {src})")
        lib = ctypes.CDLL(str(so))
        lib.kvq_emu_run.restype = ctypes.c_int
        lib.kvq_emu_run.argtypes = [
            ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_double,
            ctypes.c_char_p, ctypes.c_int,
        ]
        _loaded[key] = lib
        return lib


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
            _PRELUDE,
            '#line 1 "metal_kernel_header"',
            self.header,
            "namespace {",
            f"void {fn}(\n    {sep.join(params)}) {{",
            *consts,
            '#line 1 "metal_kernel_source"',
            self.source,
            "}",
            "}  // namespace",
            _EPILOGUE,
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
        lib = _load(self.name, src)

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
