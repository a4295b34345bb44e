// Block-sparse flash attention for the CPU: the kernel behind the ``cpp`` executor (kernels/cpp.py), and the
// block-mass search of the ``cached`` method (block_mass_rows, at the end).
//
// For each query block (a row of the plan, one per batch x head x query block), its kept key blocks are read
// straight from the blocked K/V tensors, a chunk of about 512 keys at a time, into a small per-thread buffer that
// stays in the L2 cache; scores are one GEMM per chunk, the softmax is online (running max and sum per query row,
// as in flash attention), and the output is accumulated by a second GEMM. Nothing is gathered into large
// temporaries and no partial results are merged: every (query block, key block) pair of the plan is computed once.
//
// Why by hand: torch's CPU SDPA kernel only takes dense K/V, so the `gather` executor copies every kept key block
// into a fresh sequence per call (~5 % of its time at 32k tokens) and runs 128-query calls at the kernel's slowest
// query split; no library offers block-sparse attention over index lists on the CPU (compiled FlexAttention runs
// at 0.57 of the ideal here). GEMMs go to the BLAS torch links (``sgemm_``).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Keys per chunk: K and V chunks of 512 x 64 floats are 256 KiB together, well inside L2.
constexpr int64_t kChunkKeys = 512;
// The running max of a query that has seen no key yet, and the score of a key it may not see. Finite on purpose:
// the file is compiled with -ffast-math (which lets the compiler vectorise exp and assumes no infinities); any real
// score is far above it and exp(kUnseen - real max) is exactly 0.
constexpr float kUnseen = -1e30f;

// Column-major BLAS GEMM: C[m x n] = alpha * op(A) op(B) + beta * C.
inline void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int ldai = static_cast<int>(lda), ldbi = static_cast<int>(ldb), ldci = static_cast<int>(ldc);
  sgemm_(&transa, &transb, &mi, &ni, &ki, &alpha, a, &ldai, b, &ldbi, &beta, c, &ldci);
}

// exp(x - shift) of a row in place, returning the sum (vectorised by the compiler with glibc's vector exp).
inline float exp_shift_sum(float* x, int64_t n, float shift) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

}  // namespace

