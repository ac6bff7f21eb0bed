// CPU kernels that XLA:CPU cannot express in one pass, called through the XLA FFI (`cpu_kernels.py` builds
// this file with the system C++ compiler on first use and registers the handlers).
//
// DeepLabDepthwiseFilterGrad: the filter gradient of a k x k depthwise convolution,
//   dkernel[i * kw + j, c] = sum over b, p, q of x_padded[b, p * stride + i * rate, q * stride + j * rate, c]
//                                                * dy[b, p, q, c],
// for x_padded `[B, Hp, Wp, C]` (the convolution's input, already padded) and dy `[B, H, W, C]`, f32.
// Written with XLA's own operations it is k*k separate reductions, each reading x_padded and dy again from
// memory; here every output row of dy is read once, with the k rows of x_padded it meets, while they are in
// cache. Rows are split into chunks that XLA's intra-op thread pool and the calling thread take in turn;
// each row is summed in float and the rows in double.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Aliases: a template argument list's comma would split the handler macro's arguments.
using Image = ffi::Buffer<ffi::F32, 4>;
using Matrix = ffi::Buffer<ffi::F32, 2>;

namespace {

struct FilterGradJob {
  const float* x_padded;
  const float* dy;
  int64_t batch, padded_h, padded_w, channels, out_h, out_w;
  int64_t kernel_h, kernel_w, stride, rate;
  int64_t rows_per_chunk, num_chunks;
  std::vector<std::vector<double>> chunk_sums;  // [num_chunks][kernel_h * kernel_w * channels]
  std::atomic<int64_t> next_chunk{0};
  std::mutex mutex;
  std::condition_variable all_done;
  int64_t chunks_done = 0;

  void SumChunk(int64_t chunk) {
    const int64_t taps = kernel_h * kernel_w, c_count = channels;
    std::vector<float> row_sums(taps * c_count);
    std::vector<double>& sums = chunk_sums[chunk];
    sums.assign(taps * c_count, 0.0);
    const int64_t first = chunk * rows_per_chunk;
    const int64_t last = std::min(batch * out_h, first + rows_per_chunk);
    for (int64_t row = first; row < last; ++row) {
      const int64_t b = row / out_h, p = row % out_h;
      std::fill(row_sums.begin(), row_sums.end(), 0.0f);
      const float* __restrict dy_row = dy + (b * out_h + p) * out_w * c_count;
      for (int64_t i = 0; i < kernel_h; ++i) {
        const float* x_row = x_padded + (b * padded_h + p * stride + i * rate) * padded_w * c_count;
        for (int64_t j = 0; j < kernel_w; ++j) {
          float* __restrict tap_sums = row_sums.data() + (i * kernel_w + j) * c_count;
          for (int64_t q = 0; q < out_w; ++q) {
            const float* __restrict x_pixel = x_row + (q * stride + j * rate) * c_count;
            const float* __restrict dy_pixel = dy_row + q * c_count;
            for (int64_t c = 0; c < c_count; ++c) tap_sums[c] += x_pixel[c] * dy_pixel[c];
          }
        }
      }
      for (int64_t t = 0; t < taps * c_count; ++t) sums[t] += row_sums[t];
    }
  }

  // Takes chunks until none is left; the caller waits for the ones taken, never for a task to start.
  void TakeChunks() {
    for (int64_t chunk = next_chunk.fetch_add(1); chunk < num_chunks; chunk = next_chunk.fetch_add(1)) {
      SumChunk(chunk);
      std::lock_guard<std::mutex> lock(mutex);
      if (++chunks_done == num_chunks) all_done.notify_all();
    }
  }
};

ffi::Error DepthwiseFilterGrad(ffi::ThreadPool pool, Image x_padded, Image dy, ffi::Result<Matrix> dkernel,
                               int64_t kernel_h, int64_t kernel_w, int64_t stride, int64_t rate) {
  auto x_dims = x_padded.dimensions(), dy_dims = dy.dimensions(), dk_dims = dkernel->dimensions();
  auto job = std::make_shared<FilterGradJob>();
  job->x_padded = x_padded.typed_data();
  job->dy = dy.typed_data();
  job->batch = x_dims[0], job->padded_h = x_dims[1], job->padded_w = x_dims[2], job->channels = x_dims[3];
  job->out_h = dy_dims[1], job->out_w = dy_dims[2];
  job->kernel_h = kernel_h, job->kernel_w = kernel_w, job->stride = stride, job->rate = rate;
  if (kernel_h < 1 || kernel_w < 1 || stride < 1 || rate < 1 || dy_dims[0] != job->batch ||
      dy_dims[3] != job->channels || dk_dims[0] != kernel_h * kernel_w || dk_dims[1] != job->channels ||
      (job->out_h - 1) * stride + (kernel_h - 1) * rate >= job->padded_h ||
      (job->out_w - 1) * stride + (kernel_w - 1) * rate >= job->padded_w) {
    return ffi::Error::InvalidArgument(
        "DeepLabDepthwiseFilterGrad: shapes do not match a " + std::to_string(kernel_h) + "x" +
        std::to_string(kernel_w) + " depthwise conv at stride " + std::to_string(stride) + ", rate " +
        std::to_string(rate) + " (x_padded [B, Hp, Wp, C], dy [B, H, W, C], dkernel [kh * kw, C]).");
  }
  const int64_t rows = job->batch * job->out_h;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * threads));
  job->rows_per_chunk = std::max<int64_t>(1, (rows + num_chunks - 1) / num_chunks);
  job->num_chunks = rows == 0 ? 0 : (rows + job->rows_per_chunk - 1) / job->rows_per_chunk;
  job->chunk_sums.resize(job->num_chunks);
  for (int64_t t = 1; t < threads && t < job->num_chunks; ++t) pool.Schedule([job] { job->TakeChunks(); });
  job->TakeChunks();
  {
    std::unique_lock<std::mutex> lock(job->mutex);
    job->all_done.wait(lock, [&] { return job->chunks_done == job->num_chunks; });
  }
  float* out = dkernel->typed_data();
  for (int64_t t = 0; t < kernel_h * kernel_w * job->channels; ++t) {
    double total = 0.0;
    for (const auto& sums : job->chunk_sums) total += sums[t];
    out[t] = static_cast<float>(total);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeepLabDepthwiseFilterGrad, DepthwiseFilterGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Image>()
                                  .Arg<Image>()
                                  .Ret<Matrix>()
                                  .Attr<int64_t>("kernel_h")
                                  .Attr<int64_t>("kernel_w")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("rate"));
