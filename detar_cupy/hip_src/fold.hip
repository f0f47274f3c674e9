// Kernels of the NCCL/RCCL transport (detar_cupy/transports/nccl.py). NCCL only moves bytes
// between ranks; these kernels fold what it delivered, element i over ranks 0..N-1 in rank order
// with the arithmetic of arith.h, so the bits are those of the IPC kernels and of
// detar_cupy.reference. A fold may start from a carried partial and may end in one (accumulator
// type, no finish, no rounding): that is how the hierarchical transport continues one node's fold
// on the next node without splitting the left fold.
//
// FoldArgs, CallHeader and the DETAR_FOLD_* constants are rendered from
// _fold_abi.py just before this file. Instantiations (extern "C" names) come from _kernels.py.
//
// Every kernel but the header stamp is a no-op once the transport's Report word is nonzero (a
// mismatch found by the header check, a timeout found by the host watchdog): bytes of a call the
// ranks do not agree on are never folded, and no user memory is written after a failure.

// Whether this transport has failed. The word is written either by an earlier kernel of ours
// (stream order makes a kernel's writes visible to every later kernel on the stream) or by the
// host watchdog into mapped host memory, which a system-scope load reads coherently (PTX memory
// model: a .sys relaxed load observes the host's store once it is performed; on AMD the load
// bypasses the non-coherent caches). One thread reads and the block agrees, so an early return
// is block-uniform.
DEV bool stopped(const FoldArgs& a) {
  return __syncthreads_or(threadIdx.x == 0 && load_relaxed_sys(&a.report->word) != 0u);
}

// How an accumulator value is stored between launches (a carried partial): its own bytes, B per
// element, bit for bit, so that continuing a fold from memory gives the bits of an unbroken one.
template <class A> struct AccMem;
template <> struct AccMem<float> {
  static const int B = 4;
  DEV static float get(u64_t b) { return f32_from((u32_t)b); }
  DEV static u64_t put(float a) { return f32_bits(a); }
};
template <> struct AccMem<double> {
  static const int B = 8;
  DEV static double get(u64_t b) { return f64_from(b); }
  DEV static u64_t put(double a) { return f64_bits(a); }
};
template <> struct AccMem<cfloat_t> {
  static const int B = 8;
  DEV static cfloat_t get(u64_t b) {
    cfloat_t c; c.re = f32_from((u32_t)b); c.im = f32_from((u32_t)(b >> 32)); return c;
  }
  DEV static u64_t put(cfloat_t a) { return (u64_t)f32_bits(a.re) | ((u64_t)f32_bits(a.im) << 32); }
};
template <> struct AccMem<cdouble_t> {
  static const int B = 16;
  DEV static cdouble_t get(pack_t b) { cdouble_t c; c.re = f64_from(b.lo); c.im = f64_from(b.hi); return c; }
  DEV static pack_t put(cdouble_t a) { pack_t p; p.lo = f64_bits(a.re); p.hi = f64_bits(a.im); return p; }
};
template <class I> struct IntAccMem {  // integers accumulate in their own type
  static const int B = sizeof(I);
  DEV static I get(u64_t b) { return (I)(typename UInt<sizeof(I)>::type)b; }
  DEV static u64_t put(I a) { return (u64_t)(typename UInt<sizeof(I)>::type)a; }
};
template <> struct AccMem<i8_t> : IntAccMem<i8_t> {};
template <> struct AccMem<i16_t> : IntAccMem<i16_t> {};
template <> struct AccMem<i32_t> : IntAccMem<i32_t> {};
template <> struct AccMem<i64_t> : IntAccMem<i64_t> {};
template <> struct AccMem<u8_t> : IntAccMem<u8_t> {};
template <> struct AccMem<u16_t> : IntAccMem<u16_t> {};
template <> struct AccMem<u32_t> : IntAccMem<u32_t> {};
template <> struct AccMem<u64_t> : IntAccMem<u64_t> {};

// The fold of one pack of elements (K lanes), one rank at a time, in the order the caller feeds
// them. A pack of K elements has K partials, which fill R = B / S packs of partials.
template <class T, class Op> struct Folder {
  typedef Traits<T> Tr;
  typedef typename Tr::acc_t A;
  typedef AccMem<A> M;
  typedef Lane<Tr::S> L;
  typedef Lane<M::B> LA;
  static const int K = L::K;
  static const int KA = LA::K;
  static const int R = K / KA;
  A acc[K];

  DEV void first(const pack_t& v) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = Tr::load(L::get(v, k));
  }
  DEV void next(const pack_t& v) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = Op::apply(acc[k], Tr::load(L::get(v, k)));
  }
  DEV void carry_in(const pack_t (&p)[R]) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = M::get(LA::get(p[k / KA], k % KA));
  }
  DEV void carry_out(pack_t* dst) const {
    pack_t q[R];
#pragma unroll
    for (int r = 0; r < R; ++r) { q[r].lo = 0; q[r].hi = 0; }
#pragma unroll
    for (int k = 0; k < K; ++k) LA::set(q[k / KA], k % KA, M::put(acc[k]));
#pragma unroll
    for (int r = 0; r < R; ++r) pack_store(dst + r, q[r]);
  }
  DEV pack_t result(int n) const {  // the op's finish, then one rounding to T
    A r[K];
#pragma unroll
    for (int k = 0; k < K; ++k) r[k] = Op::finish(acc[k], n);
    return StorePack<T>::of(r);
  }
};

