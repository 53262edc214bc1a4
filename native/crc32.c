/*
 * CRC-32 (IEEE 802.3, reflected, polynomial 0xedb88320: zlib's and @node-rs/crc32's) of many blocks in one call.
 *
 * The store checksums every 4 KiB chunk it writes and verifies every chunk it reads. Through @node-rs/crc32 a
 * 1 MiB write is 256 calls into Node, each paying the N-API glue, at 10-13 GB/s for the CRC itself; here one
 * call from JavaScript (through koffi, src/store/native-crc.ts) computes all 256, folding with carry-less
 * multiplication (PCLMULQDQ on 128-bit registers, or VPCLMULQDQ on 256-bit ones with AVX2) as in "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ Instruction" (Gopal, Ozturk et al., Intel, 2009), then a
 * Barrett reduction to 32 bits. Bytes the folding does not cover (a length under 64 or 128, the last up to 15)
 * go through a byte table. The kernel is chosen by the caller (chunkd_crc32_best_kernel says what this CPU runs),
 * so tests can check each against the reference.
 *
 * Built by native/build.sh at npm install (`cc -O2 -shared`); a machine without a C compiler runs @node-rs/crc32.
 * The fold constants are x^n mod P(x), bit-reflected and shifted left by one, for the n given beside each.
 */
#include <stddef.h>
#include <stdint.h>

enum { kernel_table = 0, kernel_pclmul = 1, kernel_vpclmul = 2 };

static uint32_t byte_table[256];

__attribute__((constructor)) static void fill_byte_table(void) {
  for (uint32_t value = 0; value < 256; value++) {
    uint32_t crc = value;
    for (int bit = 0; bit < 8; bit++) crc = (crc & 1) ? 0xedb88320u ^ (crc >> 1) : crc >> 1;
    byte_table[value] = crc;
  }
}

/* The register (the inverted CRC) after `state` and n more bytes, a byte at a time. */
static uint32_t crc_bytes(uint32_t state, const uint8_t *p, size_t n) {
  for (size_t i = 0; i < n; i++) state = byte_table[(state ^ p[i]) & 0xff] ^ (state >> 8);
  return state;
}

#if defined(__x86_64__)
#include <immintrin.h>

#define fold_targets __attribute__((target("pclmul,sse4.1")))
#define wide_targets __attribute__((target("pclmul,sse4.1,avx2,vpclmulqdq")))

/* x1 folded forward by 128 bits onto `next`. */
fold_targets static inline __m128i fold128(__m128i x1, __m128i next) {
  const __m128i k160k96 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0); /* x^96, x^160 */
  __m128i low = _mm_clmulepi64_si128(x1, k160k96, 0x00);
  __m128i high = _mm_clmulepi64_si128(x1, k160k96, 0x11);
  return _mm_xor_si128(_mm_xor_si128(high, low), next);
}

/* The 32-bit register from the 128 bits left after folding. */
fold_targets static inline uint32_t reduce128(__m128i x1) {
  const __m128i k160k96 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
  const __m128i k64 = _mm_set_epi64x(0, 0x0163cd6124); /* x^64 */
  const __m128i poly = _mm_set_epi64x(0x01f7011641, 0x01db710641); /* u' and P'(x) for Barrett */
  const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
  /* 128 bits to 64. */
  __m128i x2 = _mm_clmulepi64_si128(x1, k160k96, 0x10);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2);
  x2 = _mm_srli_si128(x1, 4);
  x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, low32), k64, 0x00), x2);
  /* Barrett reduction to 32. */
  x2 = _mm_clmulepi64_si128(_mm_and_si128(x1, low32), poly, 0x10);
  x2 = _mm_clmulepi64_si128(_mm_and_si128(x2, low32), poly, 0x00);
  return (uint32_t)_mm_extract_epi32(_mm_xor_si128(x1, x2), 1);
}

/* The register after `state` and len bytes (len >= 64, a multiple of 16): four 128-bit lanes, 64 bytes a turn. */
fold_targets static uint32_t fold_pclmul(uint32_t state, const uint8_t *p, size_t len) {
  const __m128i k544k480 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4); /* x^480, x^544 */
  __m128i x1 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)state));
  __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 16));
  __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32));
  __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 48));
  p += 64;
  len -= 64;
  for (; len >= 64; p += 64, len -= 64) {
    __m128i l1 = _mm_clmulepi64_si128(x1, k544k480, 0x00), h1 = _mm_clmulepi64_si128(x1, k544k480, 0x11);
    __m128i l2 = _mm_clmulepi64_si128(x2, k544k480, 0x00), h2 = _mm_clmulepi64_si128(x2, k544k480, 0x11);
    __m128i l3 = _mm_clmulepi64_si128(x3, k544k480, 0x00), h3 = _mm_clmulepi64_si128(x3, k544k480, 0x11);
    __m128i l4 = _mm_clmulepi64_si128(x4, k544k480, 0x00), h4 = _mm_clmulepi64_si128(x4, k544k480, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(l1, h1), _mm_loadu_si128((const __m128i *)p));
    x2 = _mm_xor_si128(_mm_xor_si128(l2, h2), _mm_loadu_si128((const __m128i *)(p + 16)));
    x3 = _mm_xor_si128(_mm_xor_si128(l3, h3), _mm_loadu_si128((const __m128i *)(p + 32)));
    x4 = _mm_xor_si128(_mm_xor_si128(l4, h4), _mm_loadu_si128((const __m128i *)(p + 48)));
  }
  x1 = fold128(fold128(fold128(x1, x2), x3), x4);
  for (; len >= 16; p += 16, len -= 16) x1 = fold128(x1, _mm_loadu_si128((const __m128i *)p));
  return reduce128(x1);
}

