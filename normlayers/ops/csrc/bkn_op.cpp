// BKN's CPU training step as a torch operator with its own C++ autograd node: torch.ops.normlayers.bkn_step.
//
// Why: the whole step already runs in two C calls (bkn_step.c), but around them a Python autograd.Function adds
// the Python forward and backward, ctypes argument conversion and tensor allocations from Python: the operator saves
// 20-35 us a step at (2, 256, 16, 16) on 2 threads, where BatchNorm2d's whole step is ~150 us. Here the forward, the
// saved state and the backward are C++ like BatchNorm2d's, and Python makes one op call.
//
// normlayers/ops/cfinalize.py (load_op) compiles this file with the system C++ compiler against the installed
// torch's headers and libraries, links it with bkn_step.c (same flags and OpenMP runtime as the ctypes library) and
// loads it with torch.ops.load_library. The arithmetic is bkn_step.c's; the Python Functions of
// normlayers/ops/torch_backend.py (_NchwPriorFn, _GroupedPriorFn) stay the fallback and the reference for tests.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

extern "C" {
double bkn_step_forward(int is_double, int channels_last, int64_t n, int64_t c, int64_t length, int64_t groups,
                        const void *x, const void *weight, const void *bias, const void *prior_mean,
                        const void *prior_var, int64_t prior_stride, double p, double eps, double guard_ratio,
                        int layer_guard, void *running_mean, void *running_var, double momentum, void *y,
                        void *post_mean, void *post_var, void *rstd, void *d, void *a, double *p_used, int threads);
int bkn_step_backward(int is_double, int channels_last, int64_t n, int64_t c, int64_t length, int64_t groups,
                      const void *x, const void *gy, const void *post_mean, const void *rstd, const void *a,
                      const void *d, const double *p_used, const void *grad_mean, const void *grad_var,
                      int64_t prior_stride, void *dx, void *grad_weight, void *grad_bias, void *grad_prior_mean,
                      void *grad_prior_var, int threads);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

void *ptr_or_null(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }

// Row k of a contiguous (3, G, C) tensor, as a raw pointer (internal[k] would be a dispatcher call for a view).
void *row(const Tensor &internal, int64_t k) {
    return static_cast<char *>(internal.data_ptr()) + k * (internal.numel() / 3) * internal.element_size();
}

// The prior was rejected by the C step (nothing was written): the same messages as check_prior_values.
[[noreturn]] void reject_prior(const Tensor &mean, const Tensor &var) {
    TORCH_CHECK_VALUE(at::isfinite(mean).all().item<bool>(), "prior mean contains NaN or inf");
    TORCH_CHECK_VALUE(at::isfinite(var).all().item<bool>(), "prior var contains NaN or inf");
    TORCH_CHECK_VALUE(false, "prior var must be non-negative (min ", var.min().item<double>(), ")");
}

bool matches(const Tensor &t, const Tensor &x, at::IntArrayRef shape) {
    return t.defined() && t.device() == x.device() && t.scalar_type() == x.scalar_type() && t.sizes() == shape &&
           t.is_contiguous();
}

// What the C step does not take: NotImplementedError (TORCH_CHECK_NOT_IMPLEMENTED), which hot_train reads as "take
// the general path"; the prior's values are checked by the C step itself (ValueError, like check_prior_values).
void check_inputs(const Tensor &x, const Tensor &weight, const Tensor &bias, const Tensor &prior_mean,
                  const Tensor &prior_var, int64_t groups, const c10::optional<Tensor> &running_mean,
                  const c10::optional<Tensor> &running_var, const c10::optional<double> &momentum,
                  const c10::optional<Tensor> &counter) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
        "bkn_step: x must be a float32/float64 CPU tensor");
    TORCH_CHECK_NOT_IMPLEMENTED(x.dim() >= 3 && x.size(0) > 0 && x.size(1) > 0 && x.numel() > x.size(0) * x.size(1),
                                "bkn_step: x must be (N, C, ...) with more than one value per sample and channel");
    TORCH_CHECK_NOT_IMPLEMENTED(x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)),
                                "bkn_step: x must be contiguous (NCHW) or channels-last 4-D");
    const int64_t n = x.size(0), c = x.size(1);
    TORCH_CHECK_NOT_IMPLEMENTED(groups >= 1 && n % groups == 0, "bkn_step: groups must divide the batch");
    TORCH_CHECK_NOT_IMPLEMENTED(matches(weight, x, {c}) && matches(bias, x, {c}),
                                "bkn_step: weight and bias must be (C,)");
    const bool per_group = prior_mean.dim() == 2 && groups > 1;  // a (1, C) prior: the general path, as in Python
    std::vector<int64_t> prior_shape = per_group ? std::vector<int64_t>{groups, c} : std::vector<int64_t>{c};
    TORCH_CHECK_NOT_IMPLEMENTED(matches(prior_mean, x, prior_shape) && matches(prior_var, x, prior_shape),
                                "bkn_step: the prior must be (C,) or, with G > 1 groups, (G, C), in x's dtype");
    const bool running = running_mean.has_value() && running_mean->defined();
    TORCH_CHECK_NOT_IMPLEMENTED(running == (running_var.has_value() && running_var->defined()),
                                "bkn_step: give both running buffers or neither");
    TORCH_CHECK_NOT_IMPLEMENTED(!running || (matches(*running_mean, x, {c}) && matches(*running_var, x, {c})),
                                "bkn_step: running buffers must be (C,)");
    const bool counting = counter.has_value() && counter->defined();
    TORCH_CHECK_NOT_IMPLEMENTED(!counting || (counter->device().is_cpu() && counter->scalar_type() == at::kLong &&
                                              counter->numel() == 1),
                                "bkn_step: num_batches_tracked must be a one-element int64 CPU tensor");
    TORCH_CHECK_NOT_IMPLEMENTED(!running || momentum.has_value() || counting,
                                "bkn_step: momentum None (a cumulative average) needs num_batches_tracked");
}

