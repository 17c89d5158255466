// qpkv/select/select.hpp - every token selector: KeepAll, StreamingLLM, SnapKV, H2O, PyramidKV,
// and the scoring they share (window attention, pooling, deterministic top-k).
#pragma once

#include "qpkv/select/selection.hpp"
#include "qpkv/select/scoring.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/streaming_llm.hpp"
#include "qpkv/select/snapkv.hpp"
#include "qpkv/select/h2o.hpp"
#include "qpkv/select/pyramidkv.hpp"
