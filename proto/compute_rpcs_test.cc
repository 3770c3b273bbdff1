// The compute RPC tables against their messages (the naming contract of compute_rpcs.h), and the
// sizes of each tensor kind against hand-computed ones.
#include "proto/compute_rpcs.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/strings/ascii.h"
#include "google/protobuf/descriptor.h"
#include "proto/convert.h"

namespace ringattn {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;

const FieldDescriptor* FieldOf(const Descriptor* d, const std::string& name) {
  return d->FindFieldByName(name);
}

// Public request/response prototypes of each table, by its name.
struct Public {
  const google::protobuf::Message* request;
  const google::protobuf::Message* response;
};

Public PublicOf(const ComputeRpc& rpc) {
  if (rpc.name == "Attend") {
    return {&v1::AttendRequest::default_instance(), &v1::AttendResponse::default_instance()};
  }
  return {&v1::AttendBackwardRequest::default_instance(),
          &v1::AttendBackwardResponse::default_instance()};
}

void ExpectTensorField(const Descriptor* d, const std::string& name) {
  const FieldDescriptor* f = FieldOf(d, name);
  ASSERT_NE(f, nullptr) << d->full_name() << " has no " << name;
  EXPECT_EQ(f->message_type(), v1::Tensor::descriptor()) << d->full_name() << "." << name;
  EXPECT_FALSE(f->is_repeated());
}

void ExpectBytesField(const Descriptor* d, const std::string& name) {
  const FieldDescriptor* f = FieldOf(d, name);
  ASSERT_NE(f, nullptr) << d->full_name() << " has no " << name;
  EXPECT_EQ(f->type(), FieldDescriptor::TYPE_BYTES) << d->full_name() << "." << name;
}

class ComputeRpcTableTest : public ::testing::TestWithParam<const ComputeRpc*> {};

TEST_P(ComputeRpcTableTest, NamesAFieldOfEveryMessage) {
  const ComputeRpc& rpc = *GetParam();
  const Public pub = PublicOf(rpc);
  const Descriptor* shard_req = rpc.shard_request->GetDescriptor();
  const Descriptor* shard_resp = rpc.shard_response->GetDescriptor();
  for (const ComputeTensor& in : rpc.inputs) {
    SCOPED_TRACE(in.name);
    ExpectTensorField(pub.request->GetDescriptor(), in.name);
    ExpectBytesField(shard_req, in.name);
    EXPECT_EQ(in.wanted_if, nullptr) << "inputs are always sent";
    EXPECT_EQ(v1::TensorChunk::Which_Name(in.which), "WHICH_" + absl::AsciiStrToUpper(in.name));
  }
  for (const ComputeTensor& out : rpc.outputs) {
    SCOPED_TRACE(out.name);
    ExpectTensorField(pub.response->GetDescriptor(), out.name);
    ExpectBytesField(shard_resp, out.name);
    EXPECT_EQ(v1::TensorChunk::Which_Name(out.which), "WHICH_" + absl::AsciiStrToUpper(out.name));
    if (out.wanted_if != nullptr) {
      for (const Descriptor* d : {pub.request->GetDescriptor(), shard_req}) {
        const FieldDescriptor* flag = FieldOf(d, out.wanted_if);
        ASSERT_NE(flag, nullptr) << d->full_name() << " has no " << out.wanted_if;
        EXPECT_EQ(flag->type(), FieldDescriptor::TYPE_BOOL);
      }
    }
  }
  const FieldDescriptor* header = FieldOf(shard_req, "header");
  ASSERT_NE(header, nullptr);
  EXPECT_EQ(header->message_type(), v1::ShardHeader::descriptor());
  const FieldDescriptor* timing = FieldOf(shard_resp, "timing");
  ASSERT_NE(timing, nullptr);
  EXPECT_EQ(timing->message_type(), v1::WorkerTiming::descriptor());
  EXPECT_NE(rpc.call, nullptr);
  // Outputs into the caller's shared memory: map<string, SharedMemoryRef> output_shm.
  const FieldDescriptor* output_shm = FieldOf(pub.request->GetDescriptor(), "output_shm");
  ASSERT_NE(output_shm, nullptr) << rpc.name;
  ASSERT_TRUE(output_shm->is_map());
  EXPECT_EQ(output_shm->message_type()->map_value()->message_type(),
            v1::SharedMemoryRef::descriptor());
}

INSTANTIATE_TEST_SUITE_P(EveryRpc, ComputeRpcTableTest, ::testing::ValuesIn(ComputeRpcs()),
                         [](const auto& info) { return std::string(info.param->name); });

TEST(ComputeRpcTest, EveryTableIsListed) {
  ASSERT_EQ(ComputeRpcs().size(), 2u);
  EXPECT_EQ(ComputeRpcs()[0], &AttendRpc());
  EXPECT_EQ(ComputeRpcs()[1], &AttendBackwardRpc());
}

TEST(ComputeRpcTest, FoundByName) {
  EXPECT_EQ(&FindComputeRpc("Attend"), &AttendRpc());
  EXPECT_EQ(&FindComputeRpc("AttendBackward"), &AttendBackwardRpc());
  EXPECT_DEATH(FindComputeRpc("Nope"), "no compute RPC named 'Nope'");
}

TEST(ComputeRpcTest, AttendOrderAndKinds) {
  const ComputeRpc& rpc = AttendRpc();
  ASSERT_EQ(rpc.inputs.size(), 3u);
  EXPECT_STREQ(rpc.inputs[0].name, "q");
  EXPECT_EQ(rpc.inputs[1].kind, TensorKind::kKv);
  ASSERT_EQ(rpc.outputs.size(), 2u);
  EXPECT_STREQ(rpc.outputs[1].name, "lse");
  EXPECT_EQ(rpc.outputs[1].kind, TensorKind::kLse);
  // The stream's documented order: q, k, v, out, dout, lse in; dq, dk, dv out.
  const ComputeRpc& bwd = AttendBackwardRpc();
  std::string names;
  for (const ComputeTensor& t : bwd.inputs) names += std::string(t.name) + " ";
  EXPECT_EQ(names, "q k v out dout lse ");
}

TEST(ComputeRpcTest, WantsFollowsTheFlag) {
  v1::AttendRequest r;
  const ComputeTensor& out = AttendRpc().outputs[0];
  const ComputeTensor& lse = AttendRpc().outputs[1];
  EXPECT_TRUE(Wants(r, out));
  EXPECT_FALSE(Wants(r, lse));
  r.set_return_lse(true);
  EXPECT_TRUE(Wants(r, lse));
}

TEST(TensorKindTest, SizesAndViews) {
  // bf16, batch 2, 7 rows, 8 heads over 2 kv heads, head_dim 64.
  const AttentionShape s = AttentionShape::Self(DType::kBF16, 2, 7, 8, 2, 64);
  EXPECT_EQ(BytesOf(TensorKind::kQ, s), 2u * 7 * 8 * 64 * 2);
  EXPECT_EQ(BytesOf(TensorKind::kKv, s), 2u * 7 * 2 * 64 * 2);
  EXPECT_EQ(BytesOf(TensorKind::kLse, s), 2u * 8 * 7 * 4);
  EXPECT_EQ(RowsOf(TensorKind::kQ, s).outer, 2);
  EXPECT_EQ(RowsOf(TensorKind::kQ, s).row_bytes, 8u * 64 * 2);
  EXPECT_EQ(RowsOf(TensorKind::kKv, s).row_bytes, 2u * 64 * 2);
  EXPECT_EQ(RowsOf(TensorKind::kLse, s).outer, 16);
  EXPECT_EQ(RowsOf(TensorKind::kLse, s).row_bytes, 4u);
  EXPECT_EQ(DimsOf(TensorKind::kKv, s), (std::vector<int64_t>{2, 7, 2, 64}));
  EXPECT_EQ(DimsOf(TensorKind::kLse, s), (std::vector<int64_t>{2, 8, 7}));
  EXPECT_EQ(DTypeOf(TensorKind::kQ, s), v1::DTYPE_BF16);
  EXPECT_EQ(DTypeOf(TensorKind::kLse, s), v1::DTYPE_FP32);
  EXPECT_EQ(DescribeRows(TensorKind::kKv, s), "[batch=2, rows=7, heads_k=2, head_dim=64] bf16");
  EXPECT_EQ(DescribeRows(TensorKind::kLse, s), "[batch=2, heads=8, rows=7] fp32");
}

TEST(ReflectionTest, FieldsByName) {
  v1::AttendRequest r;
  r.mutable_k()->set_data("abc");
  EXPECT_TRUE(HasTensorField(r, "k"));
  EXPECT_FALSE(HasTensorField(r, "q"));
  EXPECT_EQ(TensorField(r, "k").data(), "abc");
  MutableTensorField(&r, "v")->set_data("xy");
  EXPECT_EQ(r.v().data(), "xy");
  EXPECT_EQ(TensorDataBytes(r, AttendRpc().inputs), 5);

  v1::RunShardBackwardRequest shard;
  SetBytesField(&shard, "dout", "12345");
  EXPECT_EQ(shard.dout(), "12345");
  EXPECT_EQ(&BytesField(shard, "dout"), &shard.dout());  // in place, no copy
  v1::RunShardBackwardResponse grads;
  char* dq = SizeBytesField(&grads, "dq", 6);
  dq[5] = 'x';
  EXPECT_EQ(grads.dq(), std::string(5, '\0') + "x");
  MutableShardHeader(&shard)->set_generation(7);
  EXPECT_EQ(shard.header().generation(), 7);
  v1::RunShardRequest fwd;
  SetBoolField(&fwd, "return_lse", true);
  EXPECT_TRUE(fwd.return_lse());
  EXPECT_TRUE(BoolField(fwd, "return_lse"));
  v1::RunShardResponse resp;
  resp.mutable_timing()->set_rank(3);
  EXPECT_EQ(ShardTiming(resp).rank(), 3);
  EXPECT_EQ(&ShardHeaderOf(shard), &shard.header());
}

TEST(ReflectionTest, OutputShmOfEveryRequestSortedByName) {
  v1::AttendBackwardRequest b;
  (*b.mutable_output_shm())["dv"].set_offset(3);
  (*b.mutable_output_shm())["dq"].set_region("r");
  const auto refs = OutputShm(b);
  ASSERT_EQ(refs.size(), 2u);
  EXPECT_EQ(refs[0].first, "dq");
  EXPECT_EQ(refs[0].second.region(), "r");
  EXPECT_EQ(refs[1].first, "dv");
  EXPECT_EQ(refs[1].second.offset(), 3);
  v1::AttendRequest a;
  EXPECT_TRUE(OutputShm(a).empty());
  (*a.mutable_output_shm())["out"].set_byte_size(9);
  EXPECT_EQ(OutputShm(a).at(0).second.byte_size(), 9);
}

TEST(StatusConversionTest, EveryCanonicalCodeAndMessageCrosses) {
  for (int c = 1; c <= 16; ++c) {
    const absl::Status s(static_cast<absl::StatusCode>(c), "why");
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(static_cast<int>(g.error_code()), c);
    EXPECT_EQ(g.error_message(), "why");
    EXPECT_EQ(FromGrpcStatus(g), s);
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("x")).error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::UNAVAILABLE, "y")).code(),
            absl::StatusCode::kUnavailable);
  // Outside the canonical codes: UNKNOWN, message kept.
  const grpc::Status odd(static_cast<grpc::StatusCode>(99), "odd");
  EXPECT_EQ(FromGrpcStatus(odd), absl::UnknownError("odd"));
  EXPECT_EQ(ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(42), "z")).error_code(),
            grpc::UNKNOWN);
}

