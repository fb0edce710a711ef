/* The CPU path of the kernels: plain C99, built on first use by kernels/cpu.py.
 *
 * Every function works on a range of blocks (or elements) so that the caller can split
 * one tensor over threads; ranges handed to different threads never share a byte of
 * packed output, because blocks start on a byte (the caller checks).
 * Built with -ffp-contract=off (no fused multiply-add) and -fno-trapping-math (lets the
 * selects vectorize; results are unchanged), so the products and sums that the
 * torch twins compute element by element are bitwise the same here. Sums over a block
 * use 16 interleaved partial sums (vectorizable), so they differ from torch's in
 * rounding only.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define LANES 16
/* x times the caller's scale; a scale of 1 leaves x as it is (so -0.0 stays -0.0). */
#define SCALED(a) (scaled ? (a) * xscale : (a))

static float tree16(const float *a) {
    float b[8];
    for (int j = 0; j < 8; ++j) b[j] = a[j] + a[j + 8];
    for (int j = 0; j < 4; ++j) b[j] = b[j] + b[j + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

static inline float uniform_at(uint64_t i, uint32_t k0, uint32_t k1) {
    uint32_t h = mix32((uint32_t)i * 0x9E3779B9u + k0);
    h = mix32(h ^ k1);
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

/* Stores of data the step does not read again (the new residual and velocity: read at the next
 * step, after 100s of MB of other traffic): with AVX2 and a 32-byte aligned destination,
 * non-temporal stores, which skip reading each line before it is overwritten and leave the cache
 * to the data that is read again. The values stored are the same; a function that uses them ends
 * with fence_streams() so that other threads see them once it returns. */
static inline void fence_streams(void) {
#ifdef __AVX2__
    _mm_sfence();
#endif
}

/* dst[0, len) = src[0, len), bit for bit, by non-temporal stores where dst allows. */
static void stream_copy(float *dst, const float *src, int64_t len) {
    int64_t i = 0;
#ifdef __AVX2__
    if (((uintptr_t)dst & 31u) == 0)
        for (; i + 8 <= len; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < len; ++i) dst[i] = src[i];
}

static void sign_ef_blocks(const float *x, const float *e, float *r, float *scales, float *sq, uint8_t *packed,
                           int64_t n, int64_t block, float xscale, int64_t b0, int64_t b1);

/* v = xscale * x + e (e may be NULL; xscale == 1 reads x as it is); per block:
 * scale = sum|v| / len, sq = sum v^2; bit = v >= 0;
 * r (may be NULL, may alias x or e) = v - (bit ? scale : -scale). */
void lc_sign_ef(const float *x, const float *e, float *r, float *scales, float *sq, uint8_t *packed,
                int64_t n, int64_t block, float xscale, int64_t b0, int64_t b1) {
    sign_ef_blocks(x, e, r, scales, sq, packed, n, block, xscale, b0, b1);
    fence_streams();
}

static void sign_ef_blocks(const float *x, const float *e, float *r, float *scales, float *sq, uint8_t *packed,
                           int64_t n, int64_t block, float xscale, int64_t b0, int64_t b1) {
    const int scaled = xscale != 1.0f;
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        const float *xb = x + start;
        const float *eb = e ? e + start : 0;
        float acc[LANES] = {0}, acc2[LANES] = {0};
        int64_t i = 0;
#ifdef __AVX2__
        {
            /* The same 16 partial sums as the scalar loop, in two 8-lane registers. */
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
            const __m256 xs = _mm256_set1_ps(xscale);
            for (; i + LANES <= len; i += LANES) {
                __m256 v0 = _mm256_loadu_ps(xb + i), v1 = _mm256_loadu_ps(xb + i + 8);
                if (scaled) {
                    v0 = _mm256_mul_ps(v0, xs);
                    v1 = _mm256_mul_ps(v1, xs);
                }
                if (eb) {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(eb + i));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(eb + i + 8));
                }
                a0 = _mm256_add_ps(a0, _mm256_and_ps(v0, absmask));
                a1 = _mm256_add_ps(a1, _mm256_and_ps(v1, absmask));
                q0 = _mm256_add_ps(q0, _mm256_mul_ps(v0, v0));
                q1 = _mm256_add_ps(q1, _mm256_mul_ps(v1, v1));
            }
            _mm256_storeu_ps(acc, a0);
            _mm256_storeu_ps(acc + 8, a1);
            _mm256_storeu_ps(acc2, q0);
            _mm256_storeu_ps(acc2 + 8, q1);
        }
#endif
        if (eb) {
            for (; i + LANES <= len; i += LANES)
                for (int j = 0; j < LANES; ++j) {
                    float v = SCALED(xb[i + j]) + eb[i + j];
                    acc[j] += fabsf(v);
                    acc2[j] += v * v;
                }
        } else {
            for (; i + LANES <= len; i += LANES)
                for (int j = 0; j < LANES; ++j) {
                    float v = SCALED(xb[i + j]);
                    acc[j] += fabsf(v);
                    acc2[j] += v * v;
                }
        }
        for (int j = 0; i < len; ++i, ++j) {
            float v = eb ? SCALED(xb[i]) + eb[i] : SCALED(xb[i]);
            acc[j] += fabsf(v);
            acc2[j] += v * v;
        }
        const float s = tree16(acc) / (float)len;
        scales[b] = s;
        sq[b] = tree16(acc2);
        uint8_t *pb = packed + start / 8;
        float *rb = r ? r + start : 0;
        int64_t g = 0;
#ifdef __AVX2__
        const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s), zero = _mm256_setzero_ps();
        const __m256 xs8 = _mm256_set1_ps(xscale);
        const int stream = rb && ((uintptr_t)rb & 31u) == 0;
        for (; g + 8 <= len; g += 8) {
            __m256 v = _mm256_loadu_ps(xb + g);
            if (scaled) v = _mm256_mul_ps(v, xs8);
            if (eb) v = _mm256_add_ps(v, _mm256_loadu_ps(eb + g));
            const __m256 ge = _mm256_cmp_ps(v, zero, _CMP_GE_OQ); /* NaN: false */
            pb[g / 8] = (uint8_t)_mm256_movemask_ps(ge);
            if (rb) {
                const __m256 res = _mm256_sub_ps(v, _mm256_blendv_ps(neg, pos, ge));
                if (stream)
                    _mm256_stream_ps(rb + g, res); /* see stream_copy */
                else
                    _mm256_storeu_ps(rb + g, res);
            }
        }
#endif
        for (; g < len; g += 8) {
            const int64_t m = (len - g < 8) ? len - g : 8;
            unsigned byte = 0;
            for (int64_t j = 0; j < m; ++j) {
                float v = eb ? SCALED(xb[g + j]) + eb[g + j] : SCALED(xb[g + j]);
                unsigned bit = v >= 0.0f;
                byte |= bit << j;
                if (rb) rb[g + j] = v - (bit ? s : -s);
            }
            pb[g / 8] = (uint8_t)byte;
        }
    }
}

