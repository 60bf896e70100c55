// Decode-attention partials straight from the packed RDKV buffers (see rdkv_hf/storage.py).
//
// One task = one head's kept tokens [t0, t1) (t0 a multiple of CHUNK_ALIGN, so every width's word
// boundaries line up with it). A task computes its logits from the packed K words with the scale
// folded into the query and the minimum into one bias per query row, takes its own softmax max and
// sum, and accumulates V with the scale folded into the probabilities and the minimum into one
// bias per query row. No dequantized K or V row is ever written. Tasks of one head are merged by
// log-sum-exp at the end. With a soft cap (Gemma 2) the logits are capped, softcap * tanh(x /
// softcap), bias included, before the softmax. K has D channels, V rows Dv elements (they differ in
// DeepSeek's multi-head latent attention).
//
// Threads: the caller works through the tasks itself while helper threads (a small persistent
// pool) take tasks from the same atomic counter. The caller never waits for a helper to wake up,
// only for tasks a helper has already taken, so a busy machine (helpers not scheduled) costs
// parallelism, not a stall at a barrier.
//
// Vectors are GCC vector extensions of the native width (16 lanes with AVX-512, else 8).
// Query rows are processed in blocks of up to 4 (template GB) so their accumulators stay in
// registers; widths are template parameters so shifts and masks are constants.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int64_t CHUNK_ALIGN = 480;  // lcm of 32 // b for b = 1..8: 32, 16, 10, 8, 6, 5, 4
#ifdef __AVX512F__
constexpr int L = 16;                  // float lanes of one native vector
#else
constexpr int L = 8;
#endif
constexpr int V_BLOCK = 128;           // V tokens per block (their words and probabilities stay in L1)

typedef float vf __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

enum { H_N, H_V0, H_V1, H_K0, H_K1, H_PERM, H_COLS };
enum { G_BITS, G_COUNT, G_LEN, G_WORDS, G_DATA, G_META, G_START, G_COLS };

inline float half_to_float(uint16_t h) {
#ifdef __FLT16_MANT_DIG__
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    float v;
    if (exp == 0) {
        v = (float)man * 5.9604644775390625e-08f;  // subnormal: man * 2^-24
        return sign ? -v : v;
    }
    uint32_t bits = sign | ((exp == 31 ? 255u : exp + 112u) << 23) | (man << 13);
    std::memcpy(&v, &bits, 4);
    return v;
#endif
}

inline void halves_to_floats(const uint16_t* h, float* f, int64_t n) {
    for (int64_t i = 0; i < n; ++i) f[i] = half_to_float(h[i]);
}

inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
}

// exp(x) for x <= 0 on a vector (Cody-Waite reduction, degree-6 polynomial); relative error ~2e-7.
inline vf exp_neg(vf x) {
    const vf lo = (vf){} - 87.0f;
    x = x < lo ? lo : x;
    const vf magic = (vf){} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = (vf){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &e, sizeof(vf));
    return p * scale;
}

inline float hmax(vf v) {
    float m = v[0];
    for (int l = 1; l < L; ++l) m = std::max(m, v[l]);
    return m;
}

inline float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < L; ++l) s += v[l];
    return s;
}

// max of x[0..n)
inline float row_max(const float* x, int64_t n) {
    vf m = (vf){} - 3.0e38f;
    int64_t t = 0;
    for (; t + L <= n; t += L) {
        vf v;
        std::memcpy(&v, x + t, sizeof(vf));
        m = v > m ? v : m;
    }
    float mx = hmax(m);
    for (; t < n; ++t) mx = std::max(mx, x[t]);
    return mx;
}

// x[t] <- exp(x[t] - mx) for t < n; returns the sum.
inline float exp_row(float* x, int64_t n, float mx) {
    vf sum = {};
    int64_t t = 0;
    for (; t + L <= n; t += L) {
        vf v;
        std::memcpy(&v, x + t, sizeof(vf));
        v = exp_neg(v - mx);
        std::memcpy(x + t, &v, sizeof(vf));
        sum += v;
    }
    if (t < n) {
        vf v = (vf){} - 87.0f;
        std::memcpy(&v, x + t, (n - t) * 4);
        v = exp_neg(v - mx);
        for (int64_t l = 0; t + l < n; ++l) {
            x[t + l] = v[l];
            sum[l] += v[l];
        }
    }
    return hsum(sum);
}

