// Runs the fuzz target without libFuzzer (any compiler, in CI): over seed inputs made from valid
// and near-valid requests, then over seeded random mutations of them (bit flips, truncations,
// splices), each input once. scripts/fuzz.sh builds the same target with clang's libFuzzer for
// open-ended fuzzing.
//   request_fuzz_replay [iterations] [seed]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "ringattn/v1/attention.pb.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

ringattn::v1::Tensor TensorOf(int64_t b, int64_t s, int64_t h, int64_t d, bool with_data) {
  ringattn::v1::Tensor t;
  t.set_dtype(ringattn::v1::DTYPE_FP32);
  for (int64_t x : {b, s, h, d}) t.add_shape(x);
  if (with_data) t.set_data(std::string(b * s * h * d * 4, '\x01'));
  return t;
}

std::vector<std::string> Seeds() {
  std::vector<std::string> seeds;
  ringattn::v1::AttendRequest a;
  *a.mutable_q() = TensorOf(1, 3, 2, 64, true);
  *a.mutable_k() = TensorOf(1, 3, 1, 64, true);
  *a.mutable_v() = TensorOf(1, 3, 1, 64, true);
  a.mutable_options()->set_causal(true);
  a.mutable_options()->set_window_right(INT64_MAX);
  seeds.push_back(std::string(1, '\0') + a.SerializeAsString());
  ringattn::v1::AttendRequest shm = a;
  shm.mutable_q()->clear_data();
  shm.mutable_q()->mutable_shm()->set_region("r");
  shm.mutable_q()->mutable_shm()->set_byte_size(3 * 2 * 64 * 4);
  seeds.push_back(std::string(1, '\0') + shm.SerializeAsString());
  ringattn::v1::AttendBackwardRequest b;
  *b.mutable_q() = a.q();
  *b.mutable_k() = a.k();
  *b.mutable_v() = a.v();
  *b.mutable_out() = a.q();
  *b.mutable_dout() = a.q();
  b.mutable_lse()->set_dtype(ringattn::v1::DTYPE_FP32);
  for (int64_t x : {1, 2, 3}) b.mutable_lse()->add_shape(x);
  b.mutable_lse()->set_data(std::string(24, '\0'));
  seeds.push_back(std::string(1, '\1') + b.SerializeAsString());
  // A stream: header, then q, k, v in one chunk each (lengths < 256 per message).
  ringattn::v1::AttendStreamRequest h;
  *h.mutable_header()->mutable_q() = TensorOf(1, 1, 1, 64, false);
  *h.mutable_header()->mutable_k() = TensorOf(1, 1, 1, 64, false);
  *h.mutable_header()->mutable_v() = TensorOf(1, 1, 1, 64, false);
  std::string stream(1, '\2');
  auto add = [&](const ringattn::v1::AttendStreamRequest& m) {
    const std::string bytes = m.SerializeAsString();
    stream.push_back(static_cast<char>(bytes.size()));
    stream += bytes;
  };
  add(h);
  for (auto which : {ringattn::v1::TensorChunk::WHICH_Q, ringattn::v1::TensorChunk::WHICH_K,
                     ringattn::v1::TensorChunk::WHICH_V}) {
    ringattn::v1::AttendStreamRequest c;
    c.mutable_chunk()->set_tensor(which);
    c.mutable_chunk()->set_data(std::string(128, '\x02'));
    add(c);
    c.mutable_chunk()->set_offset(128);
    add(c);
  }
  seeds.push_back(stream);
  return seeds;
}

}  // namespace

int main(int argc, char** argv) {
  const long iterations = argc > 1 ? std::atol(argv[1]) : 20000;
  const unsigned long seed = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 20261207;
  const std::vector<std::string> seeds = Seeds();
  for (const std::string& s : seeds) {
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }
  std::mt19937_64 rng(seed);
  for (long i = 0; i < iterations; ++i) {
    std::string in = seeds[rng() % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 8);
    for (int e = 0; e < edits && !in.empty(); ++e) {
      switch (rng() % 4) {
        case 0: in[rng() % in.size()] ^= static_cast<char>(1u << (rng() % 8)); break;
        case 1: in[rng() % in.size()] = static_cast<char>(rng()); break;
        case 2: in.resize(rng() % (in.size() + 1)); break;
        default: {
          const std::string& other = seeds[rng() % seeds.size()];
          const size_t from = rng() % other.size();
          in.insert(rng() % (in.size() + 1), other.substr(from, rng() % 64));
        }
      }
    }
    if (in.empty()) continue;
    in[0] = seeds[rng() % seeds.size()][0];  // keep a valid path byte most of the time
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(in.data()), in.size());
  }
  std::printf("request_fuzz_replay: %zu seeds and %ld mutations (seed %lu), no crash\n",
              seeds.size(), iterations, seed);
  return 0;
}
