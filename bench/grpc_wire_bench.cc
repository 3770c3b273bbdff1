// The wire's ceiling on this host: how fast gRPC moves a request's bytes over loopback, with
// nothing else in the way. An in-process AttentionService whose Attend and AttendStream only
// copy the request's tensor bytes into a buffer and answer `--out_mb` of output; the client
// sends `--in_mb` of input as one unary message, as AttendStream chunks, and as chunks split
// over `--connections` TCP connections at once. Prints GB/s of payload (in + out) per mode.
//
//   grpc_wire_bench --in_mb=402 --out_mb=268 --chunk_mb=4 --connections=4 --reps=3
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "ringattn/v1/attention.grpc.pb.h"

ABSL_FLAG(int64_t, in_mb, 402, "request payload, MiB");
ABSL_FLAG(int64_t, out_mb, 268, "response payload, MiB");
ABSL_FLAG(int64_t, chunk_mb, 4, "stream chunk, MiB");
ABSL_FLAG(int, connections, 4, "connections of the parallel mode");
ABSL_FLAG(int, reps, 3, "repetitions per mode (the best is printed)");
ABSL_FLAG(bool, tuned, false, "raise HTTP/2 frame size and windows on both sides");

namespace v1 = ringattn::v1;

namespace {

using Clock = std::chrono::steady_clock;

void Tune(grpc::ChannelArguments* args) {
  args->SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 16 << 20);
  args->SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args->SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  args->SetInt(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20);
}

class SinkService final : public v1::AttentionService::Service {
 public:
  explicit SinkService(int64_t out_bytes) : out_(out_bytes, 'o') {}

  grpc::Status Attend(grpc::ServerContext*, const v1::AttendRequest* request,
                      v1::AttendResponse* response) override {
    std::string sink(request->q().data().size(), '\0');
    std::memcpy(sink.data(), request->q().data().data(), sink.size());
    response->mutable_out()->set_data(out_);
    return grpc::Status::OK;
  }

  // Reads chunks into a buffer; then answers its share of out_ in chunks of the same size.
  // The header's request_id says which share: "i/n".
  grpc::Status AttendStream(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::AttendStreamResponse, v1::AttendStreamRequest>* stream)
      override {
    v1::AttendStreamRequest msg;
    std::string sink;
    int64_t chunk = 4 << 20;
    int part = 0, parts = 1;
    while (stream->Read(&msg)) {
      if (msg.has_header()) {
        std::sscanf(msg.header().request_id().c_str(), "%d/%d/%ld", &part, &parts, &chunk);
        continue;
      }
      const std::string& d = msg.chunk().data();
      if (sink.size() < msg.chunk().offset() + d.size()) {
        sink.resize(msg.chunk().offset() + d.size());
      }
      std::memcpy(sink.data() + msg.chunk().offset(), d.data(), d.size());
    }
    const int64_t share = static_cast<int64_t>(out_.size()) / parts;
    v1::AttendStreamResponse r;
    r.mutable_header();
    stream->Write(r);
    for (int64_t off = 0; off < share; off += chunk) {
      v1::AttendStreamResponse c;
      const int64_t n = std::min(chunk, share - off);
      c.mutable_chunk()->set_offset(off);
      c.mutable_chunk()->set_data(out_.data() + part * share + off, n);
      stream->Write(c);
    }
    return grpc::Status::OK;
  }

 private:
  const std::string out_;
};

std::shared_ptr<grpc::Channel> Channel(const std::string& target, int id, bool tuned) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt("ringattn.wire_bench_connection", id);  // a connection of its own
  if (tuned) Tune(&args);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

// Sends in[begin, end) as chunks on one AttendStream and receives its share of the output.
int64_t StreamPart(v1::AttentionService::Stub& stub, const std::string& in, int64_t begin,
                   int64_t end, int64_t chunk, int part, int parts) {
  grpc::ClientContext ctx;
  auto stream = stub.AttendStream(&ctx);
  v1::AttendStreamRequest header;
  header.mutable_header()->set_request_id(absl::StrCat(part, "/", parts, "/", chunk));
  stream->Write(header);
  for (int64_t off = begin; off < end; off += chunk) {
    v1::AttendStreamRequest c;
    const int64_t n = std::min(chunk, end - off);
    c.mutable_chunk()->set_offset(off - begin);
    c.mutable_chunk()->set_data(in.data() + off, n);
    stream->Write(c);
  }
  stream->WritesDone();
  v1::AttendStreamResponse r;
  int64_t got = 0;
  while (stream->Read(&r)) {
    if (r.has_chunk()) got += static_cast<int64_t>(r.chunk().data().size());
  }
  const grpc::Status s = stream->Finish();
  if (!s.ok()) std::fprintf(stderr, "stream: %s\n", s.error_message().c_str());
  return got;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t in_bytes = absl::GetFlag(FLAGS_in_mb) << 20;
  const int64_t out_bytes = absl::GetFlag(FLAGS_out_mb) << 20;
  const int64_t chunk = absl::GetFlag(FLAGS_chunk_mb) << 20;
  const int conns = std::max(1, absl::GetFlag(FLAGS_connections));
  const bool tuned = absl::GetFlag(FLAGS_tuned);

  SinkService service(out_bytes);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  if (tuned) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 16 << 20);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20);
  }
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  const std::string target = absl::StrCat("127.0.0.1:", port);

  const std::string in(in_bytes, 'i');
  std::vector<std::unique_ptr<v1::AttentionService::Stub>> stubs;
  for (int i = 0; i < conns; ++i) {
    stubs.push_back(v1::AttentionService::NewStub(Channel(target, i, tuned)));
  }
  const double gb = static_cast<double>(in_bytes + out_bytes) / 1e9;
  std::printf("payload %.3f GB (in %.3f, out %.3f), chunk %ld MiB, tuned %d, %u cores\n", gb,
              in_bytes / 1e9, out_bytes / 1e9, static_cast<long>(chunk >> 20), tuned,
              std::thread::hardware_concurrency());
  std::printf("%-22s %10s %10s\n", "mode", "best ms", "GB/s");

  auto time = [&](const char* name, auto&& fn) {
    double best = 1e30;
    for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
      const auto t0 = Clock::now();
      fn();
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::printf("%-22s %10.1f %10.2f\n", name, best * 1e3, gb / best);
  };

  time("unary", [&] {
    v1::AttendRequest req;
    req.mutable_q()->set_data(in);
    v1::AttendResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = stubs[0]->Attend(&ctx, req, &resp);
    if (!s.ok()) std::fprintf(stderr, "unary: %s\n", s.error_message().c_str());
  });
  time("stream", [&] { StreamPart(*stubs[0], in, 0, in_bytes, chunk, 0, 1); });
  time(absl::StrCat("stream x", conns, " connections").c_str(), [&] {
    std::vector<std::thread> threads;
    for (int i = 0; i < conns; ++i) {
      threads.emplace_back([&, i] {
        const int64_t begin = in_bytes * i / conns, end = in_bytes * (i + 1) / conns;
        StreamPart(*stubs[i], in, begin, end, chunk, i, conns);
      });
    }
    for (auto& t : threads) t.join();
  });
  server->Shutdown();
  return 0;
}