inline vu load_words(const int32_t* src, int64_t avail) {
    vu w = {};
    if (avail >= L) std::memcpy(&w, src, sizeof(w));
    else if (avail > 0) std::memcpy(&w, src, avail * 4);
    return w;
}

struct Buffers {
    const int64_t* heads;
    const int64_t* groups;
    const int32_t* words;
    const uint16_t* meta;
    const void* raw;
    int raw_kind;  // 0 float32, 1 float16, 2 bfloat16
    const void* perm;
    int perm_kind;  // 0 uint8, 1 int16
    int64_t D;      // K channels (the query's width)
    int64_t Dv;     // V elements (the output's width)
    float softcap;  // 0: no cap
};

inline float raw_at(const Buffers& b, int64_t i) {
    if (b.raw_kind == 0) return ((const float*)b.raw)[i];
    uint16_t h = ((const uint16_t*)b.raw)[i];
    return b.raw_kind == 1 ? half_to_float(h) : bf16_to_float(h);
}

inline int64_t channel(const Buffers& b, int64_t perm_off, int64_t c) {
    if (perm_off < 0) return c;
    return b.perm_kind == 0 ? ((const uint8_t*)b.perm)[perm_off + c] : ((const int16_t*)b.perm)[perm_off + c];
}

// K: logits[g][t] += sum_j qs[g][j] * code_j(t0 + t) for query rows g0..g0+GB of one packed group.
// Rows are channels, codes run along tokens. A tile is 2 vectors of words (one cache line) of
// every channel; channels go in blocks of K_BLOCK so the lines of a block stay in L1 while they
// are decoded K times (rows are often 4 KiB apart, which would thrash one L1 set).
constexpr int K_BLOCK = 8;

template <int BITS, int GB>
void k_packed(const int32_t* rows, int64_t row_words, int64_t count, const float* qs, int64_t ldq,
              int64_t t0, int64_t tn, float* logits, int64_t ld, float* A) {
    constexpr int K = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    constexpr int TW = 2 * L;  // words per tile
    const int64_t w0 = t0 / K, nw = (tn + K - 1) / K;
    for (int64_t wt = 0; wt < nw; wt += TW) {
        const int64_t avail = row_words - (w0 + wt);
        std::fill(A, A + GB * K * TW, 0.0f);
        for (int64_t j0 = 0; j0 < count; j0 += K_BLOCK) {
            const int64_t j1 = std::min<int64_t>(count, j0 + K_BLOCK);
            for (int i = 0; i < K; ++i) {
                vf acc[GB][2];
                for (int g = 0; g < GB; ++g) {
                    std::memcpy(&acc[g][0], A + (g * K + i) * TW, sizeof(vf));
                    std::memcpy(&acc[g][1], A + (g * K + i) * TW + L, sizeof(vf));
                }
                for (int64_t j = j0; j < j1; ++j) {
                    const int32_t* src = rows + j * row_words + w0 + wt;
                    if (i == 0) __builtin_prefetch(src + 2 * TW);
                    const vu wa = load_words(src, avail), wb = load_words(src + L, avail - L);
                    const vf ca = __builtin_convertvector((vi)((wa >> (uint32_t)(i * BITS)) & MASK), vf);
                    const vf cb = __builtin_convertvector((vi)((wb >> (uint32_t)(i * BITS)) & MASK), vf);
                    for (int g = 0; g < GB; ++g) {
                        const float a = qs[g * ldq + j];
                        acc[g][0] += a * ca;
                        acc[g][1] += a * cb;
                    }
                }
                for (int g = 0; g < GB; ++g) {
                    std::memcpy(A + (g * K + i) * TW, &acc[g][0], sizeof(vf));
                    std::memcpy(A + (g * K + i) * TW + L, &acc[g][1], sizeof(vf));
                }
            }
        }
        const int64_t tw = std::min<int64_t>(TW, nw - wt);
        for (int g = 0; g < GB; ++g) {
            float* lg = logits + g * ld + wt * K;
            const int64_t tmax = tn - wt * K;
            for (int w = 0; w < tw; ++w)
                for (int i = 0; i < K; ++i)
                    if (w * K + i < tmax) lg[w * K + i] += A[(g * K + i) * TW + w];
        }
    }
}

