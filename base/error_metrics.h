// Error of a computed tensor against a reference: what the tests assert on and the comparison
// framework reports. NaN on one side only is counted and makes the comparison fail; NaN on both
// (a row the contract makes NaN, reference_attention.h) is exact.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/strings/str_format.h"
#include "kernels/dtype.h"

namespace ringattn {

struct ErrorStats {
  double max_abs = 0;    // max |got - ref| over finite pairs
  double mean_abs = 0;   // mean |got - ref|
  double rel_l2 = 0;     // ||got - ref|| / ||ref|| (the absolute L2 norm when ||ref|| is 0)
  int64_t count = 0;
  int64_t nan_count = 0;    // NaN in got where ref is not, or in ref where got is not
  int64_t inf_mismatch = 0; // one side infinite and the other not, or opposite infinities

  bool Within(double rel_l2_tol, double max_abs_tol) const {
    return nan_count == 0 && inf_mismatch == 0 && rel_l2 <= rel_l2_tol && max_abs <= max_abs_tol;
  }
  std::string ToString() const {
    return absl::StrFormat("max_abs=%.3g mean_abs=%.3g rel_l2=%.3g n=%d nan=%d inf_mismatch=%d",
                           max_abs, mean_abs, rel_l2, count, nan_count, inf_mismatch);
  }
};

// Accumulates pairs one at a time; equal infinities (e.g. -inf LSE of fully masked rows on
// both sides) and NaN on both sides count as exact.
class ErrorAccumulator {
 public:
  void Add(double got, double ref) {
    ++stats_.count;
    if (std::isnan(got) || std::isnan(ref)) {
      if (std::isnan(got) != std::isnan(ref)) ++stats_.nan_count;
      return;
    }
    if (std::isinf(got) || std::isinf(ref)) {
      if (got != ref) ++stats_.inf_mismatch;
      return;
    }
    const double e = std::fabs(got - ref);
    stats_.max_abs = e > stats_.max_abs ? e : stats_.max_abs;
    sum_abs_ += e;
    sum_sq_err_ += e * e;
    sum_sq_ref_ += ref * ref;
  }
  ErrorStats Finish() const {
    ErrorStats s = stats_;
    s.mean_abs = s.count > 0 ? sum_abs_ / static_cast<double>(s.count) : 0.0;
    s.rel_l2 = sum_sq_ref_ > 0 ? std::sqrt(sum_sq_err_ / sum_sq_ref_) : std::sqrt(sum_sq_err_);
    return s;
  }

 private:
  ErrorStats stats_;
  double sum_abs_ = 0, sum_sq_err_ = 0, sum_sq_ref_ = 0;
};

// Errors of `got` (n elements of type dtype) against `ref` (n elements).
template <typename Ref>
ErrorStats CompareTensor(const void* got, DType dtype, const Ref* ref, int64_t n) {
  ErrorAccumulator acc;
  for (int64_t i = 0; i < n; ++i) acc.Add(LoadAsFloat(got, i, dtype), static_cast<double>(ref[i]));
  return acc.Finish();
}

}  // namespace ringattn
