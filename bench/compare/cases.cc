#include "bench/compare/cases.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"
#include "kernels/params_check.h"
#include "ring/layout.h"

namespace ringattn::compare {
namespace {

// ---- Presets ----------------------------------------------------------------------------------

ComparisonCase Case(std::string name, int batch, int64_t seqlen, int heads, int heads_k,
                    int head_dim, DType dtype, bool causal) {
  ComparisonCase c;
  c.name = std::move(name);
  c.batch = batch;
  c.seqlen = seqlen;
  c.heads = heads;
  c.heads_k = heads_k;
  c.head_dim = head_dim;
  c.dtype = dtype;
  c.causal = causal;
  return c;
}

// Tiny CPU sizes at awkward lengths; the whole preset (fp64 reference included) runs in well
// under two minutes on two cores.
CaseSet CiPreset() {
  CaseSet set;
  set.name = "ci";
  set.default_implementations = {"single_cpu", "ring_cpu"};
  ComparisonCase c = Case("fp32_full_s1000", 1, 1000, 4, 4, 64, DType::kF32, false);
  set.cases.push_back(c);
  // A sequence-length sweep at one shape: the throughput-vs-length plot.
  // Gradients at the shortest length only, which keeps the preset's time down.
  for (int64_t s : {512, 1024, 2048}) {
    c = Case(absl::StrCat("bf16_causal_gqa_s", s), 1, s, 8, 2, 64, DType::kBF16, true);
    c.backward = s == 512;
    c.repeats = s == 2048 ? 3 : 5;
    set.cases.push_back(c);
  }
  c = Case("fp16_causal_stripe_d128", 2, 383, 5, 5, 128, DType::kF16, true);
  c.layout = "stripe";
  c.worlds = {1, 3};
  set.cases.push_back(c);
  c = Case("bf16_window_softcap_alibi_mqa", 1, 768, 4, 1, 64, DType::kBF16, true);
  c.window_left = 128;
  c.window_right = 0;
  c.softcap = 30.0f;
  c.alibi = true;
  set.cases.push_back(c);
  // Packed variable-length sequences: an empty one, single tokens, boundaries inside shards.
  c = Case("bf16_causal_packed_gqa", 1, 900, 8, 2, 64, DType::kBF16, true);
  c.cu_seqlens = {0, 1, 7, 300, 300, 900};
  c.worlds = {1, 2, 3};
  set.cases.push_back(c);
  return set;
}

// Single-device check only: every single-device implementation the machine has, against the
// fp64 reference, at sizes where the reference is quick.
CaseSet QuickPreset() {
  CaseSet set;
  set.name = "quick";
  set.default_implementations = {"single_cudnn", "single_cuda", "single_cpu"};
  std::vector<ComparisonCase> cases = {
      Case("bf16_causal_gqa_d128", 1, 1024, 8, 2, 128, DType::kBF16, true),
      Case("fp16_full_s777", 1, 777, 4, 4, 64, DType::kF16, false),
      Case("bf16_full_b2", 2, 512, 8, 8, 64, DType::kBF16, false),
  };
  for (ComparisonCase& c : cases) {
    c.worlds = {1};
    c.warmup = 2;
    c.repeats = 10;
    set.cases.push_back(c);
  }
  return set;
}

// The reference shapes (bf16) plus one more length for the sweep, at ring sizes 1, 2 and 4
// (in-process ranks on one GPU), and two small cases whose errors are taken against fp64.
CaseSet GpuPreset() {
  CaseSet set;
  set.name = "gpu";
  set.default_implementations = {"single_cudnn", "single_cuda", "ring_cudnn", "ring_cuda"};
  // The two ref_s2048 cases: forward 1.7e10 (full) and 8.6e9 (causal) FLOPs, backward 2.5x.
  // The limit admits both backwards, so the GPU gradients are checked against fp64 (about a
  // minute of CPU each); every other case is far above it.
  set.reference_flop_limit = 5e10;
  std::vector<ComparisonCase> cases;
  for (bool causal : {false, true}) {
    const std::string mask = causal ? "causal" : "full";
    cases.push_back(
        Case(absl::StrCat("ref_s2048_d128_", mask), 1, 2048, 8, 8, 128, DType::kBF16, causal));
  }
  struct Shape {
    int b;
    int64_t s;
    int h, d;
  };
  for (const Shape& x :
       {Shape{1, 8192, 32, 128}, Shape{1, 16384, 32, 128}, Shape{1, 32768, 32, 128},
        Shape{1, 16384, 16, 64}, Shape{4, 4096, 32, 128}}) {
    for (bool causal : {false, true}) {
      if (x.s == 16384 && x.h == 32 && !causal) continue;  // sweep point: causal only
      cases.push_back(Case(
          absl::StrFormat("b%d_s%d_h%d_d%d_%s", x.b, x.s, x.h, x.d, causal ? "causal" : "full"),
          x.b, x.s, x.h, x.h, x.d, DType::kBF16, causal));
    }
  }
  for (ComparisonCase& c : cases) {
    c.warmup = 3;
    c.repeats = 20;
    set.cases.push_back(c);
  }
  return set;
}

// Real multi-GPU rings (ring_nccl_*: a GPU per rank over NCCL) beside one GPU running the whole
// sequence, at the shape of the NCCL scaling runs (docs/performance.md: causal zigzag, h32 hk8
// d128 bf16) with 8k and 16k tokens per GPU, so the whole sequence grows with W. One case per
// (W, tokens per GPU), each needing W GPUs (skipped on a machine with fewer); W = 2, 4, 8. And a
// small correctness case at an awkward length with GQA 4:1 whose forward and gradients are
// checked against fp64 at every W the machine has (W above its GPU count reports "not
// available"). Meant to finish within about five minutes on two H100s; most of the time is the
// fp64 reference of the small case on the CPU.
CaseSet MultiGpuPreset() {
  CaseSet set;
  set.name = "multigpu";
  set.default_implementations = {"single_cudnn", "single_cuda", "ring_nccl_cudnn",
                                 "ring_nccl_cuda"};
  // The correctness case's forward is 1.5e10 FLOPs and its backward 3.7e10: both references
  // (about 15 s and 40 s on one core) fit under this, none of the sized cases does.
  set.reference_flop_limit = 4e10;
  ComparisonCase c = Case("check_s3816_h8_hk2_d64", 1, 3816, 8, 2, 64, DType::kBF16, true);
  c.layout = "zigzag";
  c.worlds = {2, 4, 8};
  c.warmup = 1;
  c.repeats = 3;
  set.cases.push_back(c);
  for (int world : {2, 4, 8}) {
    for (int64_t per_gpu : {8192, 16384}) {
      c = Case(absl::StrFormat("w%d_%dk_per_gpu_h32_hk8_d128", world, per_gpu / 1024), 1,
               world * per_gpu, 32, 8, 128, DType::kBF16, true);
      c.layout = "zigzag";
      c.worlds = {world};
      c.gpus = world;
      c.warmup = 2;
      c.repeats = 5;
      set.cases.push_back(c);
    }
  }
  return set;
}

// ---- Parsing ----------------------------------------------------------------------------------

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

absl::StatusOr<int64_t> ParseInt(std::string_view key, std::string_view v) {
  int64_t x = 0;
  v = Trim(v);
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || end != v.data() + v.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(key), ": expected an integer, got '", std::string(v), "'"));
  }
  return x;
}

