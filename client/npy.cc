#include "client/npy.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ringattn {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;
// Magic, two version bytes and a header length of 2 (version 1) or 4 (versions 2, 3) bytes.
constexpr size_t kLongestPreamble = kMagicSize + 2 + 4;
// NumPy pads the preamble and header to a multiple of this, so the data is aligned.
constexpr size_t kHeaderAlignment = 64;

// The fixed-size start of a .npy file.
struct Preamble {
  int major = 0;
  int minor = 0;
  size_t header_start = 0;  // offset of the header dict
  size_t header_length = 0;
};

absl::Status FileError(const std::string& name, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(name, ": ", what));
}

// Parses the preamble from the first bytes of a file (at most kLongestPreamble are needed).
absl::StatusOr<Preamble> ParsePreamble(std::string_view prefix, const std::string& name) {
  if (prefix.size() < kMagicSize + 2 || std::memcmp(prefix.data(), kMagic, kMagicSize) != 0) {
    return FileError(name, "not a .npy file (it does not start with \\x93NUMPY)");
  }
  Preamble p;
  p.major = static_cast<unsigned char>(prefix[kMagicSize]);
  p.minor = static_cast<unsigned char>(prefix[kMagicSize + 1]);
  if (p.major < 1 || p.major > 3 || p.minor != 0) {
    return FileError(name, absl::StrCat("unsupported .npy format version ", p.major, ".", p.minor,
                                        " (1.0, 2.0 and 3.0 are supported)"));
  }
  const size_t length_bytes = p.major == 1 ? 2 : 4;
  p.header_start = kMagicSize + 2 + length_bytes;
  if (prefix.size() < p.header_start) {
    return FileError(name, "truncated: the file ends inside the header length");
  }
  for (size_t i = 0; i < length_bytes; ++i) {  // little-endian
    p.header_length |= static_cast<size_t>(static_cast<unsigned char>(prefix[kMagicSize + 2 + i]))
                       << (8 * i);
  }
  return p;
}

// What the header dict says.
struct HeaderDict {
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
};

// A parser for the Python literal NumPy writes as the header, e.g.
// "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }" padded with spaces and '\n'.
class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : text_(text) {}

  // On error, returns a message without the file name.
  absl::StatusOr<HeaderDict> Parse() {
    HeaderDict dict;
    bool have_descr = false, have_order = false, have_shape = false;
    SkipSpace();
    if (!Consume('{')) return Error("the header is not a dict");
    while (true) {
      SkipSpace();
      if (Consume('}')) break;
      absl::StatusOr<std::string> key = ParseString();
      if (!key.ok()) return key.status();
      SkipSpace();
      if (!Consume(':')) return Error(absl::StrCat("expected ':' after '", *key, "'"));
      SkipSpace();
      absl::Status s;
      if (*key == "descr" && !have_descr) {
        have_descr = true;
        absl::StatusOr<std::string> v = ParseString();
        if (v.ok()) dict.descr = *v;
        s = v.status();
      } else if (*key == "fortran_order" && !have_order) {
        have_order = true;
        absl::StatusOr<bool> v = ParseBool();
        if (v.ok()) dict.fortran_order = *v;
        s = v.status();
      } else if (*key == "shape" && !have_shape) {
        have_shape = true;
        absl::StatusOr<std::vector<int64_t>> v = ParseShape();
        if (v.ok()) dict.shape = *v;
        s = v.status();
      } else {
        return Error(absl::StrCat("unexpected or repeated key '", *key, "'"));
      }
      if (!s.ok()) return s;
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume('}')) break;
      return Error("expected ',' or '}' in the dict");
    }
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected characters after the dict");
    if (!have_descr) return Error("the header has no 'descr'");
    if (!have_order) return Error("the header has no 'fortran_order'");
    if (!have_shape) return Error("the header has no 'shape'");
    return dict;
  }

 private:
  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed header at character ", pos_, ": ", what));
  }

  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\t' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  bool ConsumeWord(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  absl::StatusOr<std::string> ParseString() {
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      return Error("expected a quoted string");
    }
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == std::string_view::npos) return Error("unterminated string");
    std::string s(text_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return s;
  }

  absl::StatusOr<bool> ParseBool() {
    if (ConsumeWord("True")) return true;
    if (ConsumeWord("False")) return false;
    return Error("expected True or False");
  }

  absl::StatusOr<std::vector<int64_t>> ParseShape() {
    if (!Consume('(')) return Error("expected a tuple for 'shape'");
    std::vector<int64_t> shape;
    while (true) {
      SkipSpace();
      if (Consume(')')) break;
      if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') {
        return Error("expected a non-negative integer in 'shape'");
      }
      int64_t d = 0;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
        const int digit = text_[pos_++] - '0';
        if (d > (std::numeric_limits<int64_t>::max() - digit) / 10) {
          return Error("dimension in 'shape' too large");
        }
        d = d * 10 + digit;
      }
      shape.push_back(d);
      SkipSpace();
      if (Consume(',')) continue;
      if (Consume(')')) break;
      return Error("expected ',' or ')' in 'shape'");
    }
    return shape;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

