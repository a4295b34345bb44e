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
#include <cstdlib>
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

// A float buffer aligned to 64 bytes: MKL may pick its code path (and so its rounding) by the alignment of its
// operands, and std::vector's 16-byte alignment would vary between runs; aligned buffers keep results bit-identical.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : data_(static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64))) {
    TORCH_CHECK(data_ != nullptr, "out of memory for a kernel buffer");
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

// Copies the next kept key blocks of a plan row (from list[listed], advancing listed) into kbuf/vbuf until they
// hold >= kChunkKeys keys or the row ends; padded keys (key_keep False) are left out, so they do not exist for the
// softmax, and the tail block's padding past seq_len is not copied. Returns the keys copied (their causal groups
// go to chunk_groups when groups is given).
inline int64_t gather_chunk(const int64_t* list, int64_t n, int64_t& listed, int64_t head_row, int64_t batch,
                            int64_t qb, int64_t bs, int64_t dim, int64_t seq_len, const float* kp, const float* vp,
                            const uint8_t* keep, const int32_t* groups, float* kbuf, float* vbuf,
                            int32_t* chunk_groups) {
  int64_t keys = 0;
  while (listed < n && keys < kChunkKeys) {
    const int64_t j = list[listed++];
    TORCH_CHECK(j >= 0 && j < qb, "kv_idx out of range");
    const int64_t first = j * bs, count = std::min(bs, seq_len - first);
    const float* ksrc = kp + (head_row * qb + j) * bs * dim;
    const float* vsrc = vp + (head_row * qb + j) * bs * dim;
    if (keep == nullptr) {
      std::memcpy(kbuf + keys * dim, ksrc, count * dim * sizeof(float));
      std::memcpy(vbuf + keys * dim, vsrc, count * dim * sizeof(float));
      if (groups) std::memcpy(chunk_groups + keys, groups + batch * seq_len + first, count * 4);
      keys += count;
    } else {
      const uint8_t* keep_row = keep + batch * seq_len + first;
      for (int64_t t = 0; t < count; ++t) {
        if (!keep_row[t]) continue;
        std::memcpy(kbuf + keys * dim, ksrc + t * dim, dim * sizeof(float));
        std::memcpy(vbuf + keys * dim, vsrc + t * dim, dim * sizeof(float));
        if (groups) chunk_groups[keys] = groups[batch * seq_len + first + t];
        ++keys;
      }
    }
  }
  return keys;
}

// One query row of the backward, in place: s holds scale * q.k (kUnseen where the key is hidden), dp holds dO.v;
// s becomes dS = P * (dp - delta) with P = exp(s - lse).
inline void grad_scores(float* s, const float* dp, int64_t n, float lse, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = std::exp(s[j] - lse) * (dp[j] - delta);
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
    AlignedBuffer kbuf(cap * dim), vbuf(cap * dim), scores(bs * cap), acc(bs * dim);
    std::vector<float> row_max(bs), row_sum(bs);
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
      std::fill(acc.data(), acc.data() + bs * dim, 0.f);
      if (groups) {
        for (int64_t x = 0; x < bs; ++x) {  // padding queries (past seq_len) see everything; they are discarded
          const int64_t token = i * bs + x;
          query_groups[x] = token < seq_len ? groups[batch * seq_len + token] : std::numeric_limits<int32_t>::max();
        }
      }
      int64_t listed = 0;
      while (listed < n) {
        const int64_t keys = gather_chunk(list, n, listed, head_row, batch, qb, bs, dim, seq_len, kp, vp, keep,
                                          groups, kbuf.data(), vbuf.data(), chunk_groups.data());
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
          for (int64_t d = 0; d < dim; ++d) o[x * dim + d] = acc.data()[x * dim + d] * inv;
          lsep[r * bs + x] = row_max[x] + std::log(row_sum[x]);
        }
      }
    }
  });
}