absl::StatusOr<double> ParseDouble(std::string_view key, std::string_view v) {
  double x = 0;
  v = Trim(v);
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || end != v.data() + v.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(key), ": expected a number, got '", std::string(v), "'"));
  }
  return x;
}

absl::StatusOr<bool> ParseBool(std::string_view key, std::string_view v) {
  v = Trim(v);
  if (v == "true" || v == "1" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "no") return false;
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(key), ": expected true or false, got '", std::string(v), "'"));
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(std::string_view key, std::string_view v) {
  std::vector<int64_t> out;
  while (true) {
    const size_t comma = v.find(',');
    RA_ASSIGN_OR_RETURN(int64_t x, ParseInt(key, v.substr(0, comma)));
    out.push_back(x);
    if (comma == std::string_view::npos) break;
    v.remove_prefix(comma + 1);
  }
  return out;
}

absl::StatusOr<int> ParseSmallInt(std::string_view key, std::string_view v) {
  RA_ASSIGN_OR_RETURN(int64_t x, ParseInt(key, v));
  if (x < INT32_MIN || x > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(key), ": ", x, " is out of range"));
  }
  return static_cast<int>(x);
}

absl::StatusOr<DType> ParseDType(std::string_view v) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (v == DTypeName(t)) return t;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("dtype: expected fp32, fp16 or bf16, got '", std::string(v), "'"));
}