/* One block of a sign decode: ob[i] (+)= bit ? s : -s. With assign, the first payload is
 * written as 0 + value (the sum a zeroed buffer would hold, bit for bit) instead of added. */
static void sign_decode_block(float *ob, int64_t len, float s, const uint8_t *pb, int assign) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s), zero = _mm256_setzero_ps();
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; i + 8 <= len; i += 8) {
        const __m256i byte = _mm256_set1_epi32(pb[i >> 3]);
        const __m256 set = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit));
        const __m256 base = assign ? zero : _mm256_loadu_ps(ob + i);
        _mm256_storeu_ps(ob + i, _mm256_add_ps(base, _mm256_blendv_ps(neg, pos, set)));
    }
#endif
    for (; i < len; ++i) {
        unsigned bit = (pb[i >> 3] >> (i & 7)) & 1u;
        ob[i] = (assign ? 0.0f : ob[i]) + (bit ? s : -s);
    }
}

/* out (+)= sum_r (bit ? scale_r : -scale_r), payloads added one after the other; with
 * assign, out's old contents are ignored (as if it were zero). */
void lc_sign_decode_add(const float *const *scales, const uint8_t *const *packed, int64_t R, float *out,
                        int64_t n, int64_t block, int64_t assign, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        if (R == 0 && assign)
            for (int64_t i = 0; i < len; ++i) out[start + i] = 0.0f;
        for (int64_t r = 0; r < R; ++r)
            sign_decode_block(out + start, len, scales[r][b], packed[r] + start / 8, assign && r == 0);
    }
}

