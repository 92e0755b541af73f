// moegraph CUDA kernels: shared device helpers (NVRTC, no system headers).
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef long long i64;
#define INT_MIN_ (-2147483647 - 1)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float bf2f(u16 h) { return __int_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {   // ggml_compute_fp32_to_bf16
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (u16)((u >> 16) | 64);
    return (u16)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}
__device__ __forceinline__ float rnd_f16(float f) { return h2f(f2h(f)); }
// Block fields are read with the widest load their alignment allows: every GGML block size is
// even, so 16-bit fields are 2-aligned; blocks whose size is a multiple of 4 (Q4_1, Q5_1, Q4_K,
// Q5_K, Q8_1, Q8_K; their rows too) keep 32-bit words 4-aligned (buffers and rows start 64-aligned).
__device__ __forceinline__ float ldh(const u8* p) { return h2f(*(const u16*)p); }
__device__ __forceinline__ void sth(u8* p, u16 h) { *(u16*)p = h; }
__device__ __forceinline__ int ld4(const u8* p) { return *(const int*)p; }          // 4-aligned
__device__ __forceinline__ int ld4h(const u8* p) {                                  // 2-aligned
    const u16* q = (const u16*)p; return (int)((unsigned)q[0] | ((unsigned)q[1] << 16));
}
__device__ __forceinline__ float ldf(const u8* p) { return *(const float*)p; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// block-wide reductions (blockDim.x a multiple of 32, <= 1024); every thread gets the result
__device__ double block_sum_d(double v) {
    __shared__ double red[32];
    v = warp_sum_d(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) red[w] = v;
    __syncthreads();
    double t = l < nw ? red[l] : 0.0;
    return warp_sum_d(t);
}
__device__ float block_max(float v) {
    __shared__ float redm[32];
    v = warp_max(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) redm[w] = v;
    __syncthreads();
    float t = l < nw ? redm[l] : NEG_INF;
    return warp_max(t);
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return (float)(1.0 / (1.0 + exp(-(double)x))); }
__device__ __forceinline__ float gelu_f(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// ------------------------------------------------------------------ activation quantization
// Q8_0 / Q8_1 as ggml-cpu x86 AVX2: id = 127/amax, round half to even, d = fp16(amax/127),
// Q8_1's s = fp16(d_f32 * sum q). One 32-block per call.
__device__ void quant_q8_0_block(const float* v, u8* dst, bool q81) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int sum = 0;
    i8* qs = (i8*)(dst + (q81 ? 4 : 2));
    for (int i = 0; i < 32; i++) {
        float r = rintf(v[i] * id);
        int q = fabsf(r) < 2147483648.0f ? (int)r : INT_MIN_;
        sum += q;
        qs[i] = (i8)max(-128, min(127, q));
    }
    sth(dst, f2h(d));
    if (q81) sth(dst + 2, f2h(d * (float)sum));
}
// Q8_K as quantize_row_q8_K_ref: iscale = -127/max (max = first largest |x|, sign kept),
// nearest_int by the 1.5*2^23 trick, q = min(127, q), d = 1/iscale, int16 bsums of 16.
__device__ void quant_q8_k_block(const float* v, u8* dst) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < 256; i++) { float ax = fabsf(v[i]); if (ax > amax) { amax = ax; mx = v[i]; } }
    i8* qs = (i8*)(dst + 4);
    if (amax == 0.0f) {
        for (int i = 0; i < 292; i++) dst[i] = 0;
        return;
    }
    float iscale = -127.0f / mx;
    for (int i = 0; i < 256; i++) {
        float t = __fadd_rn(__fmul_rn(v[i], iscale), 12582912.0f);
        int q = (__float_as_int(t) & 0x007FFFFF) - 0x00400000;
        qs[i] = (i8)min(q, 127);
    }
    for (int j = 0; j < 16; j++) {
        int s = 0;
        for (int i = 0; i < 16; i++) s += qs[16 * j + i];
        short ss = (short)s;
        dst[260 + 2 * j] = (u8)ss; dst[261 + 2 * j] = (u8)(((unsigned short)ss) >> 8);
    }
    float d = 1.0f / iscale;
    int db = __float_as_int(d);
    dst[0] = (u8)db; dst[1] = (u8)(db >> 8); dst[2] = (u8)(db >> 16); dst[3] = (u8)(db >> 24);
}