// Sets one field of `c` from its textual value (list values comma-separated).
absl::Status SetField(ComparisonCase& c, std::string_view key, std::string_view value) {
  if (key == "name") {
    c.name = std::string(value);
  } else if (key == "batch") {
    RA_ASSIGN_OR_RETURN(c.batch, ParseSmallInt(key, value));
  } else if (key == "seqlen") {
    RA_ASSIGN_OR_RETURN(c.seqlen, ParseInt(key, value));
  } else if (key == "heads") {
    RA_ASSIGN_OR_RETURN(c.heads, ParseSmallInt(key, value));
  } else if (key == "heads_k") {
    RA_ASSIGN_OR_RETURN(c.heads_k, ParseSmallInt(key, value));
  } else if (key == "head_dim") {
    RA_ASSIGN_OR_RETURN(c.head_dim, ParseSmallInt(key, value));
  } else if (key == "dtype") {
    RA_ASSIGN_OR_RETURN(c.dtype, ParseDType(value));
  } else if (key == "causal") {
    RA_ASSIGN_OR_RETURN(c.causal, ParseBool(key, value));
  } else if (key == "window") {
    RA_ASSIGN_OR_RETURN(std::vector<int64_t> w, ParseIntList(key, value));
    if (w.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("window: expected left,right, got '", std::string(value), "'"));
    }
    c.window_left = w[0];
    c.window_right = w[1];
  } else if (key == "softcap") {
    RA_ASSIGN_OR_RETURN(double s, ParseDouble(key, value));
    c.softcap = static_cast<float>(s);
  } else if (key == "alibi") {
    RA_ASSIGN_OR_RETURN(c.alibi, ParseBool(key, value));
  } else if (key == "cu_seqlens") {
    RA_ASSIGN_OR_RETURN(c.cu_seqlens, ParseIntList(key, value));
  } else if (key == "layout") {
    c.layout = std::string(value);
  } else if (key == "worlds") {
    RA_ASSIGN_OR_RETURN(std::vector<int64_t> w, ParseIntList(key, value));
    c.worlds.clear();
    for (int64_t x : w) c.worlds.push_back(static_cast<int>(std::clamp<int64_t>(x, -1, 1 << 20)));
  } else if (key == "warmup") {
    RA_ASSIGN_OR_RETURN(c.warmup, ParseSmallInt(key, value));
  } else if (key == "repeats") {
    RA_ASSIGN_OR_RETURN(c.repeats, ParseSmallInt(key, value));
  } else if (key == "backward") {
    RA_ASSIGN_OR_RETURN(c.backward, ParseBool(key, value));
  } else if (key == "gpus") {
    RA_ASSIGN_OR_RETURN(c.gpus, ParseSmallInt(key, value));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown key '", std::string(key),
        "'; expected name, batch, seqlen, heads, heads_k, head_dim, dtype, causal, window, "
        "softcap, alibi, cu_seqlens, layout, worlds, warmup, repeats, backward, gpus"));
  }
  return absl::OkStatus();
}

// `key=value key=value ...`.
absl::Status ParseKeyValueLine(std::string_view line, ComparisonCase& c) {
  std::istringstream in{std::string(line)};
  std::string token;
  while (in >> token) {
    const size_t eq = token.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat("expected key=value, got '", token, "'"));
    }
    RA_RETURN_IF_ERROR(
        SetField(c, std::string_view(token).substr(0, eq), std::string_view(token).substr(eq + 1)));
  }
  return absl::OkStatus();
}

// A flat JSON object whose values are strings, numbers, booleans or arrays of numbers. Arrays
// become comma-separated text, so both line forms share SetField.
class FlatJsonParser {
 public:
  explicit FlatJsonParser(std::string_view text) : s_(text) {}

