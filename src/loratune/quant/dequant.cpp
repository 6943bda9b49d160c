// Dequantization of frozen weights in one pass, each value rounded once from fp32 (to bf16, or kept in fp32).
// NF4: for each block of 64 weights (32 bytes, two 4-bit codes per byte, the first code in the high nibble),
// out[64 b + 2 j] = codebook[byte >> 4] * scale[b] and out[64 b + 2 j + 1] = codebook[byte & 15] * scale[b],
// with byte = data[32 b + j]. int8: out[r, c] = codes[r, c] * scale[r].
// Built by loratune.quant.native for the machine's own CPU (-march=native).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BW__) && !defined(LORATUNE_SCALAR)
#include <immintrin.h>
#define LORATUNE_AVX512 1
#endif

namespace {

uint16_t bf16_bits(float value) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

#ifdef LORATUNE_AVX512
__m256i bf16_lanes(__m512 values) {  // 16 fp32 values rounded to nearest even bf16
  __m512i bits = _mm512_castps_si512(values);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}
#endif

template <bool kBf16>
void dequantize_blocks(const uint8_t* data, const float* scales, const float* codebook, void* out,
                       int64_t begin, int64_t end) {
#ifdef LORATUNE_AVX512
  // The block's 16 scaled values sit in one register; a permute looks up 32 (bf16) or 16 (fp32) codes at once.
  const __m512 book = _mm512_loadu_ps(codebook);
  const __m512i low_nibble = _mm512_set1_epi32(15);
  for (int64_t b = begin; b < end; ++b) {
    const __m512 table = _mm512_mul_ps(book, _mm512_set1_ps(scales[b]));
    for (int half = 0; half < 2; ++half) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 32 * b + 16 * half)));
      const __m512i high = _mm512_srli_epi32(bytes, 4);
      const __m512i low = _mm512_and_si512(bytes, low_nibble);
      if constexpr (kBf16) {
        const __m512i table16 = _mm512_castsi256_si512(bf16_lanes(table));
        // each 32-bit lane holds the indices of two neighbouring outputs: the high code, then the low one
        const __m512i index = _mm512_or_si512(high, _mm512_slli_epi32(low, 16));
        _mm512_storeu_si512(static_cast<uint16_t*>(out) + 64 * b + 32 * half, _mm512_permutexvar_epi16(index, table16));
      } else {
        const __m512 from_high = _mm512_permutexvar_ps(high, table);
        const __m512 from_low = _mm512_permutexvar_ps(low, table);
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        float* dst = static_cast<float*>(out) + 64 * b + 32 * half;
        _mm512_storeu_ps(dst, _mm512_permutex2var_ps(from_high, first, from_low));
        _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(from_high, second, from_low));
      }
    }
  }
#else
  for (int64_t b = begin; b < end; ++b) {
    float table[16];
    for (int i = 0; i < 16; ++i) table[i] = codebook[i] * scales[b];
    const uint8_t* src = data + 32 * b;
    if constexpr (kBf16) {
      uint16_t table16[16];
      for (int i = 0; i < 16; ++i) table16[i] = bf16_bits(table[i]);
      uint16_t* dst = static_cast<uint16_t*>(out) + 64 * b;
      for (int j = 0; j < 32; ++j) {
        dst[2 * j] = table16[src[j] >> 4];
        dst[2 * j + 1] = table16[src[j] & 15];
      }
    } else {
      float* dst = static_cast<float*>(out) + 64 * b;
      for (int j = 0; j < 32; ++j) {
        dst[2 * j] = table[src[j] >> 4];
        dst[2 * j + 1] = table[src[j] & 15];
      }
    }
  }
#endif
}

template <bool kBf16>
void int8_rows(const int8_t* codes, const float* scales, void* out, int64_t cols, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* src = codes + r * cols;
    const float scale = scales[r];
    int64_t c = 0;
#ifdef LORATUNE_AVX512
    const __m512 s = _mm512_set1_ps(scale);
    for (; c + 16 <= cols; c += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)))), s);
      if constexpr (kBf16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + r * cols + c), bf16_lanes(v));
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + r * cols + c, v);
      }
    }
#endif
    for (; c < cols; ++c) {
      const float v = static_cast<float>(src[c]) * scale;
      if constexpr (kBf16) {
        static_cast<uint16_t*>(out)[r * cols + c] = bf16_bits(v);
      } else {
        static_cast<float*>(out)[r * cols + c] = v;
      }
    }
  }
}

}  // namespace

void int8_dequantize(const torch::Tensor& codes, const torch::Tensor& scales, torch::Tensor& out) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kChar && codes.dim() == 2 && codes.is_contiguous(), "codes: contiguous 2-D int8 on the CPU");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == codes.size(0), "scales: one fp32 per row");
  TORCH_CHECK(out.device().is_cpu() && out.numel() == codes.numel() && out.is_contiguous(), "sizes: out must hold every code");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat, "out: bf16 or fp32");
  const int8_t* d = codes.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  void* o = out.data_ptr();
  const int64_t cols = codes.size(1);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, codes.size(0), std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    if (bf16) {
      int8_rows<true>(d, s, o, cols, begin, end);
    } else {
      int8_rows<false>(d, s, o, cols, begin, end);
    }
  });
}

void nf4_dequantize(const torch::Tensor& data, const torch::Tensor& scales, const torch::Tensor& codebook,
                    torch::Tensor& out) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.is_contiguous(), "data: contiguous uint8 on the CPU");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales: contiguous fp32");
  TORCH_CHECK(codebook.device().is_cpu() && codebook.scalar_type() == at::kFloat && codebook.numel() == 16 && codebook.is_contiguous(), "codebook: 16 fp32 values");
  const int64_t blocks = scales.numel();
  TORCH_CHECK(out.device().is_cpu() && data.numel() == 32 * blocks && out.numel() == 64 * blocks && out.is_contiguous(), "sizes: 32 bytes and 64 outputs per scale");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat, "out: bf16 or fp32");
  const uint8_t* d = data.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const float* c = codebook.data_ptr<float>();
  void* o = out.data_ptr();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    if (bf16) {
      dequantize_blocks<true>(d, s, c, o, begin, end);
    } else {
      dequantize_blocks<false>(d, s, c, o, begin, end);
    }
  });
}

bool vectorized() {
#ifdef LORATUNE_AVX512
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nf4_dequantize", &nf4_dequantize, "NF4 codes and fp32 block scales into a bf16 or fp32 tensor");
  m.def("int8_dequantize", &int8_dequantize, "int8 codes (rows x cols) and fp32 row scales into a bf16 or fp32 tensor");
  m.def("vectorized", &vectorized, "whether the AVX-512 path was compiled");
}
