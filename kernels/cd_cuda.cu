// Fused Channel Distillation loss forward, CUDA C++ version of cd_triton.py (same math, same outputs):
// one block per (n, channel tile), fp32 accumulation of the student map over H*W, minus the teacher's
// channel mean m[n, c]; writes the (N, C) differences d and one partial sum of d^2 / (N*C) per block.
// The backward needs no kernel (kernels/cd_function.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace {

constexpr int kLanes = 32;  // blockDim.x
constexpr int kRows = 8;    // blockDim.y

struct MapStrides {
  int64_t n, c, hw;
};

MapStrides hw_strides(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.size(3) > 1 ? x.stride(3) : x.stride(2)};
}

bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// C_INNER (channels_last): lanes walk 32 channels, rows walk H*W; tile = 32 channels.
// Otherwise (NCHW): each row (warp) owns a channel, lanes walk H*W; tile = 8 channels.
template <typename scalar_t, bool C_INNER>
__global__ void cd_forward_kernel(const scalar_t* __restrict__ s, MapStrides ss,
                                  const float* __restrict__ m, int C, int HW, float inv_hw, float inv_nc,
                                  float* __restrict__ d, float* __restrict__ partial) {
  constexpr int tile = C_INNER ? kLanes : kRows;
  const int tiles = (C + tile - 1) / tile;
  const int n = blockIdx.x / tiles;
  const int c = (blockIdx.x % tiles) * tile + (C_INNER ? threadIdx.x : threadIdx.y);
  const int hw0 = C_INNER ? threadIdx.y : threadIdx.x;
  constexpr int hw_step = C_INNER ? kRows : kLanes;
  float acc = 0.f;
  if (c < C) {
    const scalar_t* sp = s + n * ss.n + c * ss.c;
#pragma unroll 4
    for (int hw = hw0; hw < HW; hw += hw_step) {
      acc += static_cast<float>(sp[hw * ss.hw]);
    }
  }
  __shared__ float sums[kRows][kLanes + 1];
  __shared__ float sq[kLanes];
  float mine = 0.f;  // d^2 of this thread's channel, on one thread per channel
  if (C_INNER) {
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0) {
      float total = 0.f;
      for (int r = 0; r < kRows; ++r) total += sums[r][threadIdx.x];
      if (c < C) {
        const float diff = total * inv_hw - m[n * C + c];
        d[n * C + c] = diff;
        mine = diff * diff;
      }
    }
  } else {
    for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (threadIdx.x == 0 && c < C) {
      const float diff = acc * inv_hw - m[n * C + c];
      d[n * C + c] = diff;
      mine = diff * diff;
    }
  }
  // Block sum of `mine`: per-warp shuffle, then the first warp.
  for (int off = kLanes / 2; off > 0; off /= 2) mine += __shfl_down_sync(0xffffffffu, mine, off);
  if (threadIdx.x == 0) sq[threadIdx.y] = mine;
  __syncthreads();
  if (threadIdx.y == 0 && threadIdx.x == 0) {
    float total = 0.f;
    for (int r = 0; r < kRows; ++r) total += sq[r];
    partial[blockIdx.x] = total * inv_nc;
  }
}

template <bool C_INNER>
void launch_forward(const at::Tensor& s, const at::Tensor& m, const at::Tensor& d,
                    const at::Tensor& partial, int blocks, cudaStream_t stream) {
  const int N = s.size(0), C = s.size(1), HW = s.size(2) * s.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cd_forward", [&] {
    cd_forward_kernel<scalar_t, C_INNER><<<blocks, dim3(kLanes, kRows), 0, stream>>>(
        s.data_ptr<scalar_t>(), hw_strides(s), m.data_ptr<float>(), C, HW, 1.f / HW,
        1.f / (static_cast<float>(N) * C), d.data_ptr<float>(), partial.data_ptr<float>());
  });
}

}  // namespace

// stu: K student maps; means: K contiguous fp32 (N, C) teacher channel means. Returns [loss, d_0, ..., d_{K-1}].
std::vector<at::Tensor> cd_forward(const std::vector<at::Tensor>& stu, const std::vector<at::Tensor>& means) {
  TORCH_CHECK(!stu.empty() && stu.size() == means.size(), "cd_forward: one teacher mean per student map");
  const c10::cuda::CUDAGuard guard(stu[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<int> blocks(stu.size());
  int64_t total = 0;
  for (size_t i = 0; i < stu.size(); ++i) {
    const at::Tensor& s = stu[i];
    const at::Tensor& m = means[i];
    TORCH_CHECK(s.is_cuda() && m.is_cuda(), "cd_forward: stage ", i, " is not on a CUDA device");
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 && m.size(0) == s.size(0) &&
                    m.size(1) == s.size(1),
                "cd_forward: stage ", i, " teacher means must be contiguous fp32 (N, C)");
    const int tile = channels_last(s) ? kLanes : kRows;
    blocks[i] = s.size(0) * ((s.size(1) + tile - 1) / tile);
    total += blocks[i];
  }
  const auto f32 = stu[0].options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor partial = at::empty({total}, f32);
  std::vector<at::Tensor> out{at::Tensor()};
  int64_t offset = 0;
  for (size_t i = 0; i < stu.size(); ++i) {
    at::Tensor d = at::empty({stu[i].size(0), stu[i].size(1)}, f32);
    at::Tensor part = partial.narrow(0, offset, blocks[i]);
    if (channels_last(stu[i])) {
      launch_forward<true>(stu[i], means[i], d, part, blocks[i], stream);
    } else {
      launch_forward<false>(stu[i], means[i], d, part, blocks[i], stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out.push_back(d);
    offset += blocks[i];
  }
  out[0] = partial.sum();
  return out;
}
