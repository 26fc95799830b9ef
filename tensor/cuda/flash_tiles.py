"""The tiles of the flash-attention kernels (tensor/cuda/flash_attention.py): the device primitives, the dtype
traits, and the loads of fragments and tiles that the forward (flash_forward_kernel.py) and backward
(flash_backward_kernels.py) kernels are written in. CUDA C++ text, compiled with them as one NVRTC module.

Matrix products: 16-bit inputs use `mma.sync.aligned.m16n8k16` (inline PTX, float32 accumulation;
P and dS are rounded to the input dtype before their product, as FlashAttention does); float32 uses
the same fragments as float pairs, each value split into three bfloat16 parts whose six significant
part products go through the bfloat16 mma (`mma_f32_split`: float32 accuracy on the tensor cores,
no (T, T) rounding of P or dS), so one kernel text serves every dtype. Fragment layout of m16n8k16
(PTX ISA), groupID g = lane >> 2, threadID_in_group t = lane % 4, each "pair" two consecutive-k (A, B) or consecutive-column (C) values:
    A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
    B (16x8, "col"):      b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
    C (16x8, float32):    c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]
Shared-memory operands reach the fragments by `ldmatrix.x4` (.trans where the tile is stored k-major),
two 8-column B tiles per instruction (16-bit types; float32 loads scalars). Rows of shared tiles are
padded by 8 elements: 16-byte aligned for ldmatrix and free of bank conflicts at D = 32, 64, 128.
The device-only primitives (PTX mma, ldmatrix and conversions, 16-byte copies) are `PRIMITIVES`; the rest
(`TILES` and the kernels) use nothing else, so tests/test_flash_on_cpu.py runs them on the CPU with host
versions of those primitives (tests/cuda_emulation.py's FRAGMENT_HOST).
"""

# device-only primitives; tests/cuda_emulation.py's FRAGMENT_HOST defines the same names on the host
PRIMITIVES = r"""
__device__ __forceinline__ float bf16_to_f32(unsigned short x) { return __uint_as_float((unsigned)x << 16); }
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned short r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
__device__ __forceinline__ float f16_to_f32(unsigned short x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r; }
// c += a b for one m16n8k16 tile, float32 accumulation (fragment layouts in the module docstring)
__device__ __forceinline__ void mma_bf16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float c[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// four 8x8 b16 matrices from shared memory (ldmatrix): lanes 8i .. 8i+7 give the row addresses of
// matrix i (16-byte aligned); lane l receives in r[i] matrix i's row l/4, columns 2(l%4), 2(l%4)+1
// (.trans: rows 2(l%4), 2(l%4)+1 of column l/4), the lower column (row) in the low half
// (the intrinsic, not an asm cvta: the compiler folds a constant offset of p into the 32-bit address, so an
// unrolled loop's ldmatrix calls share one address register with immediate offsets)
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
// 16 bytes global -> shared without registers (cp.async; zero-filled when !valid, src then unread);
// copies issued since the last commit form a group; wait<n> returns once at most n groups are pending
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int n>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(n) : "memory"); }
__device__ __forceinline__ void copy16(void* dst, const void* src) { *(uint4*)dst = *(const uint4*)src; }
__device__ __forceinline__ void zero16(void* dst) { *(uint4*)dst = make_uint4(0u, 0u, 0u, 0u); }
// float32 vector reductions into global memory (sm_90): p[0] += a, p[1] += b (8-byte aligned), and the
// same for four floats (16-byte aligned); each element atomic, as atomicAdd, one instruction per vector
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" :: "l"(p), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" :: "l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
// 2^x by the MUFU unit (ex2.approx.ftz.f32: ~2 ulp; -inf gives 0, results below 2^-126 flush to 0)
__device__ __forceinline__ float fast_exp2(float x) { float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
// the block's dynamic shared memory (bytes as the launch gave them: dynamic_smem_size())
#define FA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ unsigned dynamic_smem_size() {
    unsigned r; asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r)); return r; }
"""

