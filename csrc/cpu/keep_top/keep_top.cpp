// ATen glue for pxkern::keep_top on the CPU: checks arguments, views the tensors as the
// core's parts and allocates the kept masks (shaped like the scores).
#include "keep_top.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace pxkern {

namespace {

using Result = std::tuple<std::vector<at::Tensor>, at::Tensor>;

// [count, nan_index] as an int64 tensor: ints that depend on the values are tensors, so
// that the op's fake (pxkern/ops/keep_top.py) can describe them.
at::Tensor counts(int64_t kept, int64_t nan_index) {
  at::Tensor out = at::empty({2}, at::kLong);
  out[0] = kept;
  out[1] = nan_index;
  return out;
}

template <typename T>
Result run(const std::vector<at::Tensor>& scores, const std::vector<at::Tensor>& masks,
           double density, bool per_tensor, bool keep_ties) {
  std::vector<keep_top::Part<T>> parts;
  for (size_t i = 0; i < scores.size(); ++i)
    parts.push_back({scores[i].const_data_ptr<T>(), masks.empty() ? nullptr : masks[i].const_data_ptr<bool>(),
                     scores[i].numel()});
  const int64_t nan_part = keep_top::first_nan(parts);
  if (nan_part >= 0) return {std::vector<at::Tensor>{}, counts(0, nan_part)};
  std::vector<at::Tensor> kept;
  std::vector<bool*> outputs;
  for (const at::Tensor& s : scores) {
    kept.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
    outputs.push_back(kept.back().mutable_data_ptr<bool>());
  }
  int64_t total = 0;
  if (per_tensor) {
    for (size_t i = 0; i < parts.size(); ++i) {
      const std::vector<keep_top::Part<T>> one{parts[i]};
      total += keep_top::keep_above(one, keep_top::threshold_for(one, density), keep_ties, {outputs[i]});
    }
  } else {
    total = keep_top::keep_above(parts, keep_top::threshold_for(parts, density), keep_ties, outputs);
  }
  return {kept, counts(total, -1)};
}

}  // namespace

// Returns (kept masks, [how many kept, -1]), or ([], [0, i]) if scores[i] holds a NaN
// (the caller names it). Scores are made contiguous; masks, if given, are bool and shaped like
// the scores.
Result keep_top_cpu(at::TensorList scores_in, at::TensorList masks_in, double density, bool per_tensor,
                    bool keep_ties) {
  TORCH_CHECK(!scores_in.empty(), "keep_top: scores must not be empty");
  TORCH_CHECK(density > 0.0 && density <= 1.0, "keep_top: density must be in (0, 1], got ", density);
  TORCH_CHECK(masks_in.empty() || masks_in.size() == scores_in.size(),
              "keep_top: give one mask per score tensor or none");
  const at::ScalarType dtype = scores_in[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "keep_top: scores must be float32 or float64, got ",
              dtype);
  std::vector<at::Tensor> scores, masks;
  for (size_t i = 0; i < scores_in.size(); ++i) {
    const at::Tensor& s = scores_in[i];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == dtype,
                "keep_top: every score tensor must be a CPU tensor of one dtype; scores[", i, "] is ",
                s.scalar_type(), " on ", s.device());
    scores.push_back(s.contiguous());
    if (!masks_in.empty()) {
      const at::Tensor& m = masks_in[i];
      TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kBool && m.sizes() == s.sizes(),
                  "keep_top: masks[", i, "] must be a bool CPU tensor shaped like scores[", i, "]");
      masks.push_back(m.contiguous());
    }
  }
  return dtype == at::kFloat ? run<float>(scores, masks, density, per_tensor, keep_ties)
                             : run<double>(scores, masks, density, per_tensor, keep_ties);
}

TORCH_LIBRARY_IMPL(pxkern, CPU, m) { m.impl("keep_top", &keep_top_cpu); }

}  // namespace pxkern