// The carried partials of pack o (R packs; carry buffers are 16-byte aligned staging).
template <class F> DEV void load_carry(F& f, const char* carry, u64_t o) {
  pack_t c[F::R];
#pragma unroll
  for (int r = 0; r < F::R; ++r) c[r] = pack_load(reinterpret_cast<const pack_t*>(carry) + o * F::R + r);
  f.carry_in(c);
}

#define FOLD_BATCH 8  // source packs in flight per thread

// fold: dst[i] = fold(carry[i] or src_0[i], src_1[i], ...), over `slots` sources at
// src + q * src_stride, `count` elements. With DETAR_FOLD_CARRY_OUT, dst receives the partials
// (16-byte aligned staging); otherwise the finished elements (any alignment: user memory). The
// sources are staging that NCCL filled in earlier kernels (visible by stream order), or this
// rank's input (any alignment: then the byte path). Packs [o, end), each thread every G-th; WHOLE
// as in collectives.hip's data loops (o < the launch's whole packs).
template <class T, class Op, bool WHOLE>
DEV u64_t fold_range(const FoldArgs& a, u64_t o, u64_t end, u64_t G) {
  typedef Folder<T, Op> F;
  const int S = Traits<T>::S;
  const bool carry_in = (a.flags & DETAR_FOLD_CARRY_IN) != 0u;
  const bool carry_out = (a.flags & DETAR_FOLD_CARRY_OUT) != 0u;
  for (; o < end; o += G) {
    F f;
    u32_t q = 0;
    if (carry_in) {
      load_carry(f, a.carry, o);
    } else {
      f.first(load_pack<S, WHOLE>(a.src, o, a.count));
      q = 1;
    }
    while (q < a.slots) {  // the slots in rank order, FOLD_BATCH loads at a time
      const u32_t n = a.slots - q < FOLD_BATCH ? a.slots - q : FOLD_BATCH;
      pack_t v[FOLD_BATCH];
#pragma unroll
      for (u32_t i = 0; i < FOLD_BATCH; ++i)
        if (i < n) v[i] = load_pack<S, WHOLE>(a.src + (u64_t)(q + i) * a.src_stride, o, a.count);
#pragma unroll
      for (u32_t i = 0; i < FOLD_BATCH; ++i)
        if (i < n) f.next(v[i]);
      q += n;
    }
    if (carry_out) f.carry_out(reinterpret_cast<pack_t*>(a.dst) + o * F::R);
    else store_pack<S, WHOLE>(a.dst, o, a.count, f.result(a.divisor));
  }
  return o;
}
// The whole packs: all but a short last one when every source (and its stride) and the
// destination are 16-byte aligned; a destination of partials is aligned staging.
template <class T, class Op> DEV void fold(const FoldArgs& a) {
  const int S = Traits<T>::S;
  if (stopped(a)) return;
  const u64_t g0 = (u64_t)blockIdx.x * blockDim.x + threadIdx.x, G = (u64_t)gridDim.x * blockDim.x;
  const bool aligned = aligned16(a.src) && (a.src_stride & 15u) == 0 &&
                       ((a.flags & DETAR_FOLD_CARRY_OUT) != 0u || aligned16(a.dst));
  const u64_t w = aligned ? a.count / (16 / S) : 0;
  const u64_t o = fold_range<T, Op, true>(a, g0, w, G);
  fold_range<T, Op, false>(a, o, packs_of<S>(a.count), G);
}

// copy_slots: `slots` pieces of `count` elements of S bytes, piece q from src + q * src_stride
// to dst + q * dst_stride (staging to user memory for all-gather and broadcast; any alignment).
// One flat loop over every piece's packs; a pack below w is whole in source and destination.
template <int S> DEV void copy_slots(const FoldArgs& a) {
  if (stopped(a)) return;
  const u64_t P = packs_of<S>(a.count), total = P * a.slots;
  const u64_t g0 = (u64_t)blockIdx.x * blockDim.x + threadIdx.x, G = (u64_t)gridDim.x * blockDim.x;
  const bool aligned = aligned16(a.src) && (a.src_stride & 15u) == 0 && aligned16(a.dst) &&
                       (a.dst_stride & 15u) == 0;
  const u64_t w = aligned ? a.count / (16 / S) : 0;
  for (u64_t i = g0; i < total; i += G) {
    const u64_t q = i / P, o = i % P;
    const char* src = a.src + q * a.src_stride;
    char* dst = a.dst + q * a.dst_stride;
    if (o < w) store_pack<S, true>(dst, o, a.count, load_pack<S, true>(src, o, a.count));
    else store_pack<S, false>(dst, o, a.count, load_pack<S, false>(src, o, a.count));
  }
}

