// Element arithmetic of the contract (DESIGN.md section 1), identical on every compiler.
//
// float32 denormal policy: flush to a zero of the same sign, explicitly, on every value entering a
// float32 accumulator and on every float32 operation's result, after the operation has rounded as
// IEEE 754 says (portability.h: f32_*_flush). The bits are then independent of the compiler's
// denormal flags and of whether min/max instructions honour the hardware denormal mode. float64
// keeps subnormals.
//
// NaN: every NaN result is the one canonical quiet NaN of its type (Traits<T>::store). Whether a
// result is NaN is fixed by IEEE 754 for every input; only the payload differs between NVIDIA,
// AMD and numpy, so canonicalising at the end of the fold gives the same bits everywhere.

DEV float ftz(float x) { return f32_flush(x); }

// Each operation is rounded on its own: the f32 primitives are inline PTX on CUDA (never
// contracted into an FMA) and the compile options turn contraction off for double and on HIP.
DEV float add(float a, float b) { return f32_add_flush(a, b); }
DEV float sub(float a, float b) { return f32_sub_flush(a, b); }
DEV float mul(float a, float b) { return f32_mul_flush(a, b); }
DEV float divn(float a, int n) { return f32_div_flush(a, (float)n); }
DEV double add(double a, double b) { return a + b; }
DEV double sub(double a, double b) { return a - b; }
DEV double mul(double a, double b) { return a * b; }
DEV double divn(double a, int n) { return a / (double)n; }

// x != x holds exactly for NaN (IEEE 754 comparison; no fast-math option is ever passed): one
// compare instruction (setp.nan / v_cmp_u), where testing the bits takes three, on every stored
// element. The canonical NaN's bits are then written as an integer constant.
DEV bool is_nan(float a) { return a != a; }
DEV bool is_nan(double a) { return a != a; }
DEV float canonical(float a) { return is_nan(a) ? f32_from(DETAR_NAN_F32) : a; }
DEV double canonical(double a) { return is_nan(a) ? f64_from(DETAR_NAN_F64) : a; }

// min/max: NaN wins (as the canonical NaN); equal values merge their bits so that
// min(-0, +0) = -0 and max(-0, +0) = +0 on every backend, whatever its min instruction does.
DEV float vmin(float a, float b) {
  if (is_nan(a) || is_nan(b)) return f32_from(DETAR_NAN_F32);
  return a < b ? a : (b < a ? b : f32_from(f32_bits(a) | f32_bits(b)));
}
DEV float vmax(float a, float b) {
  if (is_nan(a) || is_nan(b)) return f32_from(DETAR_NAN_F32);
  return a > b ? a : (b > a ? b : f32_from(f32_bits(a) & f32_bits(b)));
}
DEV double vmin(double a, double b) {
  if (is_nan(a) || is_nan(b)) return f64_from(DETAR_NAN_F64);
  return a < b ? a : (b < a ? b : f64_from(f64_bits(a) | f64_bits(b)));
}
DEV double vmax(double a, double b) {
  if (is_nan(a) || is_nan(b)) return f64_from(DETAR_NAN_F64);
  return a > b ? a : (b > a ? b : f64_from(f64_bits(a) & f64_bits(b)));
}

// Complex: componentwise sums; the product as four separately rounded products, one
// subtraction and one addition, the textbook formula with no fused operations.
template <class C> DEV C cadd(C a, C b) { C r; r.re = add(a.re, b.re); r.im = add(a.im, b.im); return r; }
template <class C> DEV C cmul(C a, C b) {
  C r;
  r.re = sub(mul(a.re, b.re), mul(a.im, b.im));
  r.im = add(mul(a.re, b.im), mul(a.im, b.re));
  return r;
}
template <class C> DEV C cdivn(C a, int n) { C r; r.re = divn(a.re, n); r.im = divn(a.im, n); return r; }
DEV cfloat_t add(cfloat_t a, cfloat_t b) { return cadd(a, b); }
DEV cfloat_t mul(cfloat_t a, cfloat_t b) { return cmul(a, b); }
DEV cfloat_t divn(cfloat_t a, int n) { return cdivn(a, n); }
DEV cdouble_t add(cdouble_t a, cdouble_t b) { return cadd(a, b); }
DEV cdouble_t mul(cdouble_t a, cdouble_t b) { return cmul(a, b); }
DEV cdouble_t divn(cdouble_t a, int n) { return cdivn(a, n); }