// V: out[g][d] += sum_t ps[g][t] * code_t(d) for query rows g0..g0+GB over n tokens of one packed
// group whose rows have W words with W | L or L | W. The rows are read as one stream of L-word
// vectors; lane l of vector v holds word (v * L + l) % W of token (v * L + l) / W.
template <int BITS, int GB>
void v_stream(const int32_t* rows, int64_t W, int64_t n, const float* ps, int64_t ldp, float* out, int64_t D,
              float* scratch) {
    constexpr int K = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    const int64_t PV = W >= L ? W / L : 1;  // vectors per period of the lane pattern
    const int64_t P = PV * L;
    float* A = scratch;                      // [GB][K][P] lane accumulators
    vf* psv = (vf*)(A + GB * K * P + L);     // [nvec][GB] probabilities laid out like the words
    psv = (vf*)(((uintptr_t)psv + 63) & ~(uintptr_t)63);
    std::fill(A, A + GB * K * P, 0.0f);
    vi lane_tok;  // for W < L: token offset of each lane within its vector
    for (int l = 0; l < L; ++l) lane_tok[l] = W < L ? l / W : 0;
    for (int64_t tb = 0; tb < n; tb += V_BLOCK) {
        const int64_t nt = std::min<int64_t>(V_BLOCK, n - tb);
        const int64_t nwords = nt * W, nvec = (nwords + L - 1) / L;
        const int32_t* src = rows + tb * W;
        // ps rows are zero past the last token, so lanes of missing tokens get 0.
        for (int64_t v = 0; v < nvec; ++v)
            for (int g = 0; g < GB; ++g) {
                const float* p = ps + g * ldp + tb;
                if (W < L) {
                    vf x;
                    std::memcpy(&x, p + v * (L / W), sizeof(vf));
                    psv[v * GB + g] = __builtin_shuffle(x, lane_tok);
                } else {
                    psv[v * GB + g] = (vf){} + p[v / PV];
                }
            }
        for (int i = 0; i < K; ++i) {
            for (int64_t pv = 0; pv < PV; ++pv) {
                vf acc[GB] = {};
                for (int64_t v = pv; v < nvec; v += PV) {
                    const vu w = load_words(src + v * L, nwords - v * L);
                    const vf c = __builtin_convertvector((vi)((w >> (uint32_t)(i * BITS)) & MASK), vf);
                    for (int g = 0; g < GB; ++g) acc[g] += psv[v * GB + g] * c;
                }
                for (int g = 0; g < GB; ++g) {
                    float* a = A + (g * K + i) * P + pv * L;
                    for (int l = 0; l < L; ++l) a[l] += acc[g][l];
                }
            }
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int i = 0; i < K; ++i)
            for (int64_t lane = 0; lane < P; ++lane) {
                const int64_t d = (lane % W) * K + i;
                if (d < D) out[g * D + d] += A[(g * K + i) * P + lane];
            }
}

// V for any row length: token by token.
template <int BITS>
void v_rows(const int32_t* rows, int64_t W, int64_t n, const float* ps, int64_t ldp, int64_t G, float* out,
            int64_t D) {
    constexpr int K = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    for (int64_t t = 0; t < n; ++t)
        for (int64_t w = 0; w < W; ++w) {
            const uint32_t word = (uint32_t)rows[t * W + w];
            for (int i = 0; i < K && w * K + i < D; ++i) {
                const float c = (float)((word >> (i * BITS)) & MASK);
                for (int64_t g = 0; g < G; ++g) out[g * D + w * K + i] += ps[g * ldp + t] * c;
            }
        }
}

typedef void (*KFn)(const int32_t*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, float*);
typedef void (*VFn)(const int32_t*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float*);
typedef void (*VRowFn)(const int32_t*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);

#define ROW4(F, B) {F<B, 1>, F<B, 2>, F<B, 3>, F<B, 4>}
const KFn K_FNS[9][4] = {{}, ROW4(k_packed, 1), ROW4(k_packed, 2), ROW4(k_packed, 3), ROW4(k_packed, 4),
                         ROW4(k_packed, 5), ROW4(k_packed, 6), ROW4(k_packed, 7), ROW4(k_packed, 8)};
const VFn V_FNS[9][4] = {{}, ROW4(v_stream, 1), ROW4(v_stream, 2), {}, ROW4(v_stream, 4), {}, {}, {}, ROW4(v_stream, 8)};
const VRowFn V_ROWS[9] = {nullptr, v_rows<1>, v_rows<2>, v_rows<3>, v_rows<4>, v_rows<5>, v_rows<6>, v_rows<7>, v_rows<8>};

// Partials of one task: head r, kept tokens [t0, t1), queries qr [G, D]. Writes m [G], l [G], acc [G, Dv].
void run_task(const Buffers& b, const float* qr, int64_t G, int64_t r, int64_t t0, int64_t t1,
              float* m_out, float* l_out, float* acc, std::vector<float>& scratch) {
    const int64_t D = b.D, Dv = b.Dv;
    const int64_t* h = b.heads + r * H_COLS;
    const int64_t tn = t1 - t0;
    // scratch: logits [G, tn], ps [G, tn + L] (zero padded), qs [G, D], scales and minima
    // [max(D, Dv, tn)], bias [G], then the width kernels' scratch (see k_packed and v_stream).
    const int64_t big = std::max(std::max(D, Dv), tn), ldp = tn + L;
    // k_packed: A [4][32][2 L]. v_stream: A [4][K][P] (K * P <= max(32 L, Dv + 32)), alignment, then
    // psv [nvec][4][L] with nvec <= V_BLOCK * W / L + 1 and W <= Dv / 4 + 1.
    const int64_t kscratch = 4 * std::max<int64_t>(64 * L, Dv + 32) + 2 * L + 4 * (V_BLOCK * (Dv / 4 + 1) + L);
    const int64_t need = G * tn + G * ldp + G * D + 2 * big + G + kscratch;
    if ((int64_t)scratch.size() < need) scratch.resize(need);
    float* logits = scratch.data();
    float* ps = logits + G * tn;
    float* qs = ps + G * ldp;
    float* sc = qs + G * D;
    float* mn = sc + big;
    float* bias = mn + big;
    float* ks = bias + G;
    std::fill(logits, logits + G * tn, 0.0f);
    std::fill(bias, bias + G, 0.0f);

    for (int64_t gi = h[H_K0]; gi < h[H_K1]; ++gi) {
        const int64_t* gr = b.groups + gi * G_COLS;
        const int64_t bits = gr[G_BITS], count = gr[G_COUNT], len = gr[G_LEN], start = gr[G_START];
        if (bits == 16) {
            for (int64_t j = 0; j < count; ++j) {
                const int64_t ch = channel(b, h[H_PERM], start + j);
                const int64_t base = gr[G_DATA] + j * len + t0;
                for (int64_t g = 0; g < G; ++g) {
                    const float a = qr[g * D + ch];
                    float* lg = logits + g * tn;
                    if (b.raw_kind == 0) {
                        const float* x = (const float*)b.raw + base;
                        for (int64_t t = 0; t < tn; ++t) lg[t] += a * x[t];
                    } else {
                        for (int64_t t = 0; t < tn; ++t) lg[t] += a * raw_at(b, base + t);
                    }
                }
            }
            continue;
        }
        halves_to_floats(b.meta + gr[G_META], sc, count);
        halves_to_floats(b.meta + gr[G_META] + count, mn, count);
        for (int64_t j = 0; j < count; ++j) {
            const int64_t ch = channel(b, h[H_PERM], start + j);
            for (int64_t g = 0; g < G; ++g) {
                qs[g * D + j] = qr[g * D + ch] * sc[j];
                bias[g] += qr[g * D + ch] * mn[j];
            }
        }
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int64_t gb = std::min<int64_t>(4, G - g0);
            K_FNS[bits][gb - 1](b.words + gr[G_DATA], gr[G_WORDS], count, qs + g0 * D, D, t0, tn, logits + g0 * tn, tn, ks);
        }
    }

    if (b.softcap > 0.0f) {  // the cap is not linear: the bias goes in first
        for (int64_t g = 0; g < G; ++g) {
            float* lg = logits + g * tn;
            for (int64_t t = 0; t < tn; ++t) lg[t] = b.softcap * std::tanh((lg[t] + bias[g]) / b.softcap);
            bias[g] = 0.0f;
        }
    }

    for (int64_t g = 0; g < G; ++g) {
        float* lg = logits + g * tn;
        const float bg = bias[g];
        const float mx = row_max(lg, tn);
        l_out[g] = exp_row(lg, tn, mx);
        m_out[g] = mx + bg;
    }

    std::fill(acc, acc + G * Dv, 0.0f);
    for (int64_t gi = h[H_V0]; gi < h[H_V1]; ++gi) {
        const int64_t* gr = b.groups + gi * G_COLS;
        const int64_t bits = gr[G_BITS], count = gr[G_COUNT], start = gr[G_START], W = gr[G_WORDS];
        const int64_t ta = std::max(t0, start), tb = std::min(t1, start + count), nt = tb - ta;
        if (nt <= 0) continue;
        if (bits == 16) {
            for (int64_t t = ta; t < tb; ++t) {
                const int64_t base = gr[G_DATA] + (t - start) * Dv;
                for (int64_t g = 0; g < G; ++g) {
                    const float p = logits[g * tn + (t - t0)];
                    float* ag = acc + g * Dv;
                    if (b.raw_kind == 0) {
                        const float* x = (const float*)b.raw + base;
                        for (int64_t d = 0; d < Dv; ++d) ag[d] += p * x[d];
                    } else {
                        for (int64_t d = 0; d < Dv; ++d) ag[d] += p * raw_at(b, base + d);
                    }
                }
            }
            continue;
        }
        halves_to_floats(b.meta + gr[G_META] + (ta - start), sc, nt);
        halves_to_floats(b.meta + gr[G_META] + count + (ta - start), mn, nt);
        for (int64_t g = 0; g < G; ++g) {
            const float* p = logits + g * tn + (ta - t0);
            float* pg = ps + g * ldp;
            vf vbv = {};
            int64_t t = 0;
            for (; t + L <= nt; t += L) {
                vf pv, sv, mv;
                std::memcpy(&pv, p + t, sizeof(vf));
                std::memcpy(&sv, sc + t, sizeof(vf));
                std::memcpy(&mv, mn + t, sizeof(vf));
                const vf out = pv * sv;
                std::memcpy(pg + t, &out, sizeof(vf));
                vbv += pv * mv;
            }
            float vb = hsum(vbv);
            for (; t < nt; ++t) {
                pg[t] = p[t] * sc[t];
                vb += p[t] * mn[t];
            }
            std::fill(pg + nt, pg + nt + L, 0.0f);
            for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] += vb;
        }
        const int32_t* rows = b.words + gr[G_DATA] + (ta - start) * W;
        const bool stream = V_FNS[bits][0] != nullptr && (L % W == 0 || W % L == 0);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int64_t gb = std::min<int64_t>(4, G - g0);
            if (stream) V_FNS[bits][gb - 1](rows, W, nt, ps + g0 * ldp, ldp, acc + g0 * Dv, Dv, ks);
            else V_ROWS[bits](rows, W, nt, ps + g0 * ldp, ldp, gb, acc + g0 * Dv, Dv);
        }
    }
}