  absl::Status Parse(ComparisonCase& c) {
    RA_RETURN_IF_ERROR(Expect('{'));
    SkipSpace();
    if (Peek() == '}') return Finish();
    while (true) {
      RA_ASSIGN_OR_RETURN(std::string key, ParseString());
      RA_RETURN_IF_ERROR(Expect(':'));
      RA_ASSIGN_OR_RETURN(std::string value, ParseValue());
      RA_RETURN_IF_ERROR(SetField(c, key, value));
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      break;
    }
    RA_RETURN_IF_ERROR(Expect('}'));
    return Finish();
  }

 private:
  char Peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void SkipSpace() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("JSON: ", std::string(what), " at column ", pos_ + 1));
  }
  absl::Status Expect(char ch) {
    SkipSpace();
    if (Peek() != ch) return Error(absl::StrCat("expected '", std::string(1, ch), "'"));
    ++pos_;
    return absl::OkStatus();
  }
  absl::Status Finish() {
    SkipSpace();
    return pos_ == s_.size() ? absl::OkStatus() : Error("trailing text");
  }
  absl::StatusOr<std::string> ParseString() {
    RA_RETURN_IF_ERROR(Expect('"'));
    std::string out;
    while (pos_ < s_.size() && s_[pos_] != '"') {
      if (s_[pos_] == '\\') return Error("escapes are not supported");
      out.push_back(s_[pos_++]);
    }
    if (pos_ == s_.size()) return Error("unterminated string");
    ++pos_;
    return out;
  }
  // A bare token: number, true, false.
  std::string ParseBare() {
    const size_t begin = pos_;
    while (pos_ < s_.size() && std::string_view(",]} \t").find(s_[pos_]) == std::string::npos) {
      ++pos_;
    }
    return std::string(s_.substr(begin, pos_ - begin));
  }
  absl::StatusOr<std::string> ParseValue() {
    SkipSpace();
    if (Peek() == '"') return ParseString();
    if (Peek() != '[') {
      std::string v = ParseBare();
      if (v.empty()) return Error("expected a value");
      return v;
    }
    ++pos_;
    std::string joined;
    SkipSpace();
    while (Peek() != ']') {
      SkipSpace();
      std::string v = ParseBare();
      if (v.empty()) return Error("expected a number in the array");
      if (!joined.empty()) joined.push_back(',');
      joined += v;
      SkipSpace();
      if (Peek() == ',')
        ++pos_;
      else if (Peek() != ']')
        return Error("expected ',' or ']'");
    }
    ++pos_;
    return joined;
  }

  std::string_view s_;
  size_t pos_ = 0;
};

}  // namespace

std::vector<std::string> PresetNames() { return {"ci", "quick", "gpu", "multigpu"}; }

std::string_view PresetDescription(std::string_view preset) {
  if (preset == "ci") {
    return "tiny CPU sizes at awkward lengths, rings of 1-4 ranks; under 2 minutes on 2 cores";
  }
  if (preset == "quick") {
    return "single-device implementations only, against the fp64 reference (quick validation)";
  }
  if (preset == "gpu") {
    return "reference shapes (bf16) at W = 1, 2, 4 in-process ranks on one GPU";
  }
  if (preset == "multigpu") {
    return "rings over NCCL with a GPU per rank, W = 2, 4, 8 up to the GPUs present, 8k and 16k "
           "tokens per GPU, plus an fp64-checked case (set NCCL_NVLS_ENABLE=0)";
  }
  return "";
}

absl::StatusOr<CaseSet> PresetCases(std::string_view preset) {
  CaseSet set;
  if (preset == "ci") {
    set = CiPreset();
  } else if (preset == "quick") {
    set = QuickPreset();
  } else if (preset == "gpu") {
    set = GpuPreset();
  } else if (preset == "multigpu") {
    set = MultiGpuPreset();
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown preset '", std::string(preset),
                                                   "'; expected one of ci, quick, gpu, multigpu"));
  }
  for (ComparisonCase& c : set.cases) RA_RETURN_IF_ERROR(ValidateCase(c));
  return set;
}

