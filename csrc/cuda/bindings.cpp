// CUDA implementations of the flat-buffer ops behind the same names as the CPU ones
// (TORCH_LIBRARY_IMPL(mtbert, CUDA)): check the tensors with the CPU files' checks, then call the
// plain-CUDA launchers of launchers.h on the current stream and check the launch.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <string>
#include <vector>

#include "../adamw.h"
#include "../flat_buffer.h"
#include "launchers.h"

namespace mtbert {

namespace {

constexpr int64_t kGramPieceColumns = 1 << 16;
constexpr int64_t kAdamWPieceColumns = 1 << 16;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_cuda_sizes(const at::Tensor& grads, c10::IntArrayRef boundaries) {
  TORCH_CHECK(grads.device().is_cuda(), "grads must be a CUDA tensor here, got ", grads.device());
  TORCH_CHECK(grads.size(0) <= cuda::kMaxTasks, "grads must have at most ", cuda::kMaxTasks,
              " rows (tasks) on CUDA, got ", grads.size(0));
  TORCH_CHECK(static_cast<int64_t>(boundaries.size()) - 1 <= cuda::kMaxSegments, "boundaries must describe at most ",
              cuda::kMaxSegments, " segments on CUDA, got ", boundaries.size() - 1);
}

at::Tensor gradient_gram_cuda(const at::Tensor& grads, c10::IntArrayRef boundaries) {
  check_gram_args(grads, boundaries);
  check_cuda_sizes(grads, boundaries);
  const c10::cuda::CUDAGuard guard(grads.device());
  const int64_t K = grads.size(0), P = grads.size(1), C = static_cast<int64_t>(boundaries.size()) - 1;
  cuda::SegmentTable table;
  const int64_t pieces = cuda::make_segment_table(boundaries.data(), static_cast<int>(C), kGramPieceColumns, &table);
  at::Tensor partial = at::empty({std::max<int64_t>(pieces, 1), K, K}, grads.options().dtype(at::kDouble));
  at::Tensor out = at::empty({C, K, K}, grads.options().dtype(at::kDouble));
  check_launch(cuda::launch_gradient_gram(grads.data_ptr<float>(), K, P, table, pieces, partial.data_ptr<double>(),
                                          out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               "gradient_gram");
  return out;
}

void gradient_combine_cuda(const at::Tensor& grads, const at::Tensor& weights, c10::IntArrayRef boundaries,
                           at::Tensor& out) {
  check_combine_args(grads, weights, boundaries, out);
  check_cuda_sizes(grads, boundaries);
  const c10::cuda::CUDAGuard guard(grads.device());
  const int64_t K = grads.size(0), P = grads.size(1), C = static_cast<int64_t>(boundaries.size()) - 1;
  cuda::SegmentTable table;
  cuda::make_segment_table(boundaries.data(), static_cast<int>(C), 1, &table);
  check_launch(cuda::launch_gradient_combine(grads.data_ptr<float>(), K, P, table, weights.data_ptr<double>(),
                                             out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "gradient_combine");
}

void adamw_step_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& grad,
                     const at::Tensor& segments, double lr, double beta1, double beta2, double eps,
                     double weight_decay, bool correct_bias, c10::string_view formula_name) {
  const AdamWFormula formula = parse_formula(std::string(formula_name));
  check_adamw_args(param, exp_avg, exp_avg_sq, grad, segments, lr, beta1, beta2, eps, weight_decay);
  TORCH_CHECK(param.device().is_cuda(), "param must be a CUDA tensor here, got ", param.device());
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t* seg = segments.data_ptr<int64_t>();
  const std::vector<AdamWScalars> scalars =
      segment_scalars(seg, segments.size(0), formula, lr, beta1, beta2, eps, weight_decay, correct_bias);
  const std::vector<Piece> pieces = cut_segment_rows(seg, segments.size(0), kAdamWPieceColumns);
  if (pieces.empty()) return;
  // The tables go to the device in one copy, ordered on the current stream before the kernel.
  const int64_t piece_bytes = static_cast<int64_t>(pieces.size() * sizeof(Piece));
  const int64_t scalar_bytes = static_cast<int64_t>(scalars.size() * sizeof(AdamWScalars));
  const int64_t scalar_offset = (piece_bytes + 15) / 16 * 16;
  at::Tensor host = at::empty({scalar_offset + scalar_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), pieces.data(), piece_bytes);
  std::memcpy(host.data_ptr<uint8_t>() + scalar_offset, scalars.data(), scalar_bytes);
  at::Tensor device_tables = host.to(param.device(), /*non_blocking=*/true);
  const uint8_t* tables = device_tables.data_ptr<uint8_t>();
  check_launch(cuda::launch_adamw(param.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                                  grad.data_ptr<float>(), reinterpret_cast<const Piece*>(tables),
                                  static_cast<int64_t>(pieces.size()),
                                  reinterpret_cast<const AdamWScalars*>(tables + scalar_offset), formula,
                                  c10::cuda::getCurrentCUDAStream()),
               "adamw_step");
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert, CUDA, m) {
  m.impl("gradient_gram", &gradient_gram_cuda);
  m.impl("gradient_combine", &gradient_combine_cuda);
  m.impl("adamw_step", &adamw_step_cuda);
}

}  // namespace mtbert