// -- a pool whose helpers join a job only if they wake up in time ------------------------------

struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int> inside{0};  // helpers working on this job
    int64_t n = 0;
    int helpers = 0;               // how many helpers may join
    std::atomic<int> joined{0};
    void (*run)(void*, int64_t, std::vector<float>&) = nullptr;
    void* ctx = nullptr;
};

void drain(Job& job) {
    thread_local std::vector<float> scratch;
    for (int64_t i; (i = job.next.fetch_add(1)) < job.n;) job.run(job.ctx, i, scratch);
}

struct Pool {
    std::mutex calls;  // one job at a time (ctypes releases the GIL: Python threads may call at once)
    std::mutex mu;
    std::condition_variable cv;
    Job* current = nullptr;
    uint64_t generation = 0;
    int size = 0;

    void grow(int helpers) {  // called with mu held
        for (; size < helpers; ++size) std::thread([this] { loop(); }).detach();
    }

    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Job* job;
            {
                std::unique_lock<std::mutex> lock(mu);
                cv.wait(lock, [&] { return current != nullptr && generation != seen; });
                seen = generation;
                job = current;
                if (job->joined.fetch_add(1) >= job->helpers) continue;
                job->inside.fetch_add(1);  // under the lock: the caller sees it before it retires the job
            }
            drain(*job);
            job->inside.fetch_sub(1);
        }
    }

    void run(Job& job, int threads) {
        std::lock_guard<std::mutex> one_at_a_time(calls);
        job.helpers = threads - 1;
        if (job.helpers > 0 && job.n > 1) {
            std::lock_guard<std::mutex> lock(mu);
            grow(job.helpers);
            current = &job;
            ++generation;
            cv.notify_all();
        }
        drain(job);
        if (job.helpers > 0 && job.n > 1) {
            {
                std::lock_guard<std::mutex> lock(mu);
                current = nullptr;  // no helper joins after this
            }
            while (job.inside.load() > 0) std::this_thread::yield();
        }
    }
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: detached helpers may still wait on it at exit
    return *p;
}