struct BknStep : public torch::autograd::Function<BknStep> {
    // (x, weight, bias, prior_mean, prior_var) -> (y, post_mean, post_var); statistics (C,) for one group, else
    // (G, C). x: NCHW-contiguous or channels-last 4-D, fp32/fp64; check_inputs refuses anything else before the C step
    // reads memory (NotImplementedError: hot_train then takes the general path). num_batches_tracked: counted here.
    static variable_list forward(AutogradContext *ctx, const Tensor &x, const Tensor &weight, const Tensor &bias,
                                 const Tensor &prior_mean, const Tensor &prior_var, double p, double eps,
                                 double guard_ratio, bool layer_guard, int64_t groups,
                                 const c10::optional<Tensor> &running_mean, const c10::optional<Tensor> &running_var,
                                 c10::optional<double> momentum, const c10::optional<Tensor> &counter) {
        check_inputs(x, weight, bias, prior_mean, prior_var, groups, running_mean, running_var, momentum, counter);
        const int64_t n = x.size(0), c = x.size(1);
        const bool channels_last = !x.is_contiguous();
        const bool is_double = x.scalar_type() == at::kDouble;
        auto options = x.options();
        Tensor y = at::empty_like(x);  // in x's layout
        const std::vector<int64_t> stat_shape = groups == 1 ? std::vector<int64_t>{c} : std::vector<int64_t>{groups, c};
        Tensor post_mean = at::empty(stat_shape, options), post_var = at::empty(stat_shape, options);
        Tensor internal = at::empty({3, groups, c}, options);  // rstd, d, a: saved for the backward only
        Tensor p_used = at::empty({groups}, options.dtype(at::kDouble));
        const bool running = running_mean.has_value() && running_mean->defined();
        const bool counting = counter.has_value() && counter->defined();
        // the layer's step count after this step; momentum None: the cumulative average 1 / count, like BatchNorm
        const int64_t count = counting ? *counter->data_ptr<int64_t>() + 1 : 0;
        const double average = momentum.has_value() ? *momentum : (counting ? 1.0 / double(count) : 0.0);
        double fired = bkn_step_forward(
            is_double, channels_last, n, c, x.numel() / (n * c), groups, x.data_ptr(), weight.data_ptr(),
            bias.data_ptr(), prior_mean.data_ptr(), prior_var.data_ptr(), prior_mean.dim() == 1 ? 0 : c, p, eps,
            guard_ratio, layer_guard, running ? running_mean->data_ptr() : nullptr,
            running ? running_var->data_ptr() : nullptr, average, y.data_ptr(), post_mean.data_ptr(),
            post_var.data_ptr(), row(internal, 0), row(internal, 1), row(internal, 2), p_used.data_ptr<double>(),
            at::get_num_threads());
        if (fired == -1.0) {
            reject_prior(prior_mean, prior_var);
        }
        TORCH_CHECK(fired >= 0.0, "the C step could not allocate its workspace");
        if (running) {  // written through raw pointers: tell autograd's saved-tensor checks, as in-place ops do
            running_mean->unsafeGetTensorImpl()->bump_version();
            running_var->unsafeGetTensorImpl()->bump_version();
        }
        if (counting) {  // only once the step has run: a refused prior leaves the layer as it was
            *counter->data_ptr<int64_t>() = count;
            counter->unsafeGetTensorImpl()->bump_version();
        }
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({x, post_mean, internal, p_used});
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["prior_stride"] = prior_mean.dim() == 1 ? int64_t{0} : c;
        return {y, post_mean, post_var};
    }