/* QSGD: see kernels/qsgd.py for the meaning. */
void lc_qsgd_encode(const float *x, float *norms, uint8_t *signs, uint8_t *codes, int64_t n, int64_t block,
                    int64_t bits, uint32_t k0, uint32_t k1, int64_t b0, int64_t b1) {
    const float levels = (float)((1 << bits) - 1);
    const int per_byte = (int)(8 / bits);
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        const float *xb = x + start;
        float pk[LANES] = {0};
        int nan_lane[LANES] = {0};
        int64_t p = 0;
        for (; p + LANES <= len; p += LANES)
            for (int j = 0; j < LANES; ++j) {
                float a = fabsf(xb[p + j]);
                pk[j] = a > pk[j] ? a : pk[j];
                nan_lane[j] |= a != a;
            }
        for (int j = 0; p < len; ++p, ++j) {
            float a = fabsf(xb[p]);
            pk[j] = a > pk[j] ? a : pk[j];
            nan_lane[j] |= a != a;
        }
        float peak = 0.0f;
        int has_nan = 0;
        for (int j = 0; j < LANES; ++j) {
            peak = pk[j] > peak ? pk[j] : peak; /* max is exact in any order */
            has_nan |= nan_lane[j];
        }
        if (has_nan) peak = NAN;
        const float psafe = peak > 0.0f ? peak : 1.0f;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= len; i += LANES)
            for (int j = 0; j < LANES; ++j) {
                float u = fabsf(xb[i + j]) / psafe;
                acc[j] += u * u;
            }
        for (int j = 0; i < len; ++i, ++j) {
            float u = fabsf(xb[i]) / psafe;
            acc[j] += u * u;
        }
        const float unorm = sqrtf(tree16(acc));
        norms[b] = unorm * peak;
        const float usafe = unorm > 0.0f ? unorm : 1.0f;
        uint8_t *sb = signs + start / 8;
        uint8_t *cb = codes + start * bits / 8;
        for (int64_t g = 0; g < len; g += 8) {
            const int64_t m = (len - g < 8) ? len - g : 8;
            unsigned byte = 0;
            for (int64_t j = 0; j < m; ++j) byte |= (unsigned)(xb[g + j] >= 0.0f) << j;
            sb[g / 8] = (uint8_t)byte;
        }
        /* Levels for up to 256 elements at a time (a vectorizable loop), then packed. */
        for (int64_t c0 = 0; c0 < len; c0 += 256) {
            const int64_t m = (len - c0 < 256) ? len - c0 : 256;
            int32_t lv[256];
            const uint32_t base = (uint32_t)(start + c0);
            for (int j = 0; j < (int)m; ++j) {
                uint32_t h = mix32((base + (uint32_t)j) * 0x9E3779B9u + k0);
                h = mix32(h ^ k1);
                const float u = (float)(int32_t)(h >> 8) * (1.0f / 16777216.0f); /* = uniform_at */
                float unit = fabsf(xb[c0 + j]) / psafe;
                float scaled = (unit / usafe) * levels;
                float f = floorf(scaled + u);
                f = (f >= 0.0f) ? f : 0.0f; /* NaN: 0 */
                f = (f > levels) ? levels : f;
                lv[j] = (int32_t)f;
            }
            for (int64_t g = 0; g < m; g += per_byte) {
                unsigned byte = 0;
                for (int j = 0; j < per_byte && g + j < m; ++j) byte |= (unsigned)lv[g + j] << (j * bits);
                cb[(c0 + g) / per_byte] = (uint8_t)byte;
            }
        }
    }
}

/* out += sum_r norm_r * sign * level / levels, payloads added one after the other. */
void lc_qsgd_decode_add(const float *const *norms, const uint8_t *const *signs, const uint8_t *const *codes,
                        int64_t R, float *out, int64_t n, int64_t block, int64_t bits, int64_t b0, int64_t b1) {
    const float levels = (float)((1 << bits) - 1);
    const unsigned mask = (1u << bits) - 1u;
    const int per_byte = (int)(8 / bits);
    const int shift = bits == 1 ? 3 : bits == 2 ? 2 : bits == 4 ? 1 : 0; /* log2(per_byte) */
    float lut[2][256]; /* the twin's (level * sign) / levels, for every sign and level */
    for (unsigned l = 0; l <= mask; ++l) {
        lut[0][l] = ((float)l * -1.0f) / levels;
        lut[1][l] = ((float)l * 1.0f) / levels;
    }
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        float *ob = out + start;
        for (int64_t r = 0; r < R; ++r) {
            const float nb = norms[r][b];
            const uint8_t *sb = signs[r] + start / 8;
            const uint8_t *cb = codes[r] + start * bits / 8;
            for (int64_t i = 0; i < len; ++i) {
                unsigned sign = (sb[i >> 3] >> (i & 7)) & 1u;
                unsigned level = (cb[i >> shift] >> ((i & (per_byte - 1)) * bits)) & mask;
                ob[i] += lut[sign][level] * nb;
            }
        }
    }
}

/* v = x + e over elements [i0, i1). */
void lc_add(const float *x, const float *e, float *v, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) v[i] = x[i] + e[i];
}

/* Over elements [i0, i1): the number of |v| >= t and the sum of v^2 (into *count, *sq);
 * with idx non-NULL, also write those indices in ascending order. */