// Integers wrap around like numpy: the arithmetic is done in an unsigned type (where overflow is
// defined) at least as wide as int, so small types do not overflow a promoted signed int.
template <class T> struct Wide { typedef u32_t type; };
template <> struct Wide<i64_t> { typedef u64_t type; };
template <> struct Wide<u64_t> { typedef u64_t type; };
#define DETAR_INT_OPS(T)                                                                       \
  DEV T add(T a, T b) { typedef Wide<T>::type W; return (T)(W)((W)a + (W)b); }                 \
  DEV T mul(T a, T b) { typedef Wide<T>::type W; return (T)(W)((W)a * (W)b); }                 \
  DEV T vmin(T a, T b) { return a < b ? a : b; }                                               \
  DEV T vmax(T a, T b) { return a > b ? a : b; }
DETAR_INT_OPS(i8_t)
DETAR_INT_OPS(i16_t)
DETAR_INT_OPS(i32_t)
DETAR_INT_OPS(i64_t)
DETAR_INT_OPS(u8_t)
DETAR_INT_OPS(u16_t)
DETAR_INT_OPS(u32_t)
DETAR_INT_OPS(u64_t)
#undef DETAR_INT_OPS

// The ops of the fold: apply() combines two accumulator values, finish() runs once at the end.
#define DETAR_FOLD_OP(NAME, FN)                                          \
  struct NAME {                                                         \
    template <class A> DEV static A apply(A a, A b) { return FN(a, b); } \
    template <class A> DEV static A finish(A a, int) { return a; }      \
  };
DETAR_FOLD_OP(OpSum, add)
DETAR_FOLD_OP(OpProd, mul)
DETAR_FOLD_OP(OpMin, vmin)
DETAR_FOLD_OP(OpMax, vmax)
#undef DETAR_FOLD_OP
// avg = the sum fold, then one division by N in the accumulator type, then one rounding.
struct OpAvg : OpSum {
  template <class A> DEV static A finish(A a, int n) { return divn(a, n); }
};

// ---- element types: where an element sits in a pack and how it enters/leaves the accumulator --
// Lane<S>: elements of S bytes (S <= 8) carried as the low bits of a u64.
template <int S> struct UInt;
template <> struct UInt<1> { typedef u8_t type; };
template <> struct UInt<2> { typedef u16_t type; };
template <> struct UInt<4> { typedef u32_t type; };
template <> struct UInt<8> { typedef u64_t type; };

template <int S> struct Lane {
  typedef u64_t bits_t;
  static const int K = 16 / S;  // elements per pack
  DEV static u64_t get(const pack_t& p, int k) {
    const int bit = k * S * 8;
    const u64_t w = bit < 64 ? p.lo : p.hi;
    return (w >> (bit & 63)) & (~0ull >> (64 - S * 8));
  }
  DEV static void set(pack_t& p, int k, u64_t v) {  // p's lane k must be zero
    const int bit = k * S * 8;
    if (bit < 64) p.lo |= v << (bit & 63); else p.hi |= v << (bit & 63);
  }
};
// 16-byte elements (complex128) are a whole pack.
template <> struct Lane<16> {
  typedef pack_t bits_t;
  static const int K = 1;
  DEV static pack_t get(const pack_t& p, int) { return p; }
  DEV static void set(pack_t& p, int, pack_t v) { p = v; }
};