// The backward of block_sparse_attention_cpu (flash attention 2's recipe, two passes, no atomics).
//
// Probabilities are recomputed from the forward's LSE: P = exp(scale * q.k - lse). With dO the output's gradient
// and delta = rowsum(dO * O) (less the LSE's own gradient, when it has one: d lse / d s = P), dS = P * (dO.v - delta).
// Pass 1 (dQ): each query block over its kept key blocks, a chunk of about 512 keys at a time as in the forward:
//   dQ = scale * dS . K.
// Pass 2 (dK, dV): each key block over the query blocks that keep it (the plan's transposed index, q_num/q_idx),
//   a chunk of about 512 queries at a time: dV = P^T . dO, dK = scale * dS^T . Q.
// Every output row is written by one task, its sums taken in a fixed order: the result does not depend on the
// threads (bit-identical between runs). A key the forward left out (padding key_keep, a later causal group) gets
// P = 0, so it contributes nothing and gets no gradient; a query that saw no key comes with lse = +kNoKeyLse
// (the caller's sentinel for the forward's -inf), so its P is 0 too.
//
// q/k/v/dout_blocks: float32 [B*H*Qb, bs, D] as in the forward; lse and delta: float32 [B*H*Qb, bs];
// q_num: int64 [B*H, Qb]; q_idx: int64 [B*H, Qb, Q] (query blocks keeping key block j, ascending);
// dq/dk/dv: float32 like q_blocks, zero-filled by the caller (rows past seq_len stay 0).
void block_sparse_attention_backward_cpu(const at::Tensor& q_blocks, const at::Tensor& k_blocks,
                                         const at::Tensor& v_blocks, const at::Tensor& dout_blocks,
                                         const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& kv_num,
                                         const at::Tensor& kv_idx, const at::Tensor& q_num, const at::Tensor& q_idx,
                                         int64_t seq_len, int64_t heads, double scale,
                                         const std::optional<at::Tensor>& key_keep,
                                         const std::optional<at::Tensor>& key_groups, at::Tensor& dq, at::Tensor& dk,
                                         at::Tensor& dv) {
  const at::Tensor* tensors[] = {&q_blocks, &k_blocks, &v_blocks, &dout_blocks, &dq, &dk, &dv};
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == q_blocks.sizes() &&
                    t->dim() == 3,
                "q/k/v/dout blocks and dq/dk/dv must be contiguous float32 [rows, block, D] of one shape");
  }
  for (const at::Tensor* t : {&kv_num, &kv_idx, &q_num, &q_idx}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "plan indices must be contiguous int64");
  }
  const int64_t rows = q_blocks.size(0), bs = q_blocks.size(1), dim = q_blocks.size(2);
  const int64_t qb = kv_num.size(1), kmax = kv_idx.size(2), qmax = q_idx.size(2);
  TORCH_CHECK(kv_num.size(0) * qb == rows && kv_idx.size(0) == kv_num.size(0) && kv_idx.size(1) == qb &&
                  q_num.sizes() == kv_num.sizes() && q_idx.size(0) == kv_num.size(0) && q_idx.size(1) == qb,
              "plan rows do not match the blocked q");
  for (const at::Tensor* t : {&lse, &delta}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == rows &&
                    t->size(1) == bs,
                "lse and delta must be contiguous float32 [rows, block]");
  }
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
  const float* qp = q_blocks.data_ptr<float>();
  const float* kp = k_blocks.data_ptr<float>();
  const float* vp = v_blocks.data_ptr<float>();
  const float* dop = dout_blocks.data_ptr<float>();
  const float* lsep = lse.data_ptr<float>();
  const float* deltap = delta.data_ptr<float>();
  const int64_t* nump = kv_num.data_ptr<int64_t>();
  const int64_t* idxp = kv_idx.data_ptr<int64_t>();
  const int64_t* qnump = q_num.data_ptr<int64_t>();
  const int64_t* qidxp = q_idx.data_ptr<int64_t>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t cap = kChunkKeys + bs;  // a chunk takes whole blocks until it holds >= kChunkKeys rows

  // The dK/dV work of key block r (B*H*Qb numbering) over the query blocks that keep it; with fuse_dq also its
  // share of those query blocks' dQ (dQ_i += scale * dS_i . K_j), for a task that owns the whole head.
  struct KeyBuffers {
    AlignedBuffer qbuf, dobuf, probs, dscores;
    std::vector<float> chunk_lse, chunk_delta;
    std::vector<int32_t> chunk_groups;
    std::vector<uint8_t> key_ok;
    std::vector<int64_t> segments;  // (query block row, offset in the chunk, rows) per query block of the chunk
    KeyBuffers(int64_t cap, int64_t bs, int64_t dim, bool with_groups)
        : qbuf(cap * dim), dobuf(cap * dim), probs(bs * cap), dscores(bs * cap), chunk_lse(cap), chunk_delta(cap),
          chunk_groups(with_groups ? cap : 0), key_ok(bs) {}
  };
  auto key_block = [&](int64_t r, KeyBuffers& buf, bool fuse_dq) {
    const int64_t head_row = r / qb, j = r % qb, batch = head_row / heads;
    const int64_t n = qnump[r], kc = std::min(bs, seq_len - j * bs);  // kc: real keys of this block
    TORCH_CHECK(n >= 0 && n <= qmax, "q_num out of range");
    const int64_t* list = qidxp + r * qmax;
    const float* kblk = kp + r * bs * dim;
    const float* vblk = vp + r * bs * dim;
    bool any_key = true;
    if (keep) {  // padded keys get P = 0: no gradient, no contribution
      any_key = false;
      for (int64_t t = 0; t < kc; ++t) {
        buf.key_ok[t] = keep[batch * seq_len + j * bs + t];
        any_key = any_key || buf.key_ok[t];
      }
    }
    if (!any_key) return;
    const int32_t* key_groups_row = groups ? groups + batch * seq_len + j * bs : nullptr;
    int64_t listed = 0;
    while (listed < n) {
      int64_t nq = 0;
      buf.segments.clear();
      while (listed < n && nq < kChunkKeys) {
        const int64_t i = list[listed++];
        TORCH_CHECK(i >= 0 && i < qb, "q_idx out of range");
        const int64_t first = i * bs, count = std::min(bs, seq_len - first), src = head_row * qb + i;
        std::memcpy(buf.qbuf.data() + nq * dim, qp + src * bs * dim, count * dim * sizeof(float));
        std::memcpy(buf.dobuf.data() + nq * dim, dop + src * bs * dim, count * dim * sizeof(float));
        std::memcpy(buf.chunk_lse.data() + nq, lsep + src * bs, count * sizeof(float));
        std::memcpy(buf.chunk_delta.data() + nq, deltap + src * bs, count * sizeof(float));
        if (groups) std::memcpy(buf.chunk_groups.data() + nq, groups + batch * seq_len + first, count * 4);
        buf.segments.insert(buf.segments.end(), {src, nq, count});
        nq += count;
      }
      float* probs = buf.probs.data();
      float* dscores = buf.dscores.data();
      // probs [kc x nq] (row-major: key rows) = scale * k . q^T; dscores [kc x nq] = v . dout^T
      gemm('T', 'N', nq, kc, dim, alpha, buf.qbuf.data(), dim, kblk, dim, 0.f, probs, nq);
      gemm('T', 'N', nq, kc, dim, 1.f, buf.dobuf.data(), dim, vblk, dim, 0.f, dscores, nq);
      const float* lse_row = buf.chunk_lse.data();
      const float* delta_row = buf.chunk_delta.data();
      for (int64_t t = 0; t < kc; ++t) {
        float* p = probs + t * nq;
        float* ds = dscores + t * nq;
        if (keep && !buf.key_ok[t]) {
          std::fill(p, p + nq, 0.f);
          std::fill(ds, ds + nq, 0.f);
          continue;
        }
        if (groups) {
          const int32_t g = key_groups_row[t];
          for (int64_t x = 0; x < nq; ++x) {
            if (g > buf.chunk_groups[x]) p[x] = kUnseen;
          }
        }
#pragma omp simd
        for (int64_t x = 0; x < nq; ++x) {
          p[x] = std::exp(p[x] - lse_row[x]);
          ds[x] = p[x] * (ds[x] - delta_row[x]);
        }
      }
      // dv [kc x D] += P^T [kc x nq] . dout [nq x D]; dk [kc x D] += scale * dS^T [kc x nq] . q [nq x D]
      gemm('N', 'N', dim, kc, nq, 1.f, buf.dobuf.data(), dim, probs, nq, 1.f, dvp + r * bs * dim, dim);
      gemm('N', 'N', dim, kc, nq, alpha, buf.qbuf.data(), dim, dscores, nq, 1.f, dkp + r * bs * dim, dim);
      if (fuse_dq) {
        for (size_t e = 0; e < buf.segments.size(); e += 3) {  // dq_i [rows x D] += scale * dS_i [rows x kc] . k
          const int64_t src = buf.segments[e], offset = buf.segments[e + 1], count = buf.segments[e + 2];
          gemm('N', 'T', dim, count, kc, alpha, kblk, dim, dscores + offset, nq, 1.f, dqp + src * bs * dim, dim);
        }
      }
    }
  };

  if (kv_num.size(0) >= at::get_num_threads()) {
    // Enough (batch, head) pairs for every thread: one task per head does all of it in one pass over its key
    // blocks, S and dS computed once (5 GEMMs per block pair instead of 7); each head's sums run in a fixed order.
    at::parallel_for(0, kv_num.size(0), 1, [&](int64_t begin, int64_t end) {
      KeyBuffers buf(cap, bs, dim, groups != nullptr);
      for (int64_t head_row = begin; head_row < end; ++head_row) {
        for (int64_t j = 0; j < qb; ++j) key_block(head_row * qb + j, buf, true);
      }
    });
    return;
  }

  // Pass 1: dQ, one query block per task.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer kbuf(cap * dim), vbuf(cap * dim), scores(bs * cap), dprob(bs * cap);
    std::vector<int32_t> chunk_groups(groups ? cap : 0), query_groups(groups ? bs : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t head_row = r / qb, i = r % qb, batch = head_row / heads;
      const int64_t n = nump[r], m = std::min(bs, seq_len - i * bs);  // m: real queries of this block
      TORCH_CHECK(n >= 0 && n <= kmax, "kv_num out of range");
      const int64_t* list = idxp + r * kmax;
      const float* q = qp + r * bs * dim;
      const float* dout = dop + r * bs * dim;
      const float* row_lse = lsep + r * bs;
      const float* row_delta = deltap + r * bs;
      if (groups) {
        for (int64_t x = 0; x < m; ++x) query_groups[x] = groups[batch * seq_len + i * bs + x];
      }
      int64_t listed = 0;
      while (listed < n) {
        const int64_t keys = gather_chunk(list, n, listed, head_row, batch, qb, bs, dim, seq_len, kp, vp, keep,
                                          groups, kbuf.data(), vbuf.data(), chunk_groups.data());
        if (keys == 0) continue;
        // scores [m x keys] (row-major) = scale * q . k^T; dprob [m x keys] = dout . v^T
        gemm('T', 'N', keys, m, dim, alpha, kbuf.data(), dim, q, dim, 0.f, scores.data(), keys);
        gemm('T', 'N', keys, m, dim, 1.f, vbuf.data(), dim, dout, dim, 0.f, dprob.data(), keys);
        for (int64_t x = 0; x < m; ++x) {
          float* s = scores.data() + x * keys;
          const float* dp = dprob.data() + x * keys;
          if (groups) {
            for (int64_t t = 0; t < keys; ++t) {
              if (chunk_groups[t] > query_groups[x]) s[t] = kUnseen;
            }
          }
          grad_scores(s, dp, keys, row_lse[x], row_delta[x]);
        }
        // dq [m x D] += scale * dS [m x keys] . k [keys x D]
        gemm('N', 'N', dim, m, keys, alpha, kbuf.data(), dim, scores.data(), keys, 1.f, dqp + r * bs * dim, dim);
      }
    }
  });

  // Pass 2: dK and dV, one key block per task, over the query blocks that keep it.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    KeyBuffers buf(cap, bs, dim, groups != nullptr);
    for (int64_t r = begin; r < end; ++r) key_block(r, buf, false);
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
  m.def("block_sparse_attention_backward_cpu", &block_sparse_attention_backward_cpu,
        "Gradients of block-sparse flash attention on the CPU (dq, dk, dv)");
  m.def("block_mass_rows", &block_mass_rows, "Softmax mass of query rows per key block (cached's search)");
}
