// detar_cupy portability layer: the only place that knows whether it is compiled by NVRTC (CUDA)
// or hiprtc (ROCm). Everything else in hip_src is written once against these primitives.
//
// No #include on purpose: both runtime compilers see this text without header search paths.
// The source must stay valid C++11 (CuPy 13.3 on ROCm adds --std=c++11).

#if defined(__HIP__) || defined(__HIPCC_RTC__) || defined(__HIP_PLATFORM_AMD__)
#define DETAR_HIP 1
#else
#define DETAR_HIP 0
#endif

#define DEV __device__ __forceinline__

typedef unsigned char u8_t;
typedef unsigned short u16_t;
typedef unsigned int u32_t;
typedef unsigned long long u64_t;
typedef signed char i8_t;
typedef short i16_t;
typedef int i32_t;
typedef long long i64_t;

// One 16-byte unit: the granule of every data load and store. Two 64-bit halves so element
// extraction is plain shifts (no type punning through unions, which C++ leaves undefined).
struct alignas(16) pack_t {
  u64_t lo, hi;
};

// 16-bit floats are carried as their bits; only the conversions below know their layout.
struct half_t { u16_t bits; };
struct bf16_t { u16_t bits; };
struct cfloat_t { float re, im; };
struct cdouble_t { double re, im; };

// ---- bit casts -------------------------------------------------------------------------------
#if DETAR_HIP
DEV u32_t f32_bits(float x) { return __builtin_bit_cast(u32_t, x); }
DEV float f32_from(u32_t u) { return __builtin_bit_cast(float, u); }
DEV u64_t f64_bits(double x) { return __builtin_bit_cast(u64_t, x); }
DEV double f64_from(u64_t u) { return __builtin_bit_cast(double, u); }
#else
DEV u32_t f32_bits(float x) { return __float_as_uint(x); }
DEV float f32_from(u32_t u) { return __uint_as_float(u); }
DEV u64_t f64_bits(double x) { return (u64_t)__double_as_longlong(x); }
DEV double f64_from(u64_t u) { return __longlong_as_double((long long)u); }
#endif

// ---- 16-bit float conversions ------------------------------------------------------------------
// float16 -> float32 is exact; float32 -> float16 rounds to nearest even, producing float16
// subnormals (no .ftz: the denormal policy is about float32 values only).
#if DETAR_HIP
DEV float h2f(u16_t b) { return (float)__builtin_bit_cast(_Float16, b); }
DEV u16_t f2h(float f) { return __builtin_bit_cast(u16_t, (_Float16)f); }
#else
DEV float h2f(u16_t b) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
DEV u16_t f2h(float f) {
  u16_t b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
}
#endif

