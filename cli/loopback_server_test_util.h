// For tests: a gRPC service of the test's own on a free 127.0.0.1 port, shut down on
// destruction (2 s grace).
#pragma once

#include <grpcpp/grpcpp.h>

#include <climits>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace ringattn {

template <typename Service>
class LoopbackServer {
 public:
  template <typename... Args>
  explicit LoopbackServer(Args&&... args) : service_(std::forward<Args>(args)...) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    builder.SetMaxReceiveMessageSize(INT_MAX);
    server_ = builder.BuildAndStart();
  }
  ~LoopbackServer() {
    if (server_ != nullptr) server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  }
  LoopbackServer(const LoopbackServer&) = delete;
  LoopbackServer& operator=(const LoopbackServer&) = delete;

  bool started() const { return server_ != nullptr && port_ > 0; }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  Service& service() { return service_; }

 private:
  Service service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace ringattn