// q_blocks, k_blocks, v_blocks: float32 [B*H*Qb, bs, D], contiguous, in plan order (the tail block zero-padded).
// kv_num: int64 [B*H, Qb]; kv_idx: int64 [B*H, Qb, K] (key block j of the same batch x head; the first kv_num
// entries of a row are used). key_keep: optional bool [B, S] (False: the key is never attended); key_groups:
// optional int32 [B, S] (a query sees a key only when the key's group is not greater than its own).
// out [B*H*Qb, bs, D] and lse [B*H*Qb, bs] (float32, contiguous) come in filled with zeros and -inf (made by the
// caller: this file is compiled with -ffast-math and handles no infinities); the rows of queries that see at least
// one key are written (natural-log LSE), the others keep zeros and -inf, as the reference executor gives.
void block_sparse_attention_cpu(const at::Tensor& q_blocks, const at::Tensor& k_blocks, const at::Tensor& v_blocks,
                                const at::Tensor& kv_num, const at::Tensor& kv_idx, int64_t seq_len, int64_t heads,
                                double scale, const std::optional<at::Tensor>& key_keep,
                                const std::optional<at::Tensor>& key_groups, at::Tensor& out, at::Tensor& lse) {
  for (const at::Tensor* t : {&q_blocks, &k_blocks, &v_blocks}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3,
                "q/k/v blocks must be contiguous float32 [rows, block, D]");
  }
  TORCH_CHECK(kv_num.scalar_type() == at::kLong && kv_idx.scalar_type() == at::kLong && kv_num.is_contiguous() &&
                  kv_idx.is_contiguous(),
              "kv_num and kv_idx must be contiguous int64");
  const int64_t rows = q_blocks.size(0), bs = q_blocks.size(1), dim = q_blocks.size(2);
  const int64_t qb = kv_num.size(1), kmax = kv_idx.size(2);
  TORCH_CHECK(kv_num.size(0) * qb == rows && kv_idx.size(0) == kv_num.size(0) && kv_idx.size(1) == qb,
              "plan rows do not match the blocked q");
  TORCH_CHECK(k_blocks.sizes() == q_blocks.sizes() && v_blocks.sizes() == q_blocks.sizes(), "q/k/v shapes differ");
  TORCH_CHECK((seq_len + bs - 1) / bs == qb && heads > 0 && kv_num.size(0) % heads == 0, "bad seq_len or heads");
  const uint8_t* keep = nullptr;
  if (key_keep.has_value()) {
    TORCH_CHECK(key_keep->scalar_type() == at::kBool && key_keep->is_contiguous() && key_keep->dim() == 2 &&
                    key_keep->size(0) * heads == kv_num.size(0) && key_keep->size(1) == seq_len,
                "key_keep must be contiguous bool [B, S]");
    keep = reinterpret_cast<const uint8_t*>(key_keep->data_ptr<bool>());
  }
  const int32_t* groups = nullptr;
  if (key_groups.has_value()) {
    TORCH_CHECK(key_groups->scalar_type() == at::kInt && key_groups->is_contiguous() && key_groups->dim() == 2 &&
                    key_groups->size(0) * heads == kv_num.size(0) && key_groups->size(1) == seq_len,
                "key_groups must be contiguous int32 [B, S]");
    groups = key_groups->data_ptr<int32_t>();
  }

  TORCH_CHECK(out.sizes() == q_blocks.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  lse.dim() == 2 && lse.size(0) == rows && lse.size(1) == bs && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous(),
              "out must be float32 like q_blocks and lse float32 [rows, block], both contiguous");
  const float* qp = q_blocks.data_ptr<float>();
  const float* kp = k_blocks.data_ptr<float>();
  const float* vp = v_blocks.data_ptr<float>();
  const int64_t* nump = kv_num.data_ptr<int64_t>();
  const int64_t* idxp = kv_idx.data_ptr<int64_t>();
  float* outp = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t cap = kChunkKeys + bs;  // a chunk takes whole blocks until it holds >= kChunkKeys keys

  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(cap * dim), vbuf(cap * dim), scores(bs * cap), acc(bs * dim), row_max(bs), row_sum(bs);
    std::vector<int32_t> chunk_groups(groups ? cap : 0), query_groups(groups ? bs : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t head_row = r / qb, i = r % qb, batch = head_row / heads;
      const int64_t n = nump[r];
      TORCH_CHECK(n >= 0 && n <= kmax, "kv_num out of range");
      if (n == 0) continue;  // keeps no key block: zeros and -inf
      const int64_t* list = idxp + r * kmax;
      const float* q = qp + r * bs * dim;
      std::fill(row_max.begin(), row_max.end(), kUnseen);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      if (groups) {
        for (int64_t x = 0; x < bs; ++x) {  // padding queries (past seq_len) see everything; they are discarded
          const int64_t token = i * bs + x;
          query_groups[x] = token < seq_len ? groups[batch * seq_len + token] : std::numeric_limits<int32_t>::max();
        }
      }
      int64_t listed = 0;
      while (listed < n) {
        int64_t keys = 0;
        while (listed < n && keys < kChunkKeys) {
          const int64_t j = list[listed++];
          TORCH_CHECK(j >= 0 && j < qb, "kv_idx out of range");
          const int64_t first = j * bs, count = std::min(bs, seq_len - first);
          const float* ksrc = kp + (head_row * qb + j) * bs * dim;
          const float* vsrc = vp + (head_row * qb + j) * bs * dim;
          if (keep == nullptr) {
            std::memcpy(kbuf.data() + keys * dim, ksrc, count * dim * sizeof(float));
            std::memcpy(vbuf.data() + keys * dim, vsrc, count * dim * sizeof(float));
            if (groups) std::memcpy(chunk_groups.data() + keys, groups + batch * seq_len + first, count * 4);
            keys += count;
          } else {  // padded keys are left out of the chunk: they do not exist for the softmax
            const uint8_t* keep_row = keep + batch * seq_len + first;
            for (int64_t t = 0; t < count; ++t) {
              if (!keep_row[t]) continue;
              std::memcpy(kbuf.data() + keys * dim, ksrc + t * dim, dim * sizeof(float));
              std::memcpy(vbuf.data() + keys * dim, vsrc + t * dim, dim * sizeof(float));
              if (groups) chunk_groups[keys] = groups[batch * seq_len + first + t];
              ++keys;
            }
          }
        }
        if (keys == 0) continue;
        // scores [bs x keys] (row-major) = scale * q [bs x D] . k [keys x D]^T
        gemm('T', 'N', keys, bs, dim, alpha, kbuf.data(), dim, q, dim, 0.f, scores.data(), keys);
        for (int64_t x = 0; x < bs; ++x) {
          float* s = scores.data() + x * keys;
          if (groups) {
            for (int64_t t = 0; t < keys; ++t) {
              if (chunk_groups[t] > query_groups[x]) s[t] = kUnseen;
            }
          }
          float new_max = row_max[x];
          for (int64_t t = 0; t < keys; ++t) new_max = std::max(new_max, s[t]);
          if (new_max <= kUnseen) {  // this query sees no key yet: nothing to add
            std::fill(s, s + keys, 0.f);
            continue;
          }
          const float chunk_sum = exp_shift_sum(s, keys, new_max);
          const float correction = std::exp(row_max[x] - new_max);  // 0 for the first keys seen
          row_sum[x] = row_sum[x] * correction + chunk_sum;
          row_max[x] = new_max;
          float* a = acc.data() + x * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
        }
        // acc [bs x D] += probabilities [bs x keys] . v [keys x D]
        gemm('N', 'N', dim, bs, keys, 1.f, vbuf.data(), dim, scores.data(), keys, 1.f, acc.data(), dim);
      }
      float* o = outp + r * bs * dim;
      for (int64_t x = 0; x < bs; ++x) {
        if (row_sum[x] > 0.f) {
          const float inv = 1.f / row_sum[x];
          for (int64_t d = 0; d < dim; ++d) o[x * dim + d] = acc[x * dim + d] * inv;
          lsep[r * bs + x] = row_max[x] + std::log(row_sum[x]);
        }
      }
    }
  });
}

