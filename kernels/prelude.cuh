// ferrum kernel prelude: prepended by src/cuda/kernels.rs to every kernels/*.cu file before NVRTC
// compiles it. It needs no CUDA header: the 16-bit float types are plain bit containers converted
// with PTX `cvt` (sm_80+ for bf16). NVRTC 12.6 and 13.0 do not ship cuda_bf16.h/cuda_fp16.h as
// builtin headers (checked: "could not open source file", no include path); they live in the
// toolkit's include folder, which Triton's runtime images lack. All arithmetic is done in f32.

typedef unsigned int u32;
typedef int i32;
typedef long long i64;

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// 16 / sizeof(T) values (eight bf16/f16, four f32) moved as one 16-byte load or store (the
// builtin uint4, as gemv.cu loads weights); the address must be 16-byte aligned.
template <typename T> union Vec16 {
    static constexpr int N = 16 / (int)sizeof(T);
    uint4 bits;
    T e[16 / sizeof(T)];
};
template <typename T> __device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
    Vec16<T> v;
    v.bits = *reinterpret_cast<const uint4*>(p);
    return v;
}
template <typename T> __device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& v) {
    *reinterpret_cast<uint4*>(p) = v.bits;
}

#define FERRUM_NEG_INF (-__int_as_float(0x7f800000))
#define FERRUM_WARP 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = FERRUM_WARP / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `scratch` holds 32 floats of shared memory; it is reusable after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % FERRUM_WARP;
    const int warp = threadIdx.x / FERRUM_WARP;
    const int num_warps = blockDim.x / FERRUM_WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Activation by code (src/cuda/ops.rs `act_code`): 0 SiLU, 1 GELU tanh, 2 GELU erf, 3 ReLU.
__device__ __forceinline__ float apply_act(float x, int act) {
    switch (act) {
        case 0: return x / (1.0f + expf(-x));
        case 1: {
            const float k = 0.7978845608028654f;  // sqrt(2/pi)
            return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
        }
        case 2: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
        default: return fmaxf(x, 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core helpers (sm_80+; the prefill and split-K attention kernels).
// mma.sync.m16n8k16 fragment layouts (PTX ISA; g = lane / 4, c = lane % 4):
//   A (16x16, row): a0 (g, 2c..2c+1) a1 (g+8, 2c..) a2 (g, 2c+8..) a3 (g+8, 2c+8..)
//   B (16x8, col):  b0 (k 2c..2c+1, n g) b1 (k 2c+8.., n g)
//   C (16x8):       c0,c1 (g, 2c..2c+1) c2,c3 (g+8, 2c..2c+1)

// Mma<T>::run: c += a.b on one m16n8k16 tile (f32 accumulators); Mma<T>::pack: two f32 to a
// T pair, lo in the low 16 bits (the lower column), hi in the high ones.
template <typename T> struct Mma;
#define FERRUM_MMA(T, PTX)                                                                     \
    template <> struct Mma<T> {                                                                \
        static __device__ __forceinline__ void run(float* c, const u32* a, u32 b0, u32 b1) {   \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 "          \
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"               \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                      \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));      \
        }                                                                                      \
        static __device__ __forceinline__ u32 pack(float lo, float hi) {                       \
            u32 r;                                                                             \
            asm("cvt.rn." PTX "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));              \
            return r;                                                                          \
        }                                                                                      \
    };
FERRUM_MMA(bf16, "bf16")
FERRUM_MMA(f16, "f16")

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
        : "=r"(addr)
        : "l"(p));
    return addr;
}

// From a 32-bit shared-memory address (smem_addr) or a generic pointer into shared memory.
__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(u32* r, const unsigned short* p) {
    ldmatrix_x4(r, smem_addr(p));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const unsigned short* p) {
    ldmatrix_x4_trans(r, smem_addr(p));
}

// 16 bytes global -> shared; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(unsigned short* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most N committed cp.async groups of this thread are pending (0: all landed).
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Instantiates `extern "C"` entry points `{op}_f32`, `{op}_bf16`, `{op}_f16` from a macro that
// takes (entry name, element type).
#define FERRUM_FOR_EACH_DTYPE(MACRO, op) \
    MACRO(op##_f32, float)               \
    MACRO(op##_bf16, bf16)               \
    MACRO(op##_f16, f16)
