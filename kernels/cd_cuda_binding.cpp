// Python binding of cd_cuda.cu (module fastcd.kernels._cd_cuda).
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> cd_forward(const std::vector<at::Tensor>& stu, const std::vector<at::Tensor>& means);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cd_forward", &cd_forward, "CD loss forward from student maps and teacher means: [loss, d_0, ...] (CUDA)");
}