void lc_select(const float *v, float t, int64_t i0, int64_t i1, int64_t *idx, int64_t *count, float *sq) {
    float acc[LANES] = {0};
    int64_t c = 0, i = i0;
    if (idx) {
#ifdef __AVX2__
        /* Eight at a time; most groups hold no candidate and cost one compare. */
        const __m256 tv = _mm256_set1_ps(t);
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (; i + 8 <= i1; i += 8) {
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(v + i), absmask);
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, tv, _CMP_GE_OQ)); /* NaN: no */
            while (m) {
                idx[c++] = i + __builtin_ctz(m);
                m &= m - 1;
            }
        }
#endif
        for (; i < i1; ++i)
            if (fabsf(v[i]) >= t) idx[c++] = i;
    } else {
        for (; i + LANES <= i1; i += LANES)
            for (int j = 0; j < LANES; ++j) {
                float a = v[i + j];
                acc[j] += a * a;
                c += fabsf(a) >= t;
            }
        for (int j = 0; i < i1; ++i, ++j) {
            acc[j] += v[i] * v[i];
            c += fabsf(v[i]) >= t;
        }
        if (sq) *sq = tree16(acc);
    }
    *count = c;
}

/* Two-pass server step, block by block while the block is in cache:
 * w = err_in + sum_r decode_r (into err_out), then encode w and leave w - C(w) in err_out. */
void lc_sign_server(const float *const *scales, const uint8_t *const *packed, int64_t R, const float *err_in,
                    float *err_out, float *scales_out, float *sq_out, uint8_t *packed_out, int64_t n, int64_t block,
                    int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * block;
        const int64_t len = (n - start < block) ? n - start : block;
        for (int64_t i = 0; i < len; ++i) err_out[start + i] = err_in[start + i];
        lc_sign_decode_add(scales, packed, R, err_out, n, block, 0, b, b + 1);
        sign_ef_blocks(err_out, 0, err_out, scales_out, sq_out, packed_out, n, block, 1.0f, b, b + 1);
    }
    fence_streams();
}

/* 1 if every element of x[i0, i1) is finite (exponent bits not all ones), else 0. */
int64_t lc_all_finite(const float *x, int64_t i0, int64_t i1) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        uint32_t any = 0;
        for (int j = 0; j < 16; ++j) any |= ((u[i + j] & 0x7F800000u) == 0x7F800000u);
        bad |= any;
        if (bad) return 0;
    }
    for (; i < i1; ++i) bad |= ((u[i] & 0x7F800000u) == 0x7F800000u);
    return bad ? 0 : 1;
}

/* ----- the optimizer's momentum, fused in front of the compressors ---------------------------
 * With a velocity, an op reads v = s + e instead of xscale * x + e, where (kernels/velocity.py)
 *   x' = x * xs (+ p * wds);  u = u_old ? u_old * m + x' * a1 : x' * a0  (written to u_out);
 *   s = (look ? u * m + x' * c : u) * post
 * computed exactly as lc_velocity computes it, so a fused op gives the bits of lc_velocity
 * followed by the op on s.
 */
typedef struct {
    float xs, wds, m, a0, a1, c, post;
    int64_t look;
} lc_vparams;

/* v[i] = s_i (+ e[i]) for i in [0, len), and u_out[i]; pointers already at the span's start. */
static void velocity_span(const float *x, const float *p, const float *u_old, float *u_out, const float *e, float *v,
                          int64_t len, const lc_vparams *vp) {
    const float xs = vp->xs, wds = vp->wds, m = vp->m, a0 = vp->a0, a1 = vp->a1, c = vp->c, post = vp->post;
    const int look = vp->look != 0;
    for (int64_t i = 0; i < len; ++i) {
        float xi = x[i] * xs;
        if (p) xi = xi + p[i] * wds;
        const float ui = u_old ? u_old[i] * m + xi * a1 : xi * a0;
        u_out[i] = ui;
        const float si = (look ? ui * m + xi * c : ui) * post;
        v[i] = e ? si + e[i] : si;
    }
}

/* ----- multi-tensor ops: one call for every tensor of a bucket ---------------------------
 * A tensor's payload starts at a byte offset of a wire buffer (a multiple of 8, so its
 * fp32 parts are aligned). Calls are split over threads by global block (sign), by chunk
 * (top-k pass) or by tensor (top-k selection and decode).
 */
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *x;   /* input, read as xscale * x */
    const float *e;   /* residual added to it, or NULL */
    float *r;         /* v - C(v) out, or NULL */
    uint8_t *payload; /* scales (fp32, one per block), then the sign bits */
    int64_t n, block, first_block;
} lc_sign_seg;

