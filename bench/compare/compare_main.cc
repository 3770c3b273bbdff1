// `ringattn_compare`: puts implementations of the same attention side by side on correctness and
// speed (the seed's comparison framework). This file only turns flags into options; the work is
// in runner.h. Exit code: 0 when something ran and every check passed, 1 when a tolerance was
// breached or an implementation failed (or nothing could run), 2 for bad flags.
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/compare/cases.h"
#include "bench/compare/implementations.h"
#include "bench/compare/runner.h"

ABSL_FLAG(std::string, preset, "ci", "built-in case set: ci, quick, gpu or multigpu (see --list)");
ABSL_FLAG(std::string, cases, "",
          "case file (bench/compare/cases.h describes it); overrides --preset");
ABSL_FLAG(std::vector<std::string>, implementations, {},
          "comma-separated implementations to run (default: the case set's; 'all' for every one)");
ABSL_FLAG(std::string, out, "out/comparison", "output directory for results.jsonl");
ABSL_FLAG(std::vector<std::string>, worlds, {},
          "ring sizes for every case, e.g. 1,2,4 (default: each case's own)");
ABSL_FLAG(int, warmup, -1, "untimed calls before the timed ones (default: each case's)");
ABSL_FLAG(int, repeats, -1, "timed calls (default: each case's)");
ABSL_FLAG(double, reference_flop_limit, -1,
          "compute the fp64 CPU reference only for cases under this many forward FLOPs "
          "(default: the case set's)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the synthetic inputs");
ABSL_FLAG(double, tolerance_scale, 1.0,
          "multiplies the tool's own error bounds (not the seed's); below 1 tightens them");
ABSL_FLAG(bool, list, false, "print the presets and the implementations, then exit");

namespace {

constexpr char kUsage[] =
    "Compares attention implementations on correctness and speed.\n"
    "  ringattn_compare --preset ci --out out/comparison      CPU: single_cpu vs ring_cpu\n"
    "  ringattn_compare --preset gpu                           GPU: cuDNN, ours, rings\n"
    "  NCCL_NVLS_ENABLE=0 ringattn_compare --preset multigpu   rings over NCCL, a GPU per rank\n"
    "  ringattn_compare --cases my_cases.txt --implementations single_cpu,ring_cpu\n"
    "Writes <out>/results.jsonl; bench/compare/report.py makes the Markdown report and plots.";

void PrintList(std::ostream& out) {
  out << "presets:\n";
  for (const std::string& p : ringattn::compare::PresetNames()) {
    out << absl::StrFormat("  %-9s %s\n", p, std::string(ringattn::compare::PresetDescription(p)));
  }
  out << "implementations:\n";
  const ringattn::compare::ImplementationRegistry registry =
      ringattn::compare::BuiltinImplementations();
  for (const std::string& name : registry.Names()) {
    auto impl = registry.Make(name);
    if (!impl.ok()) continue;
    const absl::Status available = (*impl)->Available();
    out << absl::StrFormat(
        "  %-16s %s\n  %-16s [%s%s]\n", name, std::string((*impl)->description()), "",
        available.ok() ? "available" : "not available: ", std::string(available.message()));
  }
  out << ringattn::compare::MachineDescription() << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() > 1) {
    std::cerr << "unexpected argument '" << args[1] << "'\n" << kUsage << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_list)) {
    PrintList(std::cout);
    return 0;
  }

  ringattn::compare::ComparisonOptions options;
  const std::string case_file = absl::GetFlag(FLAGS_cases);
  absl::StatusOr<ringattn::compare::CaseSet> set =
      case_file.empty() ? ringattn::compare::PresetCases(absl::GetFlag(FLAGS_preset))
                        : ringattn::compare::LoadCaseFile(case_file);
  if (!set.ok()) {
    std::cerr << "error: " << set.status() << "\n";
    return 2;
  }
  options.cases = *std::move(set);

  std::vector<int> worlds;
  for (const std::string& w : absl::GetFlag(FLAGS_worlds)) {
    int x = 0;
    if (!absl::SimpleAtoi(w, &x)) {
      std::cerr << "error: --worlds: '" << w << "' is not an integer\n";
      return 2;
    }
    worlds.push_back(x);
  }
  for (ringattn::compare::ComparisonCase& c : options.cases.cases) {
    if (!worlds.empty()) c.worlds = worlds;
    if (absl::GetFlag(FLAGS_warmup) >= 0) c.warmup = absl::GetFlag(FLAGS_warmup);
    if (absl::GetFlag(FLAGS_repeats) >= 0) c.repeats = absl::GetFlag(FLAGS_repeats);
    if (absl::Status s = ringattn::compare::ValidateCase(c); !s.ok()) {
      std::cerr << "error: case " << c.name << ": " << s << "\n";
      return 2;
    }
  }
  if (absl::GetFlag(FLAGS_reference_flop_limit) >= 0) {
    options.cases.reference_flop_limit = absl::GetFlag(FLAGS_reference_flop_limit);
  }
  options.implementations = absl::GetFlag(FLAGS_implementations);
  if (options.implementations.size() == 1 && options.implementations[0] == "all") {
    options.implementations = ringattn::compare::BuiltinImplementations().Names();
  }
  options.out_dir = absl::GetFlag(FLAGS_out);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.tolerance_scale = absl::GetFlag(FLAGS_tolerance_scale);
  if (!(options.tolerance_scale > 0)) {
    std::cerr << "error: --tolerance_scale must be > 0\n";
    return 2;
  }
  std::vector<std::string> argv_strings(argv, argv + argc);
  options.command_line = absl::StrJoin(argv_strings, " ");

  std::cout << "ringattn_compare: case set " << options.cases.name << "; "
            << ringattn::compare::MachineDescription() << "\n";
  absl::StatusOr<ringattn::compare::ComparisonSummary> summary =
      ringattn::compare::RunComparison(options, std::cout);
  if (!summary.ok()) {
    std::cerr << "error: " << summary.status() << "\n";
    return absl::IsInvalidArgument(summary.status()) ? 2 : 1;
  }
  std::cout << absl::StrFormat(
      "\nsummary: %d runs: %d passed, %d failed, %d unchecked; %d errors; %d not available, %d "
      "unsupported\nresults: %s\n",
      summary->runs, summary->passed, summary->failed, summary->unchecked, summary->errors,
      summary->not_available, summary->unsupported, summary->results_path);
  if (summary->runs == 0) std::cout << "nothing ran: no selected implementation is available\n";
  std::cout << (summary->ok() ? "check: PASS\n" : "check: FAIL\n");
  return summary->ok() ? 0 : 1;
}