// The softmax mass each query row puts on each key block: the search of the `cached` method
// (vidsparse.methods.cached.block_attention_mass). q: float32 [G, R, D] (the scored rows of each head), k: float32
// [G, N, D]; mass: float32 [G, R, ceil(N / block_size)], zero-filled, written with each row's mass per key block
// (each row sums to 1). One pass over the keys, a chunk of about 512 at a time, with a running max per row: when it
// grows, the block sums so far are rescaled (flash attention's trick); the scores never leave the L2 cache.
void block_mass_rows(const at::Tensor& q, const at::Tensor& k, int64_t block_size, double scale, at::Tensor& mass) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && mass.scalar_type() == at::kFloat &&
                  q.is_contiguous() && k.is_contiguous() && mass.is_contiguous() && q.dim() == 3 && k.dim() == 3 &&
                  mass.dim() == 3,
              "q [G, R, D], k [G, N, D] and mass [G, R, Nb] must be contiguous float32");
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2), keys = k.size(1);
  const int64_t nb = (keys + block_size - 1) / block_size;
  TORCH_CHECK(block_size > 0 && k.size(0) == heads && k.size(2) == dim && mass.size(0) == heads &&
                  mass.size(1) == rows && mass.size(2) == nb,
              "shapes of q, k and mass do not match");
  constexpr int64_t kRowTile = 32;
  const int64_t chunk = std::max<int64_t>(1, kChunkKeys / block_size) * block_size;  // whole blocks per chunk
  const int64_t tiles = (rows + kRowTile - 1) / kRowTile;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  float* mp = mass.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kRowTile * chunk), row_max(kRowTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / tiles, r0 = (task % tiles) * kRowTile, rt = std::min(kRowTile, rows - r0);
      float* out = mp + (g * rows + r0) * nb;
      std::fill(row_max.begin(), row_max.end(), kUnseen);
      for (int64_t c0 = 0; c0 < keys; c0 += chunk) {
        const int64_t len = std::min(chunk, keys - c0), first_block = c0 / block_size;
        gemm('T', 'N', len, rt, dim, alpha, kp + (g * keys + c0) * dim, dim, qp + (g * rows + r0) * dim, dim, 0.f,
             scores.data(), len);
        for (int64_t x = 0; x < rt; ++x) {
          float* s = scores.data() + x * len;
          float* sums = out + x * nb;
          float chunk_max = kUnseen;
          for (int64_t t = 0; t < len; ++t) chunk_max = std::max(chunk_max, s[t]);
          if (chunk_max > row_max[x]) {  // the block sums so far were relative to a smaller max
            const float factor = std::exp(row_max[x] - chunk_max);
            for (int64_t j = 0; j < first_block; ++j) sums[j] *= factor;
            row_max[x] = chunk_max;
          }
          for (int64_t b0 = 0; b0 < len; b0 += block_size) {
            sums[first_block + b0 / block_size] += exp_shift_sum(s + b0, std::min(block_size, len - b0), row_max[x]);
          }
        }
      }
      for (int64_t x = 0; x < rt; ++x) {
        float* sums = out + x * nb;
        float total = 0.f;
        for (int64_t j = 0; j < nb; ++j) total += sums[j];
        const float inv = 1.f / total;
        for (int64_t j = 0; j < nb; ++j) sums[j] *= inv;
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_attention_cpu", &block_sparse_attention_cpu, "Block-sparse flash attention on the CPU");
  m.def("block_mass_rows", &block_mass_rows, "Softmax mass of query rows per key block (cached's search)");
}