static int64_t seg_of(const int64_t *first, int64_t T, int64_t g, size_t stride) {
    /* The tensor holding global block g: binary search over first_block fields. */
    int64_t lo = 0, hi = T - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (*(const int64_t *)((const char *)first + mid * stride) <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The statistics of one encoded sign block, as the hook reads them: a block whose scale is not
 * finite (it holds inf/NaN, or sum |v| overflowed) gets sq = err = NaN; otherwise sq = sum v^2
 * saturated at FLT_MAX (its square may overflow where the values do not) and err =
 * max(sq - len * scale^2, 0) = ||v_b - C(v_b)||^2. */
static void saturate_block(float *sq, float *err, float scale, int64_t len) {
    if (!isfinite(scale)) {
        *sq = NAN;
        *err = NAN;
        return;
    }
    const float q = *sq < FLT_MAX ? *sq : FLT_MAX;
    const float e = q - (float)len * scale * scale;
    *sq = q;
    *err = e > 0.0f ? e : 0.0f;
}

/* Encode every tensor: v = xscale * x + e, as lc_sign_ef; per global block g, sq_out[g] and
 * err_out[g] as saturate_block gives them. */
void lc_sign_ef_multi(const lc_sign_seg *segs, int64_t T, float xscale, float *sq_out, float *err_out,
                      int64_t g0, int64_t g1) {
    if (g0 >= g1) return;
    int64_t t = seg_of(&segs[0].first_block, T, g0, sizeof(lc_sign_seg));
    for (int64_t g = g0; g < g1;) {
        while (t + 1 < T && segs[t + 1].first_block <= g) ++t;
        const lc_sign_seg *s = &segs[t];
        const int64_t nb = (s->n + s->block - 1) / s->block;
        const int64_t b0 = g - s->first_block;
        const int64_t b1 = (nb < b0 + (g1 - g)) ? nb : b0 + (g1 - g);
        float *scales = (float *)s->payload;
        sign_ef_blocks(s->x, s->e, s->r, scales, sq_out + s->first_block, s->payload + 4 * nb, s->n, s->block, xscale,
                       b0, b1);
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t len = (s->n - b * s->block < s->block) ? s->n - b * s->block : s->block;
            float *sq = sq_out + s->first_block + b;
            saturate_block(sq, err_out + s->first_block + b, scales[b], len);
        }
        g += b1 - b0;
    }
    fence_streams();
}

typedef struct {
    const float *x, *p, *u_old; /* gradient, weights (weight decay, or NULL), old velocity (or NULL) */
    float *u_out;               /* new velocity */
    const float *e;             /* residual, or NULL */
    float *r;                   /* v - C(v) out, or NULL */
    uint8_t *payload;
    int64_t n, block, first_block;
} lc_sign_vseg;

/* lc_sign_ef_multi on v = s + e with the velocity computed in the same pass (see lc_vparams). */
void lc_sign_ef_velocity_multi(const lc_sign_vseg *segs, int64_t T, const lc_vparams *vp, float *sq_out,
                               float *err_out, int64_t g0, int64_t g1) {
    if (g0 >= g1) return;
    int64_t t = seg_of(&segs[0].first_block, T, g0, sizeof(lc_sign_vseg));
    float stack[2 * 4096];
    float *tmp = stack;
    size_t have = 4096;
    for (int64_t g = g0; g < g1; ++g) {
        while (t + 1 < T && segs[t + 1].first_block <= g) ++t;
        const lc_sign_vseg *s = &segs[t];
        const int64_t nb = (s->n + s->block - 1) / s->block;
        const int64_t b = g - s->first_block, start = b * s->block;
        const int64_t len = (s->n - start < s->block) ? s->n - start : s->block;
        if ((size_t)len > have) {
            if (tmp != stack) free(tmp);
            tmp = (float *)malloc(sizeof(float) * 2 * (size_t)len);
            have = (size_t)len;
        }
        float *u = tmp + have; /* the new velocity, streamed out below */
        velocity_span(s->x + start, s->p ? s->p + start : 0, s->u_old ? s->u_old + start : 0, u,
                      s->e ? s->e + start : 0, tmp, len, vp);
        stream_copy(s->u_out + start, u, len);
        float *scales = (float *)s->payload;
        /* The block as a one-block tensor of its own: the same sums, bits and residual as lc_sign_ef on s + e. */
        sign_ef_blocks(tmp, 0, s->r ? s->r + start : 0, scales + b, sq_out + g, s->payload + 4 * nb + start / 8, len,
                       len, 1.0f, 0, 1);
        saturate_block(sq_out + g, err_out + g, scales[b], len);
    }
    if (tmp != stack) free(tmp);
    fence_streams();
}

typedef struct {
    float *out;
    int64_t n, block, first_block;
    int64_t offset; /* of the tensor's payload in every wire */
} lc_sign_dseg;

/* out (+)= sum_r decode(wires[r] + offset) for every tensor, over global blocks [g0, g1). */
void lc_sign_decode_multi(const lc_sign_dseg *segs, int64_t T, const uint8_t *const *wires, int64_t R,
                          int64_t assign, int64_t g0, int64_t g1) {
    if (g0 >= g1) return;
    int64_t t = seg_of(&segs[0].first_block, T, g0, sizeof(lc_sign_dseg));
    for (int64_t g = g0; g < g1; ++g) {
        while (t + 1 < T && segs[t + 1].first_block <= g) ++t;
        const lc_sign_dseg *s = &segs[t];
        const int64_t nb = (s->n + s->block - 1) / s->block;
        const int64_t b = g - s->first_block, start = b * s->block;
        const int64_t len = (s->n - start < s->block) ? s->n - start : s->block;
        for (int64_t r = 0; r < R; ++r) {
            const uint8_t *p = wires[r] + s->offset;
            float sc;
            memcpy(&sc, p + 4 * b, 4);
            sign_decode_block(s->out + start, len, sc, p + 4 * nb + start / 8, assign && r == 0);
        }
        if (R == 0 && assign)
            for (int64_t i = 0; i < len; ++i) s->out[start + i] = 0.0f;
    }
}

/* ----- top-k ------------------------------------------------------------------------------ */
typedef struct {
    const float *x, *e; /* v = xscale * x + e (e may be NULL) */
    float *r;           /* v with the kept entries zeroed, or NULL */
    int64_t n, k;
    int64_t sample_size, sample_rank; /* sample_size 0: every entry is a candidate */
    uint32_t k0, k1;                  /* the sample's random stream */
    float *values;                    /* payload: k fp32 values, then k int32 indices */
    int32_t *idx;
    float threshold, sq, kept_sq;     /* out */
    int64_t status;                   /* out: 0 done, 1 too few candidates (caller takes the exact path) */
    const float *p, *u_old;           /* with a velocity (see lc_vparams): weights (or NULL), old velocity */
    float *u_out;                     /* new velocity */
} lc_topk_job;

typedef struct {
    int64_t job, i0, i1;
    int64_t *cand; /* candidate indices, ascending; more than cap are counted, not written */
    float *cval;   /* and their values v */
    int64_t cap, count;
    float sq;
} lc_topk_chunk;

static inline float v_at(const lc_topk_job *j, float xscale, int scaled, int64_t i) {
    const float a = scaled ? j->x[i] * xscale : j->x[i];
    return j->e ? a + j->e[i] : a;
}

static void swapf(float *a, float *b) { float t = *a; *a = *b; *b = t; }

/* The value of rank m (1 = largest) of a[0..len), by quickselect (a is reordered). */
static float kth_largest(float *a, int64_t len, int64_t m) {
    int64_t lo = 0, hi = len - 1, want = m - 1;
    while (lo < hi) {
        const float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) ++i;
            while (a[j] < pivot) --j;
            if (i <= j) { swapf(&a[i], &a[j]); ++i; --j; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

/* The sampled threshold of jobs [j0, j1): a magnitude about sample_rank of sample_size
 * random entries reach (positions as kernels.topk.sample_threshold draws them). */
void lc_topk_threshold(lc_topk_job *jobs, float xscale, const lc_vparams *vp, int64_t j0, int64_t j1) {
    const int scaled = xscale != 1.0f;
    for (int64_t q = j0; q < j1; ++q) {
        lc_topk_job *j = &jobs[q];
        if (j->sample_size == 0) { j->threshold = 0.0f; continue; }
        float *a = (float *)malloc(sizeof(float) * j->sample_size);
        const float fn = (float)j->n;
        for (int64_t s = 0; s < j->sample_size; ++s) {
            int64_t p = (int64_t)(uniform_at((uint64_t)s, j->k0, j->k1) * fn);
            if (p > j->n - 1) p = j->n - 1;
            float v, u;
            if (vp)
                velocity_span(j->x + p, j->p ? j->p + p : 0, j->u_old ? j->u_old + p : 0, &u, j->e ? j->e + p : 0, &v,
                              1, vp);
            else
                v = v_at(j, xscale, scaled, p);
            a[s] = v == v ? fabsf(v) : 0.0f;
        }
        j->threshold = kth_largest(a, j->sample_size, j->sample_rank);
        free(a);
    }
}

/* The pass over one span: v_i = (xscale) x[i] (+ e[i]) for i in [0, len), written to r (if any),
 * summed into the 16 lane accumulators acc (v^2) and zero (v * 0), and compacted (index base + i)
 * when |v| >= t. Lanes follow i from the span start; a span that is not the chunk's last has a
 * length that is a multiple of LANES, so spans of a chunk sum exactly as one span would. */
static void topk_span(const float *x, const float *e, float *r, float xscale, int scaled, float t, int64_t len,
                      int64_t base, lc_topk_chunk *ch, int64_t *count, float *acc, float *zero) {
    int64_t cnt = *count, i = 0;
#ifdef __AVX2__
    {
        const __m256 xs = _mm256_set1_ps(xscale), tv = _mm256_set1_ps(t);
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        __m256 q0 = _mm256_loadu_ps(acc), q1 = _mm256_loadu_ps(acc + 8);
        __m256 z0 = _mm256_loadu_ps(zero), z1 = _mm256_loadu_ps(zero + 8), zz = _mm256_setzero_ps();
        for (; i + LANES <= len; i += LANES) {
            __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
            if (scaled) { v0 = _mm256_mul_ps(v0, xs); v1 = _mm256_mul_ps(v1, xs); }
            if (e) {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(e + i));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(e + i + 8));
            }
            if (r) { _mm256_storeu_ps(r + i, v0); _mm256_storeu_ps(r + i + 8, v1); }
            q0 = _mm256_add_ps(q0, _mm256_mul_ps(v0, v0));
            q1 = _mm256_add_ps(q1, _mm256_mul_ps(v1, v1));
            z0 = _mm256_add_ps(z0, _mm256_mul_ps(v0, zz));
            z1 = _mm256_add_ps(z1, _mm256_mul_ps(v1, zz));
            unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(v0, absmask), tv, _CMP_GE_OQ))
                       | ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(v1, absmask), tv, _CMP_GE_OQ)) << 8);
            if (m) {
                float lanes[LANES];
                _mm256_storeu_ps(lanes, v0);
                _mm256_storeu_ps(lanes + 8, v1);
                while (m) {
                    const int l = __builtin_ctz(m);
                    if (cnt < ch->cap) { ch->cand[cnt] = base + i + l; ch->cval[cnt] = lanes[l]; }
                    ++cnt;
                    m &= m - 1;
                }
            }
        }
        _mm256_storeu_ps(acc, q0);
        _mm256_storeu_ps(acc + 8, q1);
        _mm256_storeu_ps(zero, z0);
        _mm256_storeu_ps(zero + 8, z1);
    }