// Traits<T>: storage type T -> accumulator type A of the contract, and back.
template <class T> struct Traits;
// store() is where every NaN result becomes the canonical NaN of the output type; float16
// results are stored a pack at a time (StorePack<half_t>).
template <> struct Traits<half_t> {
  static const int S = 2; typedef float acc_t;
  DEV static float load(u64_t b) { return h2f((u16_t)b); }  // never subnormal as a float32
};
template <> struct Traits<bf16_t> {
  static const int S = 2; typedef float acc_t;
  DEV static float load(u64_t b) { return ftz(bf2f((u16_t)b)); }
  DEV static u64_t store(float a) { return f2bf(a); }  // f2bf gives the canonical NaN
};
template <> struct Traits<float> {
  static const int S = 4; typedef float acc_t;
  DEV static float load(u64_t b) { return ftz(f32_from((u32_t)b)); }
  DEV static u64_t store(float a) { return f32_bits(canonical(a)); }
};
template <> struct Traits<double> {
  static const int S = 8; typedef double acc_t;
  DEV static double load(u64_t b) { return f64_from(b); }
  DEV static u64_t store(double a) { return f64_bits(canonical(a)); }
};
template <> struct Traits<cfloat_t> {
  static const int S = 8; typedef cfloat_t acc_t;
  DEV static cfloat_t load(u64_t b) {  // little endian: real part first
    cfloat_t c; c.re = ftz(f32_from((u32_t)b)); c.im = ftz(f32_from((u32_t)(b >> 32))); return c;
  }
  DEV static u64_t store(cfloat_t a) {  // each component on its own, like numpy's complex NaNs
    return (u64_t)f32_bits(canonical(a.re)) | ((u64_t)f32_bits(canonical(a.im)) << 32);
  }
};
template <> struct Traits<cdouble_t> {
  static const int S = 16; typedef cdouble_t acc_t;
  DEV static cdouble_t load(pack_t b) { cdouble_t c; c.re = f64_from(b.lo); c.im = f64_from(b.hi); return c; }
  DEV static pack_t store(cdouble_t a) {
    pack_t p; p.lo = f64_bits(canonical(a.re)); p.hi = f64_bits(canonical(a.im)); return p;
  }
};
// Integers accumulate in their own type; the casts from u64 bits keep the low S bytes.
template <class T, int SZ> struct IntTraits {
  static const int S = SZ; typedef T acc_t;
  DEV static T load(u64_t b) { return (T)(typename UInt<SZ>::type)b; }
  DEV static u64_t store(T a) { return (u64_t)(typename UInt<SZ>::type)a; }
};
template <> struct Traits<i8_t> : IntTraits<i8_t, 1> {};
template <> struct Traits<i16_t> : IntTraits<i16_t, 2> {};
template <> struct Traits<i32_t> : IntTraits<i32_t, 4> {};
template <> struct Traits<i64_t> : IntTraits<i64_t, 8> {};
template <> struct Traits<u8_t> : IntTraits<u8_t, 1> {};
template <> struct Traits<u16_t> : IntTraits<u16_t, 2> {};
template <> struct Traits<u32_t> : IntTraits<u32_t, 4> {};
template <> struct Traits<u64_t> : IntTraits<u64_t, 8> {};

// A pack of results (each the op's finish, in the accumulator type): every lane through
// Traits<T>::store.
template <class T> struct StorePack {
  typedef Traits<T> Tr;
  typedef Lane<Tr::S> L;
  DEV static pack_t of(const typename Tr::acc_t (&a)[L::K]) {
    pack_t out;
    out.lo = 0; out.hi = 0;
#pragma unroll
    for (int k = 0; k < L::K; ++k) L::set(out, k, Tr::store(a[k]));
    return out;
  }
};
// float16: lanes converted in pairs straight into 32-bit words (NVRTC makes each pair one
// packed conversion on sm_90), and the NaN test once per pack on the stored bits, where a test
// per lane took more (bench/NOTES.md, v6 kernels). The conversion keeps a NaN a NaN; adding
// 0x03ff to a lane's magnitude sets its bit 15 exactly when it exceeds infinity's 0x7c00 and
// never carries into the next lane (at most 0x7fff + 0x03ff = 0x83fe).
DEV u32_t f16x2_nan_bits(u32_t w) { return ((w & 0x7fff7fffu) + 0x03ff03ffu) & 0x80008000u; }
template <> struct StorePack<half_t> {
  DEV static pack_t of(const float (&a)[8]) {
    u32_t w[4];
    u32_t nan = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = (u32_t)f2h(a[2 * i]) | ((u32_t)f2h(a[2 * i + 1]) << 16);
      nan |= f16x2_nan_bits(w[i]);
    }
    if (nan != 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u32_t t = f16x2_nan_bits(w[i]);
        const u32_t m = t | (t - (t >> 15));  // 0xffff in every NaN lane (0x8000 - 1: no borrow)
        w[i] = (w[i] & ~m) | ((DETAR_NAN_F16 * 0x00010001u) & m);
      }
    }
    pack_t out;
    out.lo = (u64_t)w[0] | ((u64_t)w[1] << 32);
    out.hi = (u64_t)w[2] | ((u64_t)w[3] << 32);
    return out;
  }
};

// The fold of the contract over one pack: left to right in rank order 0..N-1, every lane.
// All N packs are loaded by the caller before the first use, so the loads overlap.
template <class T, class Op, int N> DEV pack_t reduce_pack(const pack_t (&v)[N]) {
  typedef Traits<T> Tr;
  typedef Lane<Tr::S> L;
  typename Tr::acc_t r[L::K];
#pragma unroll
  for (int k = 0; k < L::K; ++k) {
    typename Tr::acc_t a = Tr::load(L::get(v[0], k));
#pragma unroll
    for (int s = 1; s < N; ++s) a = Op::apply(a, Tr::load(L::get(v[s], k)));
    r[k] = Op::finish(a, N);
  }
  return StorePack<T>::of(r);
}