/* The same with 256-bit registers (len >= 128, a multiple of 16): eight 128-bit lanes, 128 bytes a turn. */
wide_targets static uint32_t fold_vpclmul(uint32_t state, const uint8_t *p, size_t len) {
  const __m256i k1056k992 = _mm256_set_epi64x(0x014a7fe880, 0x01e88ef372, 0x014a7fe880, 0x01e88ef372); /* x^992, x^1056 */
  __m256i y0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)state)));
  __m256i y1 = _mm256_loadu_si256((const __m256i *)(p + 32));
  __m256i y2 = _mm256_loadu_si256((const __m256i *)(p + 64));
  __m256i y3 = _mm256_loadu_si256((const __m256i *)(p + 96));
  p += 128;
  len -= 128;
  for (; len >= 128; p += 128, len -= 128) {
    __m256i l0 = _mm256_clmulepi64_epi128(y0, k1056k992, 0x00), h0 = _mm256_clmulepi64_epi128(y0, k1056k992, 0x11);
    __m256i l1 = _mm256_clmulepi64_epi128(y1, k1056k992, 0x00), h1 = _mm256_clmulepi64_epi128(y1, k1056k992, 0x11);
    __m256i l2 = _mm256_clmulepi64_epi128(y2, k1056k992, 0x00), h2 = _mm256_clmulepi64_epi128(y2, k1056k992, 0x11);
    __m256i l3 = _mm256_clmulepi64_epi128(y3, k1056k992, 0x00), h3 = _mm256_clmulepi64_epi128(y3, k1056k992, 0x11);
    y0 = _mm256_xor_si256(_mm256_xor_si256(l0, h0), _mm256_loadu_si256((const __m256i *)p));
    y1 = _mm256_xor_si256(_mm256_xor_si256(l1, h1), _mm256_loadu_si256((const __m256i *)(p + 32)));
    y2 = _mm256_xor_si256(_mm256_xor_si256(l2, h2), _mm256_loadu_si256((const __m256i *)(p + 64)));
    y3 = _mm256_xor_si256(_mm256_xor_si256(l3, h3), _mm256_loadu_si256((const __m256i *)(p + 96)));
  }
  /* The eight lanes in byte order, folded into one. */
  __m128i x1 = _mm256_castsi256_si128(y0);
  x1 = fold128(x1, _mm256_extracti128_si256(y0, 1));
  x1 = fold128(x1, _mm256_castsi256_si128(y1));
  x1 = fold128(x1, _mm256_extracti128_si256(y1, 1));
  x1 = fold128(x1, _mm256_castsi256_si128(y2));
  x1 = fold128(x1, _mm256_extracti128_si256(y2, 1));
  x1 = fold128(x1, _mm256_castsi256_si128(y3));
  x1 = fold128(x1, _mm256_extracti128_si256(y3, 1));
  for (; len >= 16; p += 16, len -= 16) x1 = fold128(x1, _mm_loadu_si128((const __m128i *)p));
  return reduce128(x1);
}
#endif

/* The register after `state` and n bytes, with the kernel asked for where the length allows it. */
static uint32_t crc_state(int kernel, uint32_t state, const uint8_t *p, size_t n) {
#if defined(__x86_64__)
  size_t folded = n & ~(size_t)15;
  if (kernel == kernel_vpclmul && n >= 128) {
    state = fold_vpclmul(state, p, folded);
    p += folded;
    n -= folded;
  } else if (kernel >= kernel_pclmul && n >= 64) {
    state = fold_pclmul(state, p, folded);
    p += folded;
    n -= folded;
  }
#else
  (void)kernel;
#endif
  return crc_bytes(state, p, n);
}

static int best_kernel = kernel_table;

__attribute__((constructor)) static void find_best_kernel(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1")) {
    best_kernel = kernel_pclmul;
    if (__builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx2")) best_kernel = kernel_vpclmul;
  }
#endif
}

/* The fastest kernel this CPU and its operating system run: 2 VPCLMULQDQ with AVX2, 1 PCLMULQDQ, 0 the table. */
int chunkd_crc32_best_kernel(void) {
  return best_kernel;
}

/* The kernel asked for, or the best this CPU has where it lacks that one. */
static int runnable(int kernel) {
  return kernel < best_kernel ? kernel : best_kernel;
}

/* The CRC-32 of n bytes. */
uint32_t chunkd_crc32(int kernel, const uint8_t *p, size_t n) {
  return ~crc_state(runnable(kernel), 0xffffffffu, p, n);
}

/* The CRC-32 of each of `count` blocks of `block_bytes` from p, into out[0..count). */
void chunkd_crc32_blocks(int kernel, const uint8_t *p, size_t block_bytes, size_t count, uint32_t *out) {
  kernel = runnable(kernel);
  for (size_t i = 0; i < count; i++) out[i] = ~crc_state(kernel, 0xffffffffu, p + i * block_bytes, block_bytes);
}
