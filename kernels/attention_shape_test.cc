#include "kernels/attention_shape.h"

#include "gtest/gtest.h"
#include "kernels/attention_params.h"

namespace ringattn {
namespace {

TEST(AttentionShapeTest, DerivedSizesOfAGqaShape) {
  const AttentionShape s{DType::kBF16, 2, 7, 5, 8, 2, 64};
  EXPECT_EQ(s.elem_bytes(), 2u);
  EXPECT_EQ(s.q_row_elems(), 8 * 64);
  EXPECT_EQ(s.kv_row_elems(), 2 * 64);
  EXPECT_EQ(s.q_elems(), 2 * 7 * 8 * 64);
  EXPECT_EQ(s.kv_elems(), 2 * 5 * 2 * 64);
  EXPECT_EQ(s.lse_elems(), 2 * 8 * 7);
  EXPECT_EQ(s.q_bytes(), size_t{2} * 7 * 8 * 64 * 2);
  EXPECT_EQ(s.kv_bytes(), size_t{2} * 5 * 2 * 64 * 2);
  EXPECT_EQ(s.lse_bytes(), size_t{2} * 8 * 7 * 4);
}

TEST(AttentionShapeTest, ShardsAndParamsRoundTrip) {
  const AttentionShape whole = AttentionShape::Self(DType::kF16, 1, 3816, 5, 5, 128);
  EXPECT_EQ(whole.seqlen_k, 3816);
  const AttentionShape shard = whole.WithRows(1, 7);
  EXPECT_EQ(shard.seqlen_q, 1);
  EXPECT_EQ(shard.seqlen_k, 7);
  EXPECT_EQ(shard.heads, 5);
  AttentionParams p;
  SetShape(shard, &p);
  EXPECT_EQ(p.o_dtype, DType::kF16);
  EXPECT_EQ(ShapeOf(p), shard);
  EXPECT_NE(ShapeOf(p), whole);
}

}  // namespace
}  // namespace ringattn
