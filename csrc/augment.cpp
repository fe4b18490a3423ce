// fastfuse::augment: the schema and its Autograd-key kernel.
// The op is forward only: augmentation parameters are drawn, never learned, and images are data. The Autograd
// kernel runs the device kernel below the autograd keys and returns an output that never requires grad (no node
// is recorded), so a backward through it raises torch's own "does not require grad" error instead of reaching a
// missing derivative; opcheck's autograd-registration test sees the kernel registered on the Autograd key.
#include <torch/library.h>

#include "augment.h"

namespace fastfuse {
namespace {

using AugmentSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, const c10::optional<at::Tensor>&,
                              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                              const c10::optional<at::Tensor>&, c10::string_view, at::ScalarType, bool);

at::Tensor augment_autograd(const at::Tensor& x, const at::Tensor& matrix, at::IntArrayRef size,
                            const c10::optional<at::Tensor>& brightness, const c10::optional<at::Tensor>& contrast,
                            const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                            c10::string_view pad_mode, at::ScalarType out_dtype, bool channels_last) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastfuse::augment", "").typed<AugmentSig>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, matrix, size, brightness, contrast, mean, std, pad_mode, out_dtype, channels_last);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastfuse, m) {
  m.def("augment(Tensor x, Tensor matrix, int[2] size, Tensor? brightness, Tensor? contrast, Tensor? mean, "
        "Tensor? std, str pad_mode, ScalarType out_dtype, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastfuse, Autograd, m) { m.impl("augment", &augment_autograd); }

}  // namespace fastfuse