// bfloat16 is the top half of a float32; rounding to nearest even is done on the bits so it is
// identical on every compiler. NaN is kept NaN (quiet bit set) instead of rounding into inf.
DEV float bf2f(u16_t b) { return f32_from((u32_t)b << 16); }
DEV u16_t f2bf(float f) {
  u32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16_t)((u >> 16) | 0x40u);
  return (u16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- memory ordering -------------------------------------------------------------------------
// Barrier flags: release store / acquire load at SYSTEM scope. The writer's data (its copy-in,
// by every thread of its block) is ordered before the flag by __syncthreads() followed by the
// release (release is cumulative over what the releasing thread has observed); the reader's
// acquire followed by __syncthreads() orders every thread's later loads of peer data after it.
// System rather than device scope because the reader is another GPU.
#if DETAR_WEAKEN_FLAG_SCOPE
// Test-only: a deliberately wrong variant the static ISA checks must catch.
#if DETAR_HIP
#define DETAR_FLAG_SCOPE __HIP_MEMORY_SCOPE_WORKGROUP
#else
#define DETAR_FLAG_SCOPE "cta"
#endif
#else
#if DETAR_HIP
#define DETAR_FLAG_SCOPE __HIP_MEMORY_SCOPE_SYSTEM
#else
#define DETAR_FLAG_SCOPE "sys"
#endif
#endif

#if DETAR_HIP
DEV void flag_store_release(u64_t* p, u64_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, DETAR_FLAG_SCOPE);
}
DEV u64_t flag_load_acquire(const u64_t* p) {
  return __hip_atomic_load(const_cast<u64_t*>(p), __ATOMIC_ACQUIRE, DETAR_FLAG_SCOPE);
}
DEV void flag_store_release32(u32_t* p, u32_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, DETAR_FLAG_SCOPE);
}
// A flag that publishes nothing but itself (the LL kernel's start flag): no fence before it.
DEV void flag_store_relaxed(u64_t* p, u64_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
}
DEV u32_t flag_load_acquire32(const u32_t* p) {
  return __hip_atomic_load(const_cast<u32_t*>(p), __ATOMIC_ACQUIRE, DETAR_FLAG_SCOPE);
}
// Polling our own error/state words written by other blocks of this kernel: relaxed, device.
DEV u32_t load_relaxed_dev(const u32_t* p) {
  return __hip_atomic_load(const_cast<u32_t*>(p), __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
}
// The host reads this word while kernels run: system scope so it leaves the GPU's caches.
DEV void store_relaxed_sys(u32_t* p, u32_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
// A word the host writes (mapped host memory) read by a kernel: system scope, so the load is
// coherent with the host's store instead of hitting a line the GPU cached earlier.
DEV u32_t load_relaxed_sys(const u32_t* p) {
  return __hip_atomic_load(const_cast<u32_t*>(p), __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
}
#else
DEV void flag_store_release(u64_t* p, u64_t v) {
  asm volatile("st.release." DETAR_FLAG_SCOPE ".global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
DEV u64_t flag_load_acquire(const u64_t* p) {
  u64_t v;
  asm volatile("ld.acquire." DETAR_FLAG_SCOPE ".global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
DEV void flag_store_release32(u32_t* p, u32_t v) {
  asm volatile("st.release." DETAR_FLAG_SCOPE ".global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
DEV void flag_store_relaxed(u64_t* p, u64_t v) {
  asm volatile("st.relaxed." DETAR_FLAG_SCOPE ".global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
DEV u32_t flag_load_acquire32(const u32_t* p) {
  u32_t v;
  asm volatile("ld.acquire." DETAR_FLAG_SCOPE ".global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DEV u32_t load_relaxed_dev(const u32_t* p) {
  u32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DEV void store_relaxed_sys(u32_t* p, u32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
DEV u32_t load_relaxed_sys(const u32_t* p) {
  u32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
#endif

// ---- LL lines ----------------------------------------------------------------------------------
// An LL line is 16 bytes: {data0, flag, data1, flag}. Each aligned 8-byte half {data, flag} is
// written and read as one piece, so a reader that sees the current epoch in a half also sees
// that half's data: no fence is needed between data and flag.
struct alignas(16) line_t {
  u32_t d0, f0, d1, f1;
};

#if DETAR_HIP
// Two 8-byte relaxed atomics at system scope: AMD gives no single-copy atomicity guarantee for a
// 16-byte access, but does for an aligned 8-byte atomic, which is all the protocol needs.
DEV void line_store(line_t* p, line_t v) {
  u64_t* q = reinterpret_cast<u64_t*>(p);
  __hip_atomic_store(q, (u64_t)v.d0 | ((u64_t)v.f0 << 32), __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
  __hip_atomic_store(q + 1, (u64_t)v.d1 | ((u64_t)v.f1 << 32), __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
}
DEV line_t line_load(const line_t* p) {
  u64_t* q = reinterpret_cast<u64_t*>(const_cast<line_t*>(p));
  u64_t a = __hip_atomic_load(q, __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
  u64_t b = __hip_atomic_load(q + 1, __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
  line_t v;
  v.d0 = (u32_t)a; v.f0 = (u32_t)(a >> 32); v.d1 = (u32_t)b; v.f1 = (u32_t)(b >> 32);
  return v;
}
#else
// volatile 16-byte access: each 8-byte half is single-copy atomic (the guarantee NCCL's LL
// protocol rests on); volatile keeps the poll from being hoisted or cached in L1.
DEV void line_store(line_t* p, line_t v) {
  asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.d0), "r"(v.f0),
               "r"(v.d1), "r"(v.f1) : "memory");
}
DEV line_t line_load(const line_t* p) {
  line_t v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.d0), "=r"(v.f0), "=r"(v.d1), "=r"(v.f1) : "l"(p) : "memory");
  return v;
}
#endif

// ---- clocks ------------------------------------------------------------------------------------
// Nanoseconds for the bounded spin-waits. AMD's s_memrealtime runs at a constant 100 MHz on the
// gfx9 family we target (gfx908/gfx90a/gfx94x).
#if DETAR_HIP
DEV u64_t now_ns() { return (u64_t)__builtin_amdgcn_s_memrealtime() * 10ull; }
#else
DEV u64_t now_ns() {
  u64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

// ---- 16-byte data access ---------------------------------------------------------------------
#if DETAR_WEAKEN_VECTOR
// Test-only: scalar data path the static ISA checks must catch.
DEV pack_t pack_load(const pack_t* p) {
  const volatile u32_t* q = reinterpret_cast<const volatile u32_t*>(p);
  pack_t v;
  v.lo = (u64_t)q[0] | ((u64_t)q[1] << 32);
  v.hi = (u64_t)q[2] | ((u64_t)q[3] << 32);
  return v;
}
DEV pack_t pack_load_fresh(const pack_t* p) { return pack_load(p); }
#else
DEV pack_t pack_load(const pack_t* p) { return *p; }
// Staging data that peers stored into this GPU's memory during this call. The SM's L1 is not
// coherent with those remote stores and may still hold the same addresses from two calls ago
// (same parity half), so these loads bypass L1 (.cg: cache in L2 only). On AMD the system-scope
// acquire of the barrier already invalidated the CU's vector L1, so a plain load is enough.
#if DETAR_HIP
DEV pack_t pack_load_fresh(const pack_t* p) { return *p; }
#else
DEV pack_t pack_load_fresh(const pack_t* p) {
  pack_t v;
  asm volatile("ld.global.cg.v2.u64 {%0, %1}, [%2];" : "=l"(v.lo), "=l"(v.hi) : "l"(p) : "memory");
  return v;
}
#endif
#endif
DEV void pack_store(pack_t* p, pack_t v) { *p = v; }