absl::StatusOr<std::vector<ComparisonCase>> ParseCases(std::string_view text) {
  std::vector<ComparisonCase> cases;
  int line_number = 0;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    const std::string_view line = Trim(text.substr(0, nl));
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    ++line_number;
    if (line.empty() || line.front() == '#') continue;
    ComparisonCase c;
    absl::Status s =
        line.front() == '{' ? FlatJsonParser(line).Parse(c) : ParseKeyValueLine(line, c);
    if (s.ok()) s = ValidateCase(c);
    if (!s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("case file line ", line_number, ": ", s.message()));
    }
    cases.push_back(std::move(c));
  }
  if (cases.empty()) return absl::InvalidArgumentError("case file has no cases");
  return cases;
}

absl::StatusOr<CaseSet> LoadCaseFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read case file '", path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  RA_ASSIGN_OR_RETURN(CaseSet set, PresetCases("quick"));
  set.name = path;
  set.default_implementations = {"single_cudnn", "single_cuda", "single_cpu",
                                 "ring_cudnn",   "ring_cuda",   "ring_cpu"};
  RA_ASSIGN_OR_RETURN(set.cases, ParseCases(text.str()));
  return set;
}

absl::Status ValidateCase(ComparisonCase& c) {
  if (c.batch < 1)
    return absl::InvalidArgumentError(absl::StrCat("batch must be >= 1, got ", c.batch));
  if (c.seqlen < 1) {
    return absl::InvalidArgumentError(absl::StrCat("seqlen must be >= 1, got ", c.seqlen));
  }
  if (c.heads < 1)
    return absl::InvalidArgumentError(absl::StrCat("heads must be >= 1, got ", c.heads));
  if (c.heads_k < 0 || c.heads % c.kv_heads() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("heads (", c.heads, ") must be a multiple of heads_k (", c.heads_k, ")"));
  }
  RA_RETURN_IF_ERROR(ValidateHeadDim(c.head_dim));
  if (!c.cu_seqlens.empty()) {
    RA_RETURN_IF_ERROR(CheckSequenceBounds(c.cu_seqlens.data(), c.cu_seqlens.size(), "cu_seqlens",
                                           "seqlen", c.seqlen));
  }
  if (c.window_left < -1 || c.window_right < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("window must be left,right with each >= 0 or "
                     "-1 (unbounded), got ",
                     c.window_left, ",", c.window_right));
  }
  if (!(c.softcap >= 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("softcap must be >= 0, got ", c.softcap));
  }
  if (c.layout != "auto") RA_RETURN_IF_ERROR(ParseLayout(c.layout).status());
  if (c.worlds.empty()) return absl::InvalidArgumentError("worlds must list at least one size");
  for (int w : c.worlds) {
    if (w < 1 || w > 64) {
      return absl::InvalidArgumentError(absl::StrCat("worlds: ", w, " is not in [1, 64]"));
    }
  }
  if (c.warmup < 0)
    return absl::InvalidArgumentError(absl::StrCat("warmup must be >= 0, got ", c.warmup));
  if (c.repeats < 1) {
    return absl::InvalidArgumentError(absl::StrCat("repeats must be >= 1, got ", c.repeats));
  }
  if (c.gpus < 0 || c.gpus > 64) {
    return absl::InvalidArgumentError(absl::StrCat("gpus: ", c.gpus, " is not in [0, 64]"));
  }
  if (c.name.empty()) c.name = CaseShape(c);
  for (char& ch : c.name) {
    if (std::isspace(static_cast<unsigned char>(ch)) || ch == '"' || ch == '\\') ch = '_';
  }
  return absl::OkStatus();
}

std::string CaseShape(const ComparisonCase& c) {
  std::string s = absl::StrFormat("b%d s%d h%d/%d d%d %s", c.batch, c.seqlen, c.heads, c.kv_heads(),
                                  c.head_dim, std::string(DTypeName(c.dtype)));
  if (c.causal) absl::StrAppend(&s, " causal");
  if (c.window_left >= 0 || c.window_right >= 0) {
    absl::StrAppend(&s, " window(", c.window_left, ",", c.window_right, ")");
  }
  if (c.softcap > 0) absl::StrAppend(&s, " softcap", c.softcap);
  if (c.alibi) absl::StrAppend(&s, " alibi");
  if (!c.cu_seqlens.empty()) absl::StrAppend(&s, " packed", c.cu_seqlens.size() - 1);
  return s;
}

}  // namespace ringattn::compare
