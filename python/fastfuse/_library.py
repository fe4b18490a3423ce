"""Every public op schema of fastfuse, in one place. Defining them in Python means the ops, their fake
kernels and their autograd exist even when the C++ extension did not build; the kernels are attached in
fastfuse/ops/<op>.py, which routes each call to a backend (see fastfuse/_backends.py).

`seed` is a CPU int64 tensor [key, offset] for Philox (see csrc/philox.h). Keeping it a tensor, drawn from
torch's default generator, lets torch.compile(fullgraph=True) trace the call with no graph break."""
import torch

lib = torch.library.Library("fastfuse", "DEF")

lib.define("dropout(Tensor input, float p, Tensor seed) -> Tensor")
lib.define("dropout_backward(Tensor grad_output, float p, Tensor seed) -> Tensor")
# (B, sum d_t + C): embedding rows in column order with dropout, then `cont` (batch-normed continuous columns)
# No schema defaults: torch 2.11's dispatcher drops arguments equal to their default before the generated
# autograd.Function, which then wants one gradient fewer than register_autograd's backward returns.
lib.define("embedding_concat_dropout(Tensor x_cat, Tensor[] weights, float p, Tensor seed, Tensor? cont, "
           "bool check_index) -> Tensor")
lib.define("embedding_concat_dropout_backward(Tensor grad_output, Tensor x_cat, Tensor[] weights, float p, "
           "Tensor seed) -> Tensor[]")

# Batch norm fused with optional pre-ReLU, residual add, post-ReLU and dropout (see fastfuse/ops/batch_norm.py).
# Functional: the running statistics are updated by the Python wrapper from the returned batch (mean, var).
lib.define("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
           "Tensor? residual, bool training, float eps, bool pre_relu, bool post_relu, float p, Tensor seed) "
           "-> (Tensor, Tensor, Tensor)")
lib.define("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor var, "
           "Tensor? output, bool training, float eps, bool pre_relu, bool post_relu, float p, Tensor seed, "
           "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)")
lib.define("reflect_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
           "int[2] dilation, int groups) -> Tensor")
# entries not asked for in output_mask come back as empty tensors
lib.define("reflect_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
           "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