std::string ShapeTuple(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

// Bytes of `shape` elements of `element_size`, or -1 on overflow.
int64_t DataBytes(const std::vector<int64_t>& shape, int element_size) {
  int64_t n = element_size;
  for (const int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

// Checks the header dict and returns the array it describes, without data. Sets
// *data_bytes to the data size its shape implies.
absl::StatusOr<NpyArray> ArrayFromHeader(std::string_view header_text, const std::string& name,
                                         int64_t* data_bytes) {
  absl::StatusOr<HeaderDict> dict = HeaderParser(header_text).Parse();
  if (!dict.ok()) return FileError(name, std::string(dict.status().message()));
  NpyArray array;
  if (dict->descr == "<f4") {
    array.dtype = DType::kF32;
  } else if (dict->descr == "<f2") {
    array.dtype = DType::kF16;
  } else {
    return FileError(name, absl::StrCat("dtype '", dict->descr,
                                        "' is not supported; expected '<f4' (float32) or '<f2' "
                                        "(float16); for bf16 save float32 and convert with "
                                        "--dtype bf16"));
  }
  if (dict->fortran_order) {
    return FileError(name,
                     "fortran_order is True; only C-order arrays are supported "
                     "(save np.ascontiguousarray(x))");
  }
  array.shape = std::move(dict->shape);
  *data_bytes = DataBytes(array.shape, DTypeSize(array.dtype));
  if (*data_bytes < 0) {
    return FileError(name, absl::StrCat("shape ", ShapeTuple(array.shape), " is too large"));
  }
  return array;
}

absl::Status DataSizeError(const std::string& name, const NpyArray& array, int64_t got,
                           int64_t expected) {
  return FileError(name,
                   absl::StrCat("data has ", got, " bytes; shape ", ShapeTuple(array.shape), " of ",
                                std::string(DTypeName(array.dtype)), " needs ", expected));
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

absl::Status ReadExactly(std::FILE* f, int64_t offset, size_t n, char* out,
                         const std::string& path) {
  if (std::fseek(f, static_cast<long>(offset), SEEK_SET) != 0 ||  // NOLINT(runtime/int)
      std::fread(out, 1, n, f) != n) {
    return FileError(path, absl::StrCat("read of ", n, " bytes at offset ", offset, " failed"));
  }
  return absl::OkStatus();
}

}  // namespace

int64_t NpyArray::num_elements() const {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<NpyArray> ParseNpy(const std::string& bytes, const std::string& name) {
  const std::string_view all(bytes);
  absl::StatusOr<Preamble> preamble = ParsePreamble(all.substr(0, kLongestPreamble), name);
  if (!preamble.ok()) return preamble.status();
  const size_t header_end = preamble->header_start + preamble->header_length;
  if (header_end > all.size()) {
    return FileError(name, absl::StrCat("truncated: the header needs ", header_end,
                                        " bytes, the file has ", all.size()));
  }
  int64_t data_bytes = 0;
  absl::StatusOr<NpyArray> array = ArrayFromHeader(
      all.substr(preamble->header_start, preamble->header_length), name, &data_bytes);
  if (!array.ok()) return array.status();
  const int64_t got = static_cast<int64_t>(all.size() - header_end);
  if (got != data_bytes) return DataSizeError(name, *array, got, data_bytes);
  array->data.assign(all.substr(header_end));
  return array;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (f == nullptr) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return FileError(path, absl::StrCat("cannot open: ", std::strerror(err)));
  }
  if (std::fseek(f.get(), 0, SEEK_END) != 0) return FileError(path, "cannot seek");
  const int64_t file_size = std::ftell(f.get());
  if (file_size < 0) return FileError(path, "cannot tell its size");

  std::string prefix(static_cast<size_t>(std::min<int64_t>(file_size, kLongestPreamble)), '\0');
  if (absl::Status s = ReadExactly(f.get(), 0, prefix.size(), prefix.data(), path); !s.ok()) {
    return s;
  }
  absl::StatusOr<Preamble> preamble = ParsePreamble(prefix, path);
  if (!preamble.ok()) return preamble.status();
  const int64_t header_end = static_cast<int64_t>(preamble->header_start + preamble->header_length);
  if (header_end > file_size) {
    return FileError(path, absl::StrCat("truncated: the header needs ", header_end,
                                        " bytes, the file has ", file_size));
  }
  std::string header(preamble->header_length, '\0');
  if (absl::Status s =
          ReadExactly(f.get(), preamble->header_start, header.size(), header.data(), path);
      !s.ok()) {
    return s;
  }
  int64_t data_bytes = 0;
  absl::StatusOr<NpyArray> array = ArrayFromHeader(header, path, &data_bytes);
  if (!array.ok()) return array.status();
  if (file_size - header_end != data_bytes) {
    return DataSizeError(path, *array, file_size - header_end, data_bytes);
  }
  array->data.resize(static_cast<size_t>(data_bytes));
  if (absl::Status s =
          ReadExactly(f.get(), header_end, array->data.size(), array->data.data(), path);
      !s.ok()) {
    return s;
  }
  return array;
}

absl::StatusOr<std::string> EncodeNpy(const NpyArray& array, int major_version) {
  if (major_version < 0 || major_version > 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("npy major_version must be 0 (auto), 1 or 2, got ", major_version));
  }
  const char* descr;
  switch (array.dtype) {
    case DType::kF32:
      descr = "<f4";
      break;
    case DType::kF16:
      descr = "<f2";
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("npy has no ",
                                                     std::string(DTypeName(array.dtype)),
                                                     " type; convert to fp32 before writing"));
  }
  for (const int64_t d : array.shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("npy shape ", ShapeTuple(array.shape), " has a negative dimension"));
    }
  }
  const int64_t expected = DataBytes(array.shape, DTypeSize(array.dtype));
  if (expected < 0 || static_cast<int64_t>(array.data.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("npy data has ", array.data.size(), " bytes; shape ", ShapeTuple(array.shape),
                     " of ", std::string(DTypeName(array.dtype)), " needs ", expected));
  }
  const std::string dict = absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, ",
                                        "'shape': ", ShapeTuple(array.shape), ", }");
  // The header is the dict, space padding and '\n', so that the data starts aligned.
  const auto padded_length = [&](size_t preamble) {
    const size_t unpadded = preamble + dict.size() + 1;
    return (unpadded + kHeaderAlignment - 1) / kHeaderAlignment * kHeaderAlignment - preamble;
  };
  int major = major_version;
  if (major == 0) major = padded_length(kMagicSize + 4) <= 0xffff ? 1 : 2;
  const size_t preamble = kMagicSize + 2 + (major == 1 ? 2 : 4);
  const size_t header_length = padded_length(preamble);
  if (major == 1 && header_length > 0xffff) {
    return absl::InvalidArgumentError("npy header too long for format version 1.0");
  }

  std::string out;
  out.reserve(preamble + header_length + array.data.size());
  out.append(kMagic, kMagicSize);
  out.push_back(static_cast<char>(major));
  out.push_back(0);
  for (size_t i = 0; i < preamble - kMagicSize - 2; ++i) {
    out.push_back(static_cast<char>((header_length >> (8 * i)) & 0xff));
  }
  out.append(dict);
  out.append(header_length - dict.size() - 1, ' ');
  out.push_back('\n');
  out.append(array.data);
  return out;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array, int major_version) {
  absl::StatusOr<std::string> bytes = EncodeNpy(array, major_version);
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", bytes.status().message()));
  }
  File f(std::fopen(path.c_str(), "wb"));
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot open for writing: ", std::strerror(errno)));
  }
  if (std::fwrite(bytes->data(), 1, bytes->size(), f.get()) != bytes->size() ||
      std::fclose(f.release()) != 0) {
    return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace ringattn
