// The comparison run: every case through every selected implementation at every world size,
// errors against the fp64 reference (or the baseline), the metrics, the tolerance checks, and
// one JSON line per measured run in <out_dir>/results.jsonl (bench/compare/report.py turns it
// into the Markdown report, the JSON summary and the plots).
//
// results.jsonl: the first line is {"type": "meta", ...} (machine, tolerances, methods), then
// {"type": "case", ...} per case (its reference), {"type": "run", ...} per implementation,
// world size and pass ("fwd" or "bwd"), and last {"type": "summary", ...}.
// A run's "status" is "ok", "not_available" (the implementation is not in this build or
// machine), "unsupported" (it refuses the case's options) or "error"; its "check" is "pass",
// "fail" or "unchecked" (nothing to compare with).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/compare/cases.h"

namespace ringattn::compare {

struct ComparisonOptions {
  CaseSet cases;
  // Implementation names in the order given; empty: cases.default_implementations. Single-device
  // implementations run before rings, so that the first one that runs is the baseline.
  std::vector<std::string> implementations;
  std::string out_dir = "out/comparison";
  uint64_t seed = 1;
  // Multiplies the tool's own error bounds (not the seed's): below 1 tightens them. 1 in normal
  // use; the breach test runs with a tiny scale to show that a breach fails the run.
  double tolerance_scale = 1.0;
  std::string command_line;  // recorded in the meta line
};

struct ComparisonSummary {
  int runs = 0;  // measured (status ok)
  int passed = 0;
  int failed = 0;  // tolerance breached
  int errors = 0;  // an implementation failed
  int unchecked = 0;
  int not_available = 0;  // (implementation, case, pass) triples
  int unsupported = 0;
  std::string results_path;
  // Something ran, nothing failed and no implementation errored.
  bool ok() const { return runs > 0 && failed == 0 && errors == 0; }
};

// Runs the comparison, writing progress lines to `log`. An error status is for the run itself
// (bad options, output not writable); results of implementations are in the summary.
absl::StatusOr<ComparisonSummary> RunComparison(const ComparisonOptions& options,
                                                std::ostream& log);

}  // namespace ringattn::compare