#endif
    for (; i < len; i += LANES)
        for (int l = 0; l < LANES && i + l < len; ++l) {
            const float a = scaled ? x[i + l] * xscale : x[i + l];
            const float v = e ? a + e[i + l] : a;
            if (r) r[i + l] = v;
            acc[l] += v * v;
            zero[l] += v * 0.0f;
            if (fabsf(v) >= t) {
                if (cnt < ch->cap) { ch->cand[cnt] = base + i + l; ch->cval[cnt] = v; }
                ++cnt;
            }
        }
    *count = cnt;
}

static void topk_close(lc_topk_chunk *ch, int64_t cnt, const float *acc, const float *zero) {
    ch->count = cnt;
    const float q = tree16(acc);
    /* NaN when a value is not finite; else saturated (a square may overflow where its value does not) */
    ch->sq = tree16(zero) != 0.0f ? NAN : (q < FLT_MAX ? q : FLT_MAX);
}

/* One pass over chunks [c0, c1): v into r, sum of v^2, and the indices of |v| >= threshold. */
void lc_topk_pass(const lc_topk_job *jobs, lc_topk_chunk *chunks, float xscale, const lc_vparams *vp, int64_t c0,
                  int64_t c1) {
    const int scaled = xscale != 1.0f;
    enum { TILE = 4096 }; /* a multiple of LANES: tiles of a chunk sum as the whole chunk does */
    float tile[TILE], utile[TILE];
    for (int64_t c = c0; c < c1; ++c) {
        lc_topk_chunk *ch = &chunks[c];
        const lc_topk_job *j = &jobs[ch->job];
        float acc[LANES] = {0}, zero[LANES] = {0};
        int64_t cnt = 0;
        if (!vp) {
            topk_span(j->x + ch->i0, j->e ? j->e + ch->i0 : 0, j->r ? j->r + ch->i0 : 0, xscale, scaled, j->threshold,
                      ch->i1 - ch->i0, ch->i0, ch, &cnt, acc, zero);
        } else {
            /* v = s + e tile by tile (into r when there is one: it becomes the residual), then the same pass on v. */
            for (int64_t i = ch->i0; i < ch->i1; i += TILE) {
                const int64_t len = (ch->i1 - i < TILE) ? ch->i1 - i : TILE;
                float *v = j->r ? j->r + i : tile;
                velocity_span(j->x + i, j->p ? j->p + i : 0, j->u_old ? j->u_old + i : 0, utile,
                              j->e ? j->e + i : 0, v, len, vp);
                stream_copy(j->u_out + i, utile, len);
                topk_span(v, 0, 0, 1.0f, 0, j->threshold, len, i, ch, &cnt, acc, zero);
            }
        }
        topk_close(ch, cnt, acc, zero);
    }
    fence_streams();
}