struct SegmentJob {
    const Buffers* b;
    const float* q;
    int64_t G, chunk, Rq;
    const int64_t *task_r, *task_t0;
    float *tm, *tl, *tacc;
};

void segment_task(void* ctx, int64_t i, std::vector<float>& scratch) {
    const SegmentJob& s = *(const SegmentJob*)ctx;
    const int64_t r = s.task_r[i], t0 = s.task_t0[i];
    const int64_t t1 = std::min(t0 + s.chunk, s.b->heads[r * H_COLS + H_N]);
    run_task(*s.b, s.q + (r % s.Rq) * s.G * s.b->D, s.G, r, t0, t1, &s.tm[i * s.G], &s.tl[i * s.G], &s.tacc[i * s.G * s.b->Dv], scratch);
}

}  // namespace

extern "C" {

int rdkv_chunk_align() { return (int)CHUNK_ALIGN; }

// Partials of q [Rq, G, D] (scaled) over the R head rows of one segment: m, l [Rq, G], acc [Rq, G, Dv].
// R is a multiple of Rq: head row r reads query row r % Rq and is merged into that output row (a
// stack of R / Rq segments, member-major, in one call). chunk: tokens per task (a multiple of
// CHUNK_ALIGN); threads: threads to use (the caller included); softcap: the logit cap (0: none).
int rdkv_segment_partials(const float* q, int64_t R, int64_t Rq, int64_t G, int64_t D, int64_t Dv,
                          const int64_t* heads, const int64_t* groups, const int32_t* words,
                          const uint16_t* meta, const void* raw, int raw_kind, const void* perm,
                          int perm_kind, float softcap, int64_t chunk, int threads,
                          float* m_out, float* l_out, float* acc_out) {
    if (chunk <= 0 || chunk % CHUNK_ALIGN) return 1;
    if (softcap < 0.0f) return 2;
    if (Rq < 0 || (Rq ? R % Rq : R)) return 3;
    Buffers b{heads, groups, words, meta, raw, raw_kind, perm, perm_kind, D, Dv, softcap};
    std::vector<int64_t> task_r, task_t0, first(R + 1, 0);
    for (int64_t r = 0; r < R; ++r) {
        first[r] = (int64_t)task_r.size();
        for (int64_t t0 = 0; t0 < heads[r * H_COLS + H_N]; t0 += chunk) {
            task_r.push_back(r);
            task_t0.push_back(t0);
        }
    }
    first[R] = (int64_t)task_r.size();
    const int64_t NT = first[R];
    std::vector<float> tm(NT * G), tl(NT * G), tacc(NT * G * Dv);
    SegmentJob ctx{&b, q, G, chunk, Rq, task_r.data(), task_t0.data(), tm.data(), tl.data(), tacc.data()};
    Job job;
    job.n = NT;
    job.run = segment_task;
    job.ctx = &ctx;
    pool().run(job, std::max(1, threads));
    for (int64_t o = 0; o < Rq; ++o) {  // output row o: the tasks of head rows o, o + Rq, ...
        for (int64_t g = 0; g < G; ++g) {
            float M = -INFINITY;
            for (int64_t r = o; r < R; r += Rq)
                for (int64_t i = first[r]; i < first[r + 1]; ++i) M = std::max(M, tm[i * G + g]);
            float Lsum = 0.0f;
            float* a = acc_out + (o * G + g) * Dv;
            std::fill(a, a + Dv, 0.0f);
            if (M > -INFINITY) {  // else no task has a token: (-inf, 0, 0)
                for (int64_t r = o; r < R; r += Rq)
                    for (int64_t i = first[r]; i < first[r + 1]; ++i) {
                        const float f = std::exp(tm[i * G + g] - M);
                        Lsum += tl[i * G + g] * f;
                        const float* ta = &tacc[(i * G + g) * Dv];
                        for (int64_t d = 0; d < Dv; ++d) a[d] += ta[d] * f;
                    }
            }
            m_out[o * G + g] = M;
            l_out[o * G + g] = Lsum;
        }
    }
    return 0;
}

}  // extern "C"
