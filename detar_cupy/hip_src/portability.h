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
// Rarely taken paths (misaligned bytes, failure reports) are real calls: inlined, their code
// would sit between the hot instructions and cost instruction fetches on every launch.
#if defined(__HIP__) || defined(__HIPCC_RTC__) || defined(__HIP_PLATFORM_AMD__)
#define COLD __device__ __attribute__((noinline))
#else
#define COLD __device__ __noinline__
#endif

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

// ---- float32 arithmetic of the contract -------------------------------------------------------
// Each operation rounds to nearest even as IEEE 754 says, THEN a subnormal result is flushed to a
// zero of the same sign (the contract's denormal policy, DESIGN.md section 1). The bits must not
// depend on the compiler's denormal flags, which CuPy always adds (-ftz=true on CUDA,
// -fcuda-flush-denormals-to-zero on HIP): a flushing multiply or divide tests tininess before
// rounding, so an exact result in [FLT_MIN - 2^-150, FLT_MIN), which IEEE rounds UP to FLT_MIN,
// comes out as 0 (0x3F7FFFFF * 0x00800000 gave 0 on an H200 with CuPy's flags). Inputs are
// always normal, zero, inf or NaN (flushed on entry), so only results matter.
// Sums and differences never round into that gap: when the exact sum of two such inputs is below
// FLT_MIN it is a multiple of 2^-149 below 2^-126, so exactly representable, and a flushing add
// gives the same signed zero as the exact add followed by the flush.
#if DETAR_HIP
// Flush on the bits: LLVM may fold any floating-point identity (x + -0.0 -> x) whatever the
// denormal mode, so no arithmetic instruction can be relied on to flush.
DEV float f32_flush(float x) {
  const u32_t u = f32_bits(x);
  return (u & 0x7f800000u) ? x : f32_from(u & 0x80000000u);
}
// AMD: the flag makes every f32 instruction of the kernel flush, and no per-instruction override
// exists. So products and quotients are formed in double, which keeps subnormals (the flag is
// about f32 only): a*b of two floats is exact in double (24 + 24 <= 53 bits), and a/b rounded to
// double then to float is the correctly rounded float quotient, since 53 >= 2*24 + 2 makes the
// double rounding innocuous (Figueroa, "When is double rounding innocuous?", 1995). Then
// f32_round_flush() rounds to float: results at or above FLT_MIN by the hardware conversion
// (a normal result cannot be flushed), below it by hand: the exact value rounds to FLT_MIN iff
// it is at least FLT_MIN - 2^-150 (the midpoint, which ties to FLT_MIN's even significand),
// else to a subnormal, which the policy flushes to a signed zero.
DEV float f32_round_flush(double d) {
  const u64_t u = f64_bits(d);
  const double mag = f64_from(u & 0x7fffffffffffffffull);
  if (mag < 0x1p-126) {
    const u32_t sign = (u32_t)(u >> 32) & 0x80000000u;
    return f32_from(sign | (mag >= 0x1.fffffep-127 ? 0x00800000u : 0u));
  }
  return (float)d;  // normal, inf or NaN: correctly rounded, nothing to flush
}
#if DETAR_WEAKEN_FTZ
// Test-only: the flushing hardware instructions the static ISA checks must catch.
DEV float f32_mul_flush(float a, float b) { return f32_flush(a * b); }
DEV float f32_div_flush(float a, float b) { return f32_flush(a / b); }
#else
DEV float f32_mul_flush(float a, float b) { return f32_round_flush((double)a * (double)b); }
DEV float f32_div_flush(float a, float b) { return f32_round_flush((double)a / (double)b); }
#endif
// The hardware add flushes or not; either way the bits flush leaves the same signed zero.
DEV float f32_add_flush(float a, float b) { return f32_flush(a + b); }
DEV float f32_sub_flush(float a, float b) { return f32_flush(a - b); }
#else
// NVIDIA: inline PTX, whose rounding and flushing are what the instruction says whatever the
// compiler's flags (PTX ISA, "Floating Point Instructions": .rn rounds to nearest even; without
// .ftz subnormal inputs and results are kept, with .ftz they become sign-preserving zeros); it
// also keeps the compiler from contracting a*b+c into an FMA.
// The flush is add.rn.ftz x + (-0.0): one instruction (the bit test takes three); it leaves
// every normal, zero (-0 + -0 = -0), inf and NaN as NaN, and turns a subnormal into the zero of
// its sign. Sums and differences flush in the same instruction (see above: add.rn.ftz of
// non-subnormal inputs gives the bits of add.rn followed by the flush). Products and quotients
// round without .ftz, then flush.
DEV float f32_flush(float x) {
  float r;
  asm("add.rn.ftz.f32 %0, %1, 0f80000000;" : "=f"(r) : "f"(x));
  return r;
}
#if DETAR_WEAKEN_FTZ
#define DETAR_F32_FTZ ".ftz"  // test-only: the flushing variant the ISA checks must catch
#else
#define DETAR_F32_FTZ ""
#endif
#define DETAR_F32_OP(NAME, OP, FTZ)                                                        \
  DEV float NAME(float a, float b) {                                                       \
    float r;                                                                               \
    asm(OP ".rn" FTZ ".f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));                       \
    return r;                                                                              \
  }
DETAR_F32_OP(f32_add_flush, "add", ".ftz")
DETAR_F32_OP(f32_sub_flush, "sub", ".ftz")
DETAR_F32_OP(f32_mul_round, "mul", DETAR_F32_FTZ)
DETAR_F32_OP(f32_div_round, "div", DETAR_F32_FTZ)
#undef DETAR_F32_OP
DEV float f32_mul_flush(float a, float b) { return f32_flush(f32_mul_round(a, b)); }
DEV float f32_div_flush(float a, float b) { return f32_flush(f32_div_round(a, b)); }
#endif

// The one quiet NaN per type that every NaN result becomes (the contract: NaN results have one
// canonical bit pattern, so NVIDIA, AMD and the numpy reference agree bit for bit).
#define DETAR_NAN_F16 0x7e00u
#define DETAR_NAN_BF16 0x7fc0u
#define DETAR_NAN_F32 0x7fc00000u
#define DETAR_NAN_F64 0x7ff8000000000000ull

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
// identical on every compiler. NaN becomes the canonical NaN instead of rounding into inf.
DEV float bf2f(u16_t b) { return f32_from((u32_t)b << 16); }
DEV u16_t f2bf(float f) {
  u32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16_t)DETAR_NAN_BF16;
  return (u16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- memory ordering -------------------------------------------------------------------------
// Barrier flags: 64-bit epochs, release store / acquire load at SYSTEM scope. The writer's data
// (its pushes, by every thread of its block) is ordered before the flag by release_own_stores()
// and __syncthreads() followed by the release (release is cumulative over what the releasing
// thread has observed); the reader's acquire followed by __syncthreads() orders every thread's
// later loads of peer data after it. System rather than device scope because the reader is
// another GPU.
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
// A flag that publishes nothing but itself (the LL kernel's start flag): no fence before it.
DEV void flag_store_relaxed(u64_t* p, u64_t v) {
  __hip_atomic_store(p, v, __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
}
// Every thread's own stores published at system scope, before the block barrier after which one
// thread per peer releases the flag. On AMD the flag's release does not cover the other waves'
// stores: LLVM's AMDGPU memory legalizer implements the workgroup-scope fence of
// __syncthreads() without a vmcnt wait in non-tgsplit mode (a workgroup shares one CU and its
// L1), so a wave's stores may still be in flight when the releasing wave's system-scope release
// waits only for its own (AMDGPUUsage, "Memory Model GFX90A/GFX942": release fence, workgroup
// scope, no s_waitcnt vmcnt(0) unless tgsplit; llvm-project PR 161638 discusses this gap). A
// system-scope release fence in every thread waits for that thread's stores (s_waitcnt
// vmcnt(0)) and writes back L2 (buffer_wbl2) before the barrier.
#if DETAR_WEAKEN_WAVE_RELEASE
DEV void release_own_stores() {}  // test-only: the missing wait the AMD ISA check must catch
#else
DEV void release_own_stores() { __builtin_amdgcn_fence(__ATOMIC_RELEASE, ""); }
#endif
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
DEV void flag_store_relaxed(u64_t* p, u64_t v) {
  asm volatile("st.relaxed." DETAR_FLAG_SCOPE ".global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
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
// NVIDIA: bar.sync is a morally strong CTA-scope synchronization, so every thread's earlier
// stores happen before the releasing thread's st.release.sys, and the release is cumulative
// over them (PTX ISA, "Memory Consistency Model": release patterns and causality order).
DEV void release_own_stores() {}
#endif

// ---- LL lines ----------------------------------------------------------------------------------
// An LL line is 16 bytes: {data0, flag, data1, flag}. Each aligned 8-byte half {data, flag} is
// written and read as ONE 64-bit element, so a reader that sees the current flag in a half also
// sees that half's data: no fence is needed between data and flag.
struct alignas(16) line_t {
  u32_t d0, f0, d1, f1;
};
DEV u64_t line_half(u32_t d, u32_t f) { return (u64_t)d | ((u64_t)f << 32); }

#if DETAR_HIP
// Two 8-byte relaxed atomics at system scope: single-copy atomic by the HIP/LLVM model, which
// gives no such guarantee for a 16-byte access.
DEV void line_store(line_t* p, line_t v) {
  u64_t* q = reinterpret_cast<u64_t*>(p);
  __hip_atomic_store(q, line_half(v.d0, v.f0), __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
  __hip_atomic_store(q + 1, line_half(v.d1, v.f1), __ATOMIC_RELAXED, DETAR_FLAG_SCOPE);
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
// One 16-byte volatile access with two 64-bit elements: the PTX memory model makes each element
// of a vector access a single-copy-atomic access of the element's size (PTX ISA, "Memory
// Consistency Model", vector data types), so each {data, flag} half is atomic by the model
// (with .v4.u32 elements only each 32-bit word would be). volatile keeps the poll from being
// hoisted or served from L1.
#if DETAR_WEAKEN_LL_LINES
#define DETAR_LINE_VEC "v4.u32"  // test-only: 32-bit elements the PTX ISA check must catch
DEV void line_store(line_t* p, line_t v) {
  asm volatile("st.volatile.global." DETAR_LINE_VEC " [%0], {%1, %2, %3, %4};" ::"l"(p),
               "r"(v.d0), "r"(v.f0), "r"(v.d1), "r"(v.f1) : "memory");
}
DEV line_t line_load(const line_t* p) {
  line_t v;
  asm volatile("ld.volatile.global." DETAR_LINE_VEC " {%0, %1, %2, %3}, [%4];"
               : "=r"(v.d0), "=r"(v.f0), "=r"(v.d1), "=r"(v.f1) : "l"(p) : "memory");
  return v;
}
#else
DEV void line_store(line_t* p, line_t v) {
  asm volatile("st.volatile.global.v2.b64 [%0], {%1, %2};" ::"l"(p), "l"(line_half(v.d0, v.f0)),
               "l"(line_half(v.d1, v.f1)) : "memory");
}
DEV line_t line_load(const line_t* p) {
  u64_t a, b;
  asm volatile("ld.volatile.global.v2.b64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
  line_t v;
  v.d0 = (u32_t)a; v.f0 = (u32_t)(a >> 32); v.d1 = (u32_t)b; v.f1 = (u32_t)(b >> 32);
  return v;
}
#endif
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