# the dtype traits, fragment and tile loads, and the masking rule shared by every kernel
TILES = r"""
#define FA_NEG_INF __int_as_float(0xff800000)
#define FA_POS_INF __int_as_float(0x7f800000)
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_FULL 0xffffffffu
#define FA_PAD 8   // shared rows padded by 8 elements: 16-byte aligned rows, fewer bank conflicts

// float32 on the tensor cores: each value split into three bfloat16 parts, x = h + m + l (the two
// remainders are exact in float32, so h + m + l carries ~27 bits of x's 24), and the product
// accumulated from the six part products that matter (m*l, l*m, l*l fall below float32's epsilon)
__device__ __forceinline__ void split3(float x, unsigned& h, unsigned& m, unsigned& l) {
    const unsigned short hb = f32_to_bf16(x);
    const float r = x - bf16_to_f32(hb);
    const unsigned short mb = f32_to_bf16(r);
    h = hb; m = mb; l = f32_to_bf16(r - bf16_to_f32(mb));
}
__device__ __forceinline__ void split_pair(float2 p, unsigned& h, unsigned& m, unsigned& l) {
    unsigned h0, m0, l0, h1, m1, l1;
    split3(p.x, h0, m0, l0);
    split3(p.y, h1, m1, l1);
    h = h0 | (h1 << 16); m = m0 | (m1 << 16); l = l0 | (l1 << 16);
}
__device__ __forceinline__ void mma_f32_split(float c[4], const float2 a[4], const float2 b[2]) {
    unsigned ah[4], am[4], al[4], bh[2], bm[2], bl[2];
#pragma unroll
    for (int i = 0; i < 4; ++i) split_pair(a[i], ah[i], am[i], al[i]);
#pragma unroll
    for (int i = 0; i < 2; ++i) split_pair(b[i], bh[i], bm[i], bl[i]);
    mma_bf16(c, al, bh);   // smallest terms first
    mma_bf16(c, ah, bl);
    mma_bf16(c, am, bm);
    mma_bf16(c, am, bh);
    mma_bf16(c, ah, bm);
    mma_bf16(c, ah, bh);
}

// dtype traits: storage S, fragment pair P, conversions and the tile product
struct Fp32 {
    typedef float S; typedef float2 P;
    static constexpr bool CACHE = false;   // A fragments reloaded at each use (RowFrags)
    static constexpr bool FUSED_DQ = false;   // dQ by its own kernel (flash_bwd_dq)
    static __device__ __forceinline__ float tof(S x) { return x; }
    static __device__ __forceinline__ S fromf(float x) { return x; }
    static __device__ __forceinline__ P pair(S lo, S hi) { return make_float2(lo, hi); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return make_float2(lo, hi); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_f32_split(c, a, b); }
};
struct Fp16 {
    typedef unsigned short S; typedef unsigned P;
    static constexpr bool CACHE = true;
    static constexpr bool FUSED_DQ = true;    // dQ by atomics in the dK/dV kernel
    static __device__ __forceinline__ float tof(S x) { return f16_to_f32(x); }
    static __device__ __forceinline__ S fromf(float x) { return f32_to_f16(x); }
    static __device__ __forceinline__ P pair(S lo, S hi) { return (unsigned)lo | ((unsigned)hi << 16); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return pair(fromf(lo), fromf(hi)); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_f16(c, a, b); }
};
struct Bf16 {
    typedef unsigned short S; typedef unsigned P;
    static constexpr bool CACHE = true;
    static constexpr bool FUSED_DQ = true;    // dQ by atomics in the dK/dV kernel
    static __device__ __forceinline__ float tof(S x) { return bf16_to_f32(x); }
    static __device__ __forceinline__ S fromf(float x) { return f32_to_bf16(x); }
    static __device__ __forceinline__ P pair(S lo, S hi) { return (unsigned)lo | ((unsigned)hi << 16); }
    static __device__ __forceinline__ P pack(float lo, float hi) { return pair(fromf(lo), fromf(hi)); }
    static __device__ __forceinline__ void mma(float c[4], const P a[4], const P b[2]) { mma_bf16(c, a, b); }
};

// ---- fragment loads (m: element (0, 0) of the tile, ld: its row stride in elements)
// A[r][k] = m[r ld + k], rows r >= valid read as zero
template <class T>
__device__ __forceinline__ void load_a(typename T::P a[4], const typename T::S* m, int ld, int valid) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S z = 0;
    const typename T::S* r0 = m + (long long)g * ld + 2 * t;
    const typename T::S* r8 = m + (long long)(g + 8) * ld + 2 * t;
    const bool v0 = g < valid, v8 = g + 8 < valid;
    if constexpr (sizeof(typename T::S) == 2) {   // a pair is one aligned 32-bit word (rows 16-byte aligned)
        a[0] = v0 ? *(const unsigned*)r0 : 0u;
        a[1] = v8 ? *(const unsigned*)r8 : 0u;
        a[2] = v0 ? *(const unsigned*)(r0 + 8) : 0u;
        a[3] = v8 ? *(const unsigned*)(r8 + 8) : 0u;
    } else {
        a[0] = T::pair(v0 ? r0[0] : z, v0 ? r0[1] : z);
        a[1] = T::pair(v8 ? r8[0] : z, v8 ? r8[1] : z);
        a[2] = T::pair(v0 ? r0[8] : z, v0 ? r0[9] : z);
        a[3] = T::pair(v8 ? r8[8] : z, v8 ? r8[9] : z);
    }
}
// B[k][n] = m[n ld + k] (B = M^T: the keys of S = Q K^T)
template <class T>
__device__ __forceinline__ void load_b_nk(typename T::P b[2], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S* r = m + g * ld + 2 * t;
    b[0] = T::pair(r[0], r[1]);
    b[1] = T::pair(r[8], r[9]);
}
// B[k][n] = m[k ld + n] (the values of O = P V)
template <class T>
__device__ __forceinline__ void load_b_kn(typename T::P b[2], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const typename T::S* c = m + 2 * t * ld + g;
    b[0] = T::pair(c[0], c[ld]);
    b[1] = T::pair(c[8 * ld], c[9 * ld]);
}
// the B fragments of two adjacent 8-column tiles, b[0] for columns 0-7 and b[1] for 8-15: one
// ldmatrix.x4 for 16-bit types (matrix i -> b[i >> 1][i & 1]), scalar loads for float32
template <class T>
__device__ __forceinline__ void load_b_nk2(typename T::P b[2][2], const typename T::S* m, int ld) {
    if constexpr (sizeof(typename T::S) == 2) {
        const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
        unsigned x[4];
        ldsm_x4(x, m + ((i >> 1) * 8 + r) * ld + (i & 1) * 8);   // rows n, columns k: b = row-major 8x8
        b[0][0] = x[0]; b[0][1] = x[1]; b[1][0] = x[2]; b[1][1] = x[3];
    } else {
        load_b_nk<T>(b[0], m, ld);
        load_b_nk<T>(b[1], m + 8 * ld, ld);
    }
}
template <class T>
__device__ __forceinline__ void load_b_kn2(typename T::P b[2][2], const typename T::S* m, int ld) {
    if constexpr (sizeof(typename T::S) == 2) {
        const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
        unsigned x[4];
        ldsm_x4_trans(x, m + ((i & 1) * 8 + r) * ld + (i >> 1) * 8);   // rows k, columns n: transposed
        b[0][0] = x[0]; b[0][1] = x[1]; b[1][0] = x[2]; b[1][1] = x[3];
    } else {
        load_b_kn<T>(b[0], m, ld);
        load_b_kn<T>(b[1], m + 8, ld);
    }
}
// A[r][k] = m[r ld + k] from shared memory (16-bit types): one ldmatrix.x4, matrix i = rows 8 (i & 1) ..,
// columns 8 (i >> 1) .. -> a[i]
template <class T>
__device__ __forceinline__ void load_a_sm(typename T::P a[4], const typename T::S* m, int ld) {
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    ldsm_x4(a, m + ((i & 1) * 8 + r) * ld + (i >> 1) * 8);
}
// two float32 C tiles (columns 0-7 and 8-15) -> one A fragment of 16 columns, rounded to the dtype
template <class T>
__device__ __forceinline__ void c_to_a(typename T::P a[4], const float c0[4], const float c1[4]) {
    a[0] = T::pack(c0[0], c0[1]);
    a[1] = T::pack(c0[2], c0[3]);
    a[2] = T::pack(c1[0], c1[1]);
    a[3] = T::pack(c1[2], c1[3]);
}
// this warp's 16 rows of a (rows, D) matrix as A fragments, one per 16 columns: kept in registers
// (CACHE: 16-bit types by default), or reloaded at each use (float32, whose fragments take twice the
// registers; the dK/dV kernel's V at D = 128, where K, V and two accumulators would not fit)
template <class T, int D, bool CACHE = T::CACHE>
struct RowFrags {
    typename T::P f[CACHE ? D / 16 : 1][4];
    const typename T::S* base;
    int valid, ld;
    __device__ __forceinline__ void init(const typename T::S* b, int v, int ld_) {   // ld_: the row stride
        base = b; valid = v; ld = ld_;
        if constexpr (CACHE) {
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) load_a<T>(f[kc], b + kc * 16, ld_, v);
        }
    }
    __device__ __forceinline__ const typename T::P* get(int kc, typename T::P* tmp) const {
        if constexpr (CACHE) return f[kc];
        else { load_a<T>(tmp, base + kc * 16, ld, valid); return tmp; }
    }
};
// a row of C lives in the 4 lanes of a group
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(FA_FULL, x, 1));
    return fmaxf(x, __shfl_xor_sync(FA_FULL, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(FA_FULL, x, 1);
    return x + __shfl_xor_sync(FA_FULL, x, 2);
}
// rows row0 .. row0 + ROWS - 1 of an (nrows, D) matrix of row stride ld into shared memory, zero past nrows
template <class T, int D, int ROWS>
__device__ __forceinline__ void load_tile(typename T::S (*dst)[D + FA_PAD], const typename T::S* src, int row0,
                                          int nrows, int ld) {
    constexpr int V = 16 / sizeof(typename T::S), PER_ROW = D / V;
    for (int i = threadIdx.x; i < ROWS * PER_ROW; i += blockDim.x) {
        const int r = i / PER_ROW, c = (i % PER_ROW) * V;
        if (row0 + r < nrows) copy16(&dst[r][c], src + (long long)(row0 + r) * ld + c);
        else zero16(&dst[r][c]);
    }
}
// load_tile by cp.async (the caller commits and waits), by a block of THREADS threads: each thread copies
// the same 16-byte column of every (THREADS / PER_ROW)-th row, an unrolled loop of compile-time length (a
// per-iteration tile load costs a few instructions per copy); rows past nrows zero-filled from row 0's address
template <class T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(typename T::S (*dst)[D + FA_PAD], const typename T::S* src,
                                                int row0, int nrows, int ld) {
    constexpr int V = 16 / sizeof(typename T::S), PER_ROW = D / V, STEP = THREADS / PER_ROW;
    static_assert(THREADS % PER_ROW == 0, "load_tile_async: a thread's column must not change between rows");
    const int c = (threadIdx.x % PER_ROW) * V;
#pragma unroll
    for (int r = threadIdx.x / PER_ROW, k = 0; k < (ROWS + STEP - 1) / STEP; ++k, r += STEP) {
        if (ROWS % STEP != 0 && r >= ROWS) break;
        const bool in = row0 + r < nrows;
        cp_async16(&dst[r][c], src + (long long)(in ? row0 + r : 0) * ld + c, in);
    }
}
// the dK/dV kernel's query tile at row0 (THREADS threads): Q and dO by cp.async (the caller commits and
// waits), L (times log2(e); +inf past Tq: P = 0) and Delta by plain stores
template <class T, int D, int N, int THREADS>
__device__ __forceinline__ void load_query_tile(typename T::S (*sq)[D + FA_PAD], typename T::S (*sg)[D + FA_PAD],
        float* sl, float* sd, const typename T::S* q, const typename T::S* go, const float* lse, const float* delta,
        int row0, int Tq, int qld, int gld) {
    load_tile_async<T, D, N, THREADS>(sq, q, row0, Tq, qld);
    load_tile_async<T, D, N, THREADS>(sg, go, row0, Tq, gld);
#pragma unroll
    for (int i = threadIdx.x, k = 0; k < (N + THREADS - 1) / THREADS; ++k, i += THREADS) {
        if (i >= N) break;
        const bool in = row0 + i < Tq;
        sl[i] = in ? lse[row0 + i] * FA_LOG2E : FA_POS_INF;
        sd[i] = in ? delta[row0 + i] : 0.f;
    }
}
// Operands are (B, H, T, D) views of any batch, head and row strides (D contiguous, in elements), e.g. the
// heads inside the fused (B, T, 3C) qkv buffer, read and written where they lie. Head bh = b H + h starts at
// b sb + h sh. The strides come in groups: Q (q), K (k and v), O (O and dO), dQ, dKV (dK and dV).
__device__ __forceinline__ long long fa_head(int bh, int H, long long sb, long long sh) {
    return (long long)(bh / H) * sb + (long long)(bh % H) * sh;
}
#define FA_IN_STRIDES long long qsb, long long qsh, int qst, long long ksb, long long ksh, int kst, \
                      long long osb, long long osh, int ost
// may query i (of Tq) see key j (of Tk)?  causal: j <= i + Tk - Tq;  mask: (B, Tk), True = attend
__device__ __forceinline__ bool fa_allowed(int i, int j, int Tk, int off, int causal, const unsigned char* mrow) {
    return j < Tk && (!causal || j <= i + off) && (mrow == nullptr || mrow[j]);
}
"""