TEST(ShapeProtoTest, RoundTripAndRefusals) {
  const AttentionShape s = AttentionShape::Self(DType::kF16, 3, 100, 8, 2, 128);
  absl::StatusOr<AttentionShape> back = ShapeFromProto(ShapeToProto(s));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, s);

  v1::Shape bad = ShapeToProto(s);
  bad.set_heads_k(0);
  EXPECT_EQ(ShapeFromProto(bad).status().message(), "shape.heads_k must be > 0, got 0");
  bad = ShapeToProto(s);
  bad.set_seqlen_q(-1);
  EXPECT_EQ(ShapeFromProto(bad).status().message(), "shape.seqlen_q must be >= 0, got -1");
  bad = ShapeToProto(s);
  bad.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(ShapeFromProto(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = ShapeToProto(s);
  bad.set_seqlen_q(int64_t{1} << 50);
  bad.set_seqlen_k(int64_t{1} << 50);
  EXPECT_EQ(ShapeFromProto(bad).status().message(), "shape is too large to address");
  // Empty sequences are a shape (a rank may hold no rows).
  bad = ShapeToProto(s);
  bad.set_seqlen_q(0);
  bad.set_seqlen_k(0);
  EXPECT_TRUE(ShapeFromProto(bad).ok());
}

}  // namespace
}  // namespace ringattn
