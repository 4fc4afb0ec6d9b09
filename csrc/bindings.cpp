// The one pybind11 module of fastmerge: fastmerge._C. Functions fill preallocated outputs; the Python
// adapters (fastmerge/backends/cpp.py, cuda.py) allocate, validate and choose.
#include "fastmerge/ops.h"

namespace py = pybind11;

// Kernels run without the GIL (arguments are converted before the guard is taken), so the engine's reader and
// writer threads keep going while a kernel computes.
#define NOGIL py::call_guard<py::gil_scoped_release>()

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmerge compiled kernels (CPU C++/OpenMP, optional CUDA)";
#ifdef FASTMERGE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif

#define FM_BIND_ALL(SUFFIX)                                                                                    \
  m.def("abs_histogram_" #SUFFIX, &fastmerge::abs_histogram_##SUFFIX, py::arg("x"), py::arg("hist"),          \
        py::arg("level"), py::arg("prefix"), NOGIL);                                                                 \
  m.def("row_kth_largest_abs_" #SUFFIX, &fastmerge::row_kth_largest_abs_##SUFFIX, py::arg("x"), py::arg("k"), \
        py::arg("out"), NOGIL);                                                                               \
  m.def("prune_" #SUFFIX, &fastmerge::prune_##SUFFIX, py::arg("x"), py::arg("lo"), py::arg("hi"),             \
        py::arg("out"), py::arg("stats"), py::arg("p"), py::arg("seed"), py::arg("key"), py::arg("offset"),   \
        py::arg("scale"), NOGIL);                                                                                    \
  m.def("ties_merge_" #SUFFIX, &fastmerge::ties_merge_##SUFFIX, py::arg("base"), py::arg("experts"),          \
        py::arg("params"), py::arg("out"), py::arg("counts"), py::arg("seed"), py::arg("key"),                \
        py::arg("offset"), py::arg("elect"), py::arg("merge"), py::arg("weighted_elect"),                     \
        py::arg("zero_sign"), py::arg("lam"), NOGIL);                                                                \
  m.def("tall_masks_" #SUFFIX, &fastmerge::tall_masks_##SUFFIX, py::arg("base"), py::arg("experts"),          \
        py::arg("lambdas"), py::arg("mtl"), py::arg("masks"), NOGIL);                                                \
  m.def("consensus_merge_" #SUFFIX, &fastmerge::consensus_merge_##SUFFIX, py::arg("base"),                    \
        py::arg("experts"), py::arg("lambdas"), py::arg("mtl"), py::arg("min_count"), py::arg("lam"),         \
        py::arg("out"), NOGIL);                                                                               \
  m.def("emr_elect_" #SUFFIX, &fastmerge::emr_elect_##SUFFIX, py::arg("base"), py::arg("experts"),            \
        py::arg("tau_uni"), py::arg("masks"), py::arg("stats"), NOGIL);

  FM_BIND_ALL(cpu)
  m.def("order_window_cpu", &fastmerge::order_window_cpu, py::arg("x"), py::arg("start"), py::arg("stop"),
        py::arg("descending"), py::arg("topk"), py::arg("out"), NOGIL);
  m.def("gta_merge_cpu", &fastmerge::gta_merge_cpu, py::arg("base"), py::arg("experts"), py::arg("keep"),
        py::arg("params"), py::arg("consensus"), py::arg("normalize"), py::arg("lam"), py::arg("out"), NOGIL);
  m.def("della_prune_cpu", &fastmerge::della_prune_cpu, py::arg("x"), py::arg("out"), py::arg("density"),
        py::arg("epsilon"), py::arg("seed"), py::arg("key"), py::arg("rescale"), NOGIL);
  m.def("doge_grad_cpu", &fastmerge::doge_grad_cpu, py::arg("taus"), py::arg("a"), py::arg("d"), py::arg("out"),
        NOGIL);
  m.def("tv_combine_cpu", &fastmerge::tv_combine_cpu, py::arg("base"), py::arg("taus"), py::arg("coef"),
        py::arg("offsets"), py::arg("out"), NOGIL);
  m.def("tv_coef_grad_cpu", &fastmerge::tv_coef_grad_cpu, py::arg("grad"), py::arg("taus"), py::arg("offsets"),
        py::arg("out"), NOGIL);
  m.def("adam_step_cpu", &fastmerge::adam_step_cpu, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("scale"), py::arg("repeat"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("step"), NOGIL);
  m.def("mapped_guard_watch", &fastmerge::mapped_guard_watch, py::arg("address"), py::arg("length"));
  m.def("mapped_guard_unwatch", &fastmerge::mapped_guard_unwatch, py::arg("slot"));
  m.def("mapped_guard_faults", &fastmerge::mapped_guard_faults);
#ifdef FASTMERGE_WITH_CUDA
  FM_BIND_ALL(cuda)
#endif
#undef FM_BIND_ALL
#undef NOGIL
}