/* Keep the exact top-k of each job [j0, j1) among its chunks' candidates (chunks of a job are
 * consecutive and in index order): values and int32 indices in ascending index order, ties at
 * the k-th magnitude kept lowest index first; zero the kept entries of r. */
void lc_topk_finish(lc_topk_job *jobs, const lc_topk_chunk *chunks, int64_t nchunks, int64_t j0, int64_t j1) {
    int64_t c = 0;
    for (int64_t q = j0; q < j1; ++q) {
        lc_topk_job *j = &jobs[q];
        while (c < nchunks && chunks[c].job < q) ++c;
        int64_t c_end = c, total = 0, overflow = 0;
        float sq = 0.0f;
        for (; c_end < nchunks && chunks[c_end].job == q; ++c_end) {
            total += chunks[c_end].count;
            overflow |= chunks[c_end].count > chunks[c_end].cap;
            sq += chunks[c_end].sq; /* chunk order: a fixed sum for a fixed split */
        }
        j->sq = sq < FLT_MAX ? sq : (sq == sq ? FLT_MAX : sq);
        j->kept_sq = 0.0f;
        if (overflow || total < j->k) { j->status = 1; c = c_end; continue; }
        j->status = 0;
        float *mag = (float *)malloc(sizeof(float) * (total > 0 ? total : 1));
        int64_t m = 0;
        for (int64_t d = c; d < c_end; ++d)
            for (int64_t s = 0; s < chunks[d].count; ++s) mag[m++] = fabsf(chunks[d].cval[s]);
        const float kth = j->k ? kth_largest(mag, total, j->k) : INFINITY;
        int64_t greater = 0;
        for (int64_t s = 0; s < total; ++s) greater += mag[s] > kth;
        free(mag);
        int64_t ties = j->k - greater, out = 0;
        float kept = 0.0f;
        for (int64_t d = c; d < c_end && out < j->k; ++d)
            for (int64_t s = 0; s < chunks[d].count && out < j->k; ++s) {
                const int64_t i = chunks[d].cand[s];
                const float v = chunks[d].cval[s];
                const float a = fabsf(v);
                if (a > kth || (a == kth && ties > 0)) {
                    if (!(a > kth)) --ties;
                    j->values[out] = v;
                    j->idx[out] = (int32_t)i;
                    kept += v * v;
                    ++out;
                    if (j->r) j->r[i] = 0.0f;
                }
            }
        j->kept_sq = kept < FLT_MAX ? kept : FLT_MAX;
        c = c_end;
    }
}