// header_stamp (one thread): this rank's header for the call about to be exchanged, at dst. The
// epoch lives in device memory and is advanced here, by the GPU, so a captured graph numbers
// every replay. The NCCL all-gather that sends the header is a later kernel on the same stream:
// stream order publishes these stores to it.
DEV void header_stamp(const FoldArgs& a) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const u64_t epoch = *a.state + 1u;
  *a.state = epoch;
  CallHeader h;
  h.epoch = epoch; h.sig = a.sig; h.count = a.count; h.aux = a.aux;
  *reinterpret_cast<CallHeader*>(a.dst) = h;
}

// header_check (one block): compare every rank's header (the all-gather's output at src, one per
// rank, `slots` ranks) with this rank's. On any difference, report a MismatchError naming the
// lowest rank that differs; every rank sees the same headers, so every rank reports. The
// all-gather wrote the headers in an earlier kernel: stream order makes them visible.
DEV void header_check(const FoldArgs& a) {
  __shared__ u32_t first;
  if (threadIdx.x == 0) first = ~0u;
  __syncthreads();
  const CallHeader* h = reinterpret_cast<const CallHeader*>(a.src);
  const CallHeader mine = h[a.rank];
  for (u32_t q = threadIdx.x; q < a.slots; q += blockDim.x) {
    const CallHeader t = h[q];
    if (t.epoch != mine.epoch || t.sig != mine.sig || t.count != mine.count || t.aux != mine.aux)
      atomicMin(&first, q);
  }
  __syncthreads();
  if (threadIdx.x != 0 || first == ~0u) return;
  Report* r = a.report;
  if (load_relaxed_sys(&r->word) != 0u) return;  // the first failure stays the one reported
  const CallHeader t = h[first];
  r->epoch = mine.epoch; r->sig = mine.sig; r->peer_sig = t.sig;
  r->count = mine.count; r->aux = mine.aux; r->chunk = 0;
  r->peer_count = t.count; r->peer_aux = t.aux; r->peer_chunk = 0;
  // The details reach host memory before the word that tells the host (and our later kernels)
  // to read them: a system-scope fence orders the stores as every observer sees them.
  __threadfence_system();
  store_relaxed_sys(&r->word, ERR_MISMATCH | (first << 8) | (AT_HEADER << 16));
}

// node_carry: one node's step of the hierarchical transport's carried fold, over the G ranks of
// the node (IPC, as the two-shot kernel moves its slices). Each rank pushes piece q of its input
// (`count` elements at src, pieces of aux elements) into slot `rank` of node rank q's staging,
// meets the others at the start barrier, then folds its own piece over the node's ranks in rank
// order, starting from the partial the previous node carried in (DETAR_FOLD_CARRY_IN) or from
// the node's first rank; it writes partials for the next node (DETAR_FOLD_CARRY_OUT) or, on the
// last node, the finished elements (16-byte aligned staging either way). The barrier and the
// epochs are collectives.hip's: call_epoch, already_failed, push_slices, barrier_start and
// finish_call are the only IPC primitives used.
template <class T, class Op, int G> DEV void node_carry(const Ctx& c, const FoldArgs& a) {
  typedef Folder<T, Op> F;
  const int S = Traits<T>::S, K = F::K;
  Call k;
  // The call was checked by the header exchange before any node step; this launch's signature
  // and counts still travel in the node's headers and descriptors, as every IPC launch's do.
  k.epoch = call_epoch(c); k.sig = a.sig; k.aux = a.aux; k.total = a.count; k.chunk = 0;
  const bool failed = already_failed(c);  // block-uniform, like stopped()
  if (failed || stopped(a)) { finish_call(c, k.epoch); return; }
  const u64_t half = (k.epoch & 1u) * c.stage_half_packs;
  const u64_t g0 = (u64_t)blockIdx.x * blockDim.x + threadIdx.x, Gt = (u64_t)gridDim.x * blockDim.x;
  const u64_t slice = a.aux, sp = slice / K;  // the host makes the slice a multiple of K
  push_slices<S, G>(c, half, a.src, slice, true, a.count, slice, (u64_t)c.rank * sp, sp, g0, Gt);
  if (barrier_start<G>(c, k)) {
    const pack_t* mine = c.stage[c.rank] + half;
    const u64_t len = piece_len(true, a.count, slice, c.rank);
    const bool carry_in = (a.flags & DETAR_FOLD_CARRY_IN) != 0u;
    const bool carry_out = (a.flags & DETAR_FOLD_CARRY_OUT) != 0u;
    for (u64_t o = g0; o * K < len; o += Gt) {
      pack_t v[G];
#pragma unroll
      for (int r = 0; r < G; ++r) v[r] = pack_load_fresh(mine + r * sp + o);
      F f;
      if (carry_in) {
        load_carry(f, a.carry, o);
        f.next(v[0]);
      } else {
        f.first(v[0]);
      }
#pragma unroll
      for (int r = 1; r < G; ++r) f.next(v[r]);
      if (carry_out) f.carry_out(reinterpret_cast<pack_t*>(a.dst) + o * F::R);
      else pack_store(reinterpret_cast<pack_t*>(a.dst) + o, f.result(a.divisor));
    }
  }
  finish_call(c, k.epoch);
}