// ------------------------------------------------------------------ block field helpers
__device__ __forceinline__ int sum4(int a) { return __dp4a(0x01010101, a, 0); }
__device__ __forceinline__ int q5_bits(int qh, int first) {   // 4 high bits -> bit 4 of 4 bytes
    int r = 0;
    for (int b = 0; b < 4; b++) r |= ((qh >> (first + b)) & 1) << (8 * b + 4);
    return r;
}
__device__ __forceinline__ void scale_min_k4(const u8* s, int j, int* sc, int* mn) {
    if (j < 4) { *sc = s[j] & 63; *mn = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}
__device__ __forceinline__ short ldi16(const u8* p) { return *(const short*)p; }
__device__ __forceinline__ int ld4b(const u8* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (p[3] << 24); }   // 1-aligned
// MXFP4: GGML_E8M0_TO_FP32_HALF, and 4 nibbles (one per byte) -> 4 int8 of the doubled E2M1 table
// (0 1 2 3 4 6 8 12, negated where bit 3 is set)
__device__ __forceinline__ float e8m0_half(u8 e) { return __uint_as_float(e < 2 ? 0x00200000u << e : (unsigned)(e - 1) << 23); }
__device__ __forceinline__ int mxfp4_word(int v) {
    const int m = v & 0x07070707;
    const int sel = (m & 0xF) | ((m >> 4) & 0xF0) | ((m >> 8) & 0xF00) | ((m >> 12) & 0xF000);
    const int mag = __byte_perm(0x03020100, 0x0C080604, sel);
    const int neg = ((v >> 3) & 0x01010101) * 0xFF;
    return (__vsub4(0, mag) & neg) | (mag & ~neg);
}
__device__ __forceinline__ int mxfp4_value(int n) { return (int)(signed char)(mxfp4_word(n) & 0xFF); }

// ------------------------------------------------------------------ dequantize element i of a row
__device__ float deq_Q8_0(const u8* r, long long i) { const u8* b = r + 34 * (i >> 5); return __fmul_rn((float)(i8)b[2 + (i & 31)], ldh(b)); }
__device__ float deq_Q4_0(const u8* r, long long i) {
    const u8* b = r + 18 * (i >> 5); int l = i & 31;
    int q = (l < 16 ? b[2 + l] & 15 : b[2 + l - 16] >> 4) - 8;
    return __fmul_rn(ldh(b), (float)q);
}
__device__ float deq_MXFP4(const u8* r, long long i) {
    const u8* b = r + 17 * (i >> 5); int l = i & 31;
    int n = l < 16 ? b[1 + l] & 15 : b[1 + l - 16] >> 4;
    return __fmul_rn((float)mxfp4_value(n), e8m0_half(b[0]));
}
__device__ float deq_Q4_1(const u8* r, long long i) {
    const u8* b = r + 20 * (i >> 5); int l = i & 31;
    int q = l < 16 ? b[4 + l] & 15 : b[4 + l - 16] >> 4;
    return __fadd_rn(__fmul_rn(ldh(b), (float)q), ldh(b + 2));
}
__device__ int q5_of(const u8* qh, const u8* qs, int l) {
    int q = l < 16 ? qs[l] & 15 : qs[l - 16] >> 4;
    return q | (((ld4h(qh) >> l) & 1) << 4);
}
__device__ float deq_Q5_0(const u8* r, long long i) {
    const u8* b = r + 22 * (i >> 5);
    return __fmul_rn(ldh(b), (float)(q5_of(b + 2, b + 6, i & 31) - 16));
}
__device__ float deq_Q5_1(const u8* r, long long i) {
    const u8* b = r + 24 * (i >> 5);
    return __fadd_rn(__fmul_rn(ldh(b), (float)q5_of(b + 4, b + 8, i & 31)), ldh(b + 2));
}
__device__ float deq_k4(const u8* b, int e, const u8* qs, const u8* qh) {
    int j = e >> 5, l = e & 31, sc, mn;
    scale_min_k4(b + 4, j, &sc, &mn);
    int q = (qs[32 * (j >> 1) + l] >> (4 * (j & 1))) & 15;
    if (qh) q |= ((qh[l] >> j) & 1) << 4;
    return __fsub_rn(__fmul_rn(__fmul_rn(ldh(b), (float)sc), (float)q), __fmul_rn(ldh(b + 2), (float)mn));
}
__device__ float deq_Q4_K(const u8* r, long long i) { const u8* b = r + 144 * (i >> 8); return deq_k4(b, i & 255, b + 16, (const u8*)0); }
__device__ float deq_Q5_K(const u8* r, long long i) { const u8* b = r + 176 * (i >> 8); return deq_k4(b, i & 255, b + 48, b + 16); }
__device__ float deq_Q6_K(const u8* r, long long i) {
    const u8* b = r + 210 * (i >> 8); int e = i & 255;
    int n = e >> 7, k = (e >> 5) & 3, l = e & 31;
    int lo = (b[64 * n + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
    int hi = (b[128 + 32 * n + l] >> (2 * k)) & 3;
    int q = (lo | (hi << 4)) - 32;
    return __fmul_rn(__fmul_rn(ldh(b + 208), (float)(i8)b[192 + (e >> 4)]), (float)q);
}

// ------------------------------------------------------------------ tiled products (tensor cores)
// A 32-value chunk of a weight row as signed int8 (8 words) with its float scale(s) dw and a
// min term mw: chunk . y = dw * dy * isum + mw * ys, with (dy, ys) from the activation chunk.
// Q6_K has a scale per 16 values: dw for the first half, dw2 for the second.
struct WChunk { int q[8]; float dw, dw2, mw; };
struct YChunk { int q[8]; float dy, ys; };

__device__ __forceinline__ void wchunk_Q8_0(const u8* w, int c, WChunk& o) {
    const u8* x = w + 34 * c;
    for (int i = 0; i < 8; i++) o.q[i] = ld4h(x + 2 + 4 * i);
    o.dw = ldh(x); o.mw = 0.0f;
}
__device__ __forceinline__ void wchunk_Q4_0(const u8* w, int c, WChunk& o) {
    const u8* x = w + 18 * c;
    for (int i = 0; i < 4; i++) {
        int v = ld4h(x + 2 + 4 * i);
        o.q[i] = __vsub4(v & 0x0F0F0F0F, 0x08080808); o.q[i + 4] = __vsub4((v >> 4) & 0x0F0F0F0F, 0x08080808);
    }
    o.dw = ldh(x); o.mw = 0.0f;
}
__device__ __forceinline__ void wchunk_MXFP4(const u8* w, int c, WChunk& o) {
    const u8* x = w + 17 * c;
    for (int i = 0; i < 4; i++) {
        int v = ld4b(x + 1 + 4 * i);
        o.q[i] = mxfp4_word(v & 0x0F0F0F0F); o.q[i + 4] = mxfp4_word((v >> 4) & 0x0F0F0F0F);
    }
    o.dw = e8m0_half(x[0]); o.mw = 0.0f;
}
__device__ __forceinline__ void wchunk_Q4_1(const u8* w, int c, WChunk& o) {
    const u8* x = w + 20 * c;
    for (int i = 0; i < 4; i++) { int v = ld4(x + 4 + 4 * i); o.q[i] = v & 0x0F0F0F0F; o.q[i + 4] = (v >> 4) & 0x0F0F0F0F; }
    o.dw = ldh(x); o.mw = ldh(x + 2);
}
__device__ __forceinline__ void wchunk_Q5_0(const u8* w, int c, WChunk& o) {
    const u8* x = w + 22 * c;
    int qh = ld4h(x + 2);
    for (int i = 0; i < 4; i++) {
        int v = ld4h(x + 6 + 4 * i);
        o.q[i] = __vsub4((v & 0x0F0F0F0F) | q5_bits(qh, 4 * i), 0x10101010);
        o.q[i + 4] = __vsub4(((v >> 4) & 0x0F0F0F0F) | q5_bits(qh, 16 + 4 * i), 0x10101010);
    }
    o.dw = ldh(x); o.mw = 0.0f;
}
__device__ __forceinline__ void wchunk_Q5_1(const u8* w, int c, WChunk& o) {
    const u8* x = w + 24 * c;
    int qh = ld4(x + 4);
    for (int i = 0; i < 4; i++) {
        int v = ld4(x + 8 + 4 * i);
        o.q[i] = (v & 0x0F0F0F0F) | q5_bits(qh, 4 * i); o.q[i + 4] = ((v >> 4) & 0x0F0F0F0F) | q5_bits(qh, 16 + 4 * i);
    }
    o.dw = ldh(x); o.mw = ldh(x + 2);
}
__device__ __forceinline__ void wchunk_k4(const u8* x, int j, const u8* qs, const u8* qh, WChunk& o) {
    int sc, mn;
    scale_min_k4(x + 4, j, &sc, &mn);
    const u8* q = qs + 32 * (j / 2);
    int shift = 4 * (j & 1);
    for (int i = 0; i < 8; i++) {
        int v = (ld4(q + 4 * i) >> shift) & 0x0F0F0F0F;
        if (qh) v |= ((ld4(qh + 4 * i) >> j) & 0x01010101) << 4;
        o.q[i] = v;
    }
    o.dw = ldh(x) * (float)sc; o.mw = -(ldh(x + 2) * (float)mn);
}
__device__ __forceinline__ void wchunk_Q4_K(const u8* w, int c, WChunk& o) {
    const u8* x = w + 144 * (c >> 3); wchunk_k4(x, c & 7, x + 16, (const u8*)0, o);
}
__device__ __forceinline__ void wchunk_Q5_K(const u8* w, int c, WChunk& o) {
    const u8* x = w + 176 * (c >> 3); wchunk_k4(x, c & 7, x + 48, x + 16, o);
}
__device__ __forceinline__ void wchunk_Q6_K(const u8* w, int c, WChunk& o) {
    const u8* x = w + 210 * (c >> 3);
    int j = c & 7, n = j >> 2, k = j & 3;
    const u8* ql = x + 64 * n + 32 * (k & 1);
    const u8* qh = x + 128 + 32 * n;
    for (int i = 0; i < 8; i++) {
        int lo = (ld4h(ql + 4 * i) >> (4 * (k >> 1))) & 0x0F0F0F0F;
        int hi = ((ld4h(qh + 4 * i) >> (2 * k)) & 0x03030303) << 4;
        o.q[i] = __vsub4(lo | hi, 0x20202020);
    }
    const i8* sc = (const i8*)(x + 192);
    float d = ldh(x + 208);
    o.dw = d * (float)sc[2 * j]; o.dw2 = d * (float)sc[2 * j + 1]; o.mw = 0.0f;
}
__device__ __forceinline__ void ychunk_Q8_0(const u8* a, int c, YChunk& o) {
    const u8* y = a + 34 * c;
    for (int i = 0; i < 8; i++) o.q[i] = ld4h(y + 2 + 4 * i);
    o.dy = ldh(y); o.ys = 0.0f;
}
__device__ __forceinline__ void ychunk_Q8_1(const u8* a, int c, YChunk& o) {
    const u8* y = a + 36 * c;
    for (int i = 0; i < 8; i++) o.q[i] = ld4(y + 4 + 4 * i);
    o.dy = ldh(y); o.ys = ldh(y + 2);
}
__device__ __forceinline__ void ychunk_Q8_K(const u8* a, int c, YChunk& o) {
    const u8* y = a + 292 * (c >> 3); int j = c & 7;
    for (int i = 0; i < 8; i++) o.q[i] = ld4(y + 4 + 32 * j + 4 * i);
    o.dy = ldf(y); o.ys = o.dy * (float)(ldi16(y + 260 + 4 * j) + ldi16(y + 262 + 4 * j));
}

// D += A(16x32, s8, row) * B(32x8, s8, col): sm_80+ integer tensor-core product
__device__ __forceinline__ void mma_s8(int* d, int a0, int a1, int a2, int a3, int b0, int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

// ------------------------------------------------------------------ coalesced row dots (few tokens)
// One warp per weight row: consecutive lanes read consecutive 32-bit words of the row's blocks
// (and of the activation row), so each warp load is a few full cache sectors. Returns this lane's
// share; the caller warp-sums it. Integer sums of a 32-block are combined across its lanes with
// shuffles before scaling, as ggml scales whole-block sums.
__device__ __forceinline__ int grp_sum(int v, int lanes) {   // sum over aligned groups of `lanes`
    for (int o = 1; o < lanes; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float rowdot_Q8_0(const u8* w, const u8* a, int nb, int lane) {
    float s = 0.0f; const int wd = lane & 7;
    for (int b0 = 0; b0 < nb; b0 += 4) {
        const int b = b0 + (lane >> 3); int is = 0;
        const u8* x = w + 34 * b; const u8* y = a + 34 * b;
        if (b < nb) is = __dp4a(ld4h(x + 2 + 4 * wd), ld4h(y + 2 + 4 * wd), 0);
        is = grp_sum(is, 8);
        if (b < nb && wd == 0) s += (float)is * (ldh(x) * ldh(y));
    }
    return s;
}
// 32-blocks of 16 nibble bytes: 8 blocks per step, 4 lanes a block, lane word wd holds values
// 4wd..4wd+3 (low nibbles) and 16+4wd.. (high nibbles)
#define ROWDOT_NIBBLES(NAME, WB, QS, YB, LD, HIGH, BODY_END)                                       \
__device__ __forceinline__ float rowdot_##NAME(const u8* w, const u8* a, int nb, int lane) {                      \
    float s = 0.0f; const int wd = lane & 3;                                                      \
    for (int b0 = 0; b0 < nb; b0 += 8) {                                                          \
        const int b = b0 + (lane >> 2); int is = 0, sa = 0;                                       \
        const u8* x = w + WB * b; const u8* y = a + YB * b;                                       \
        if (b < nb) {                                                                             \
            const int v = LD(x + QS + 4 * wd);                                                    \
            int lo = v & 0x0F0F0F0F, hi = (v >> 4) & 0x0F0F0F0F;                                  \
            HIGH                                                                                  \
            const int ya = ld4h(y + (YB - 32) + 4 * wd), yb = ld4h(y + (YB - 16) + 4 * wd);       \
            is = __dp4a(lo, ya, __dp4a(hi, yb, 0)); sa = sum4(ya) + sum4(yb);                      \
        }                                                                                         \
        is = grp_sum(is, 4); sa = grp_sum(sa, 4);                                                 \
        if (b < nb && wd == 0) { BODY_END }                                                       \
    }                                                                                             \
    return s;                                                                                     \
}
#define Q5_HIGH(OFF) { const int qh = ld4h(x + OFF); lo |= q5_bits(qh, 4 * wd); hi |= q5_bits(qh, 16 + 4 * wd); }
ROWDOT_NIBBLES(Q4_0, 18, 2, 34, ld4h, , s += (float)(is - 8 * sa) * (ldh(x) * ldh(y));)
// MXFP4's 17-byte blocks are byte-aligned: the words are loaded byte by byte
ROWDOT_NIBBLES(MXFP4, 17, 1, 34, ld4b, lo = mxfp4_word(lo); hi = mxfp4_word(hi);, s += (float)is * (e8m0_half(x[0]) * ldh(y));)
ROWDOT_NIBBLES(Q4_1, 20, 4, 36, ld4h, , s += (float)is * (ldh(x) * ldh(y)) + ldh(x + 2) * ldh(y + 2);)
ROWDOT_NIBBLES(Q5_0, 22, 6, 34, ld4h, Q5_HIGH(2), s += (float)(is - 16 * sa) * (ldh(x) * ldh(y));)
ROWDOT_NIBBLES(Q5_1, 24, 8, 36, ld4h, Q5_HIGH(4), s += (float)is * (ldh(x) * ldh(y)) + ldh(x + 2) * ldh(y + 2);)

// Q4_K / Q5_K: a super-block per step; lane l holds qs word l: sub-blocks j0 = 2(l/8) (low
// nibbles) and j0+1 (high), values 4(l%8)..+3. Mins use this lane's own activation sums.
__device__ __forceinline__ float rowdot_k4(const u8* w, const u8* a, int nsb, int lane, int bsz, int qs_off, int qh_off) {
    float s = 0.0f; const int j0 = 2 * (lane >> 3), p = 4 * (lane & 7);
    for (int b = 0; b < nsb; b++) {
        const u8* x = w + bsz * b; const u8* y = a + 292 * b;
        int sc0, mn0, sc1, mn1;
        scale_min_k4(x + 4, j0, &sc0, &mn0); scale_min_k4(x + 4, j0 + 1, &sc1, &mn1);
        const int v = ld4(x + qs_off + 4 * lane);
        int lo = v & 0x0F0F0F0F, hi = (v >> 4) & 0x0F0F0F0F;
        if (qh_off) { const int h = ld4(x + qh_off + p); lo |= ((h >> j0) & 0x01010101) << 4; hi |= ((h >> (j0 + 1)) & 0x01010101) << 4; }
        const int y0 = ld4(y + 4 + 32 * j0 + p), y1 = ld4(y + 36 + 32 * j0 + p);
        const int isum = sc0 * __dp4a(lo, y0, 0) + sc1 * __dp4a(hi, y1, 0);
        const int msum = mn0 * sum4(y0) + mn1 * sum4(y1);
        const float dy = ldf(y);
        s += (dy * ldh(x)) * (float)isum - (dy * ldh(x + 2)) * (float)msum;
    }
    return s;
}
__device__ __forceinline__ float rowdot_Q4_K(const u8* w, const u8* a, int nsb, int lane) { return rowdot_k4(w, a, nsb, lane, 144, 16, 0); }
__device__ __forceinline__ float rowdot_Q5_K(const u8* w, const u8* a, int nsb, int lane) { return rowdot_k4(w, a, nsb, lane, 176, 48, 16); }
// Q6_K: lane l holds ql word l: half n = l/16, byte r = 4(l%16): values of k = r/32 (low
// nibbles) and k+2 (high) at positions r%32..+3; 2 high bits each from qh.
__device__ __forceinline__ float rowdot_Q6_K(const u8* w, const u8* a, int nsb, int lane) {
    float s = 0.0f;
    const int n = lane >> 4, r = 4 * (lane & 15), k = r >> 5, pos = r & 31;
    for (int b = 0; b < nsb; b++) {
        const u8* x = w + 210 * b; const u8* y = a + 292 * b;
        const int v = ld4h(x + 64 * n + r), h = ld4h(x + 128 + 32 * n + pos);
        const int q0 = __vsub4((v & 0x0F0F0F0F) | (((h >> (2 * k)) & 0x03030303) << 4), 0x20202020);
        const int q1 = __vsub4(((v >> 4) & 0x0F0F0F0F) | (((h >> (2 * k + 4)) & 0x03030303) << 4), 0x20202020);
        const int e0 = 128 * n + 32 * k + pos, e1 = e0 + 64;
        const i8* sc = (const i8*)(x + 192);
        const int isum = sc[e0 >> 4] * __dp4a(q0, ld4(y + 4 + e0), 0) + sc[e1 >> 4] * __dp4a(q1, ld4(y + 4 + e1), 0);
        s += (ldf(y) * ldh(x + 208)) * (float)isum;
    }
    return s;
}
