"""The C++ side of the Metal emulator (emulator.py): the runtime every kernel
links against (threads per threadgroup, barriers, SIMD-group exchange,
threadgroup memory refilled with NaN bytes, a timeout), the prelude and
epilogue wrapped around a kernel's header and body, and their compilation
with g++ into shared objects cached on disk by content hash
(``MLX_KVQ_EMU_CACHE`` overrides the directory) and loaded with ctypes.

emulator.py generates a kernel's signature and launches it; this module only
knows C++ text and how to build it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

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
PRELUDE = r"""
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

EPILOGUE = r"""
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


def load(name: str, source: str) -> ctypes.CDLL:
    """The kernel translation unit `source` compiled (once per content) and loaded."""
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