    // (dx, dgamma, dbeta, dmu_P, dvar_P) in one C call; gradients not needed are not computed.
    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &post_mean = saved[1], &internal = saved[2], &p_used = saved[3];
        const int64_t groups = ctx->saved_data["groups"].toInt();
        const int64_t prior_stride = ctx->saved_data["prior_stride"].toInt();
        const int64_t n = x.size(0), c = x.size(1);
        const bool channels_last = !x.is_contiguous();
        auto options = x.options();
        Tensor gy = grads[0], gm = grads[1], gv = grads[2];
        // in x's dtype and layout; each check first, as a conversion that changes nothing is still a dispatcher call
        const auto dtype = x.scalar_type();
        if (gy.defined()) {
            if (gy.scalar_type() != dtype) gy = gy.to(dtype);
            gy = gy.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
        }
        if (gm.defined()) gm = (gm.scalar_type() != dtype ? gm.to(dtype) : gm).contiguous();
        if (gv.defined()) gv = (gv.scalar_type() != dtype ? gv.to(dtype) : gv).contiguous();
        const std::vector<int64_t> prior_shape =
            prior_stride == 0 ? std::vector<int64_t>{c} : std::vector<int64_t>{groups, c};
        Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
        Tensor dweight = ctx->needs_input_grad(1) ? at::empty({c}, options) : Tensor();
        Tensor dbias = ctx->needs_input_grad(2) ? at::empty({c}, options) : Tensor();
        Tensor dpm = ctx->needs_input_grad(3) ? at::empty(prior_shape, options) : Tensor();
        Tensor dpv = ctx->needs_input_grad(4) ? at::empty(prior_shape, options) : Tensor();
        int rc = bkn_step_backward(
            x.scalar_type() == at::kDouble, channels_last, n, c, x.numel() / (n * c), groups, x.data_ptr(),
            ptr_or_null(gy), post_mean.data_ptr(), row(internal, 0), row(internal, 2), row(internal, 1),
            p_used.data_ptr<double>(), ptr_or_null(gm), ptr_or_null(gv), prior_stride, ptr_or_null(dx),
            ptr_or_null(dweight), ptr_or_null(dbias), ptr_or_null(dpm), ptr_or_null(dpv), at::get_num_threads());
        TORCH_CHECK(rc == 0, "the C step could not allocate its workspace");
        return {dx, dweight, dbias, dpm, dpv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor, Tensor> bkn_step(const Tensor &x, const Tensor &weight, const Tensor &bias,
                                            const Tensor &prior_mean, const Tensor &prior_var, double p, double eps,
                                            double guard_ratio, bool layer_guard, int64_t groups,
                                            const c10::optional<Tensor> &running_mean,
                                            const c10::optional<Tensor> &running_var, c10::optional<double> momentum,
                                            const c10::optional<Tensor> &num_batches_tracked) {
    auto out = BknStep::apply(x, weight, bias, prior_mean, prior_var, p, eps, guard_ratio, layer_guard, groups,
                              running_mean, running_var, momentum, num_batches_tracked);
    return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(normlayers, m) {
    m.def("bkn_step(Tensor x, Tensor weight, Tensor bias, Tensor prior_mean, Tensor prior_var, float p, float eps, "
          "float guard_ratio, bool layer_guard, int groups, Tensor? running_mean, Tensor? running_var, "
          "float? momentum, Tensor? num_batches_tracked=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(normlayers, CompositeImplicitAutograd, m) { m.impl("bkn_step", bkn_step); }
