// The AVX2 + FMA build of the CPU batch-norm kernels (see cpu/batch_norm_impl.h); batch_norm_primitives.cpp
// calls it only on CPUs that have both. Every header is included before the target pragma, so library code
// (ATen, the standard library) is never compiled for AVX2 here, only the kernels below.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "dropout.h"
#include "cpu/alloc.h"
#include "cpu/philox_cpu.h"

#ifdef FASTFUSE_BN_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FF_BN_NS avx2
#include "cpu/batch_norm_impl.h"
#undef FF_BN_NS
#pragma GCC pop_options
#endif