typedef struct {
    float *out;
    int64_t n, k;
    int64_t offset; /* of the tensor's payload (k values, k int32 indices) in every wire */
} lc_sparse_dseg;

/* out (+)= sum_r scatter(wires[r] + offset) for tensors [t0, t1); returns the number of
 * out-of-range indices skipped (a corrupt payload), 0 normally. */
int64_t lc_sparse_decode_multi(const lc_sparse_dseg *segs, const uint8_t *const *wires, int64_t R, int64_t assign,
                               int64_t t0, int64_t t1) {
    int64_t bad = 0;
    for (int64_t t = t0; t < t1; ++t) {
        const lc_sparse_dseg *s = &segs[t];
        if (assign) memset(s->out, 0, sizeof(float) * (size_t)s->n);
        for (int64_t r = 0; r < R; ++r) {
            const uint8_t *p = wires[r] + s->offset;
            const float *val = (const float *)p;
            const int32_t *idx = (const int32_t *)(p + 4 * s->k);
            for (int64_t i = 0; i < s->k; ++i) {
                const int64_t at = idx[i];
                if (at < 0 || at >= s->n) { ++bad; continue; }
                s->out[at] += val[i];
            }
        }
    }
    return bad;
}

/* ----- momentum in the exchange --------------------------------------------------------------
 * Over [i0, i1), every product rounded before the sums it enters (see kernels/velocity.py):
 *   x = g * xs (+ p * wds);  u = first ? x * a0 : u_old * m + x * a1;  s = (look ? u * m + x * c : u) * post
 * g may be NULL-free only; p and u_old may be NULL (no weight decay; the first step).
 */
void lc_velocity(const float *g, const float *p, const float *u_old, float *u, float *s, float xs, float wds,
                 float m, float a0, float a1, float c, float post, int64_t look, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        float x = g[i] * xs;
        if (p) x = x + p[i] * wds;
        const float ui = u_old ? u_old[i] * m + x * a1 : x * a0;
        u[i] = ui;
        float si = look ? ui * m + x * c : ui;
        s[i] = si * post;
    }
}
