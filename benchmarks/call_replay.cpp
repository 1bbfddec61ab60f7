// Replays recorded dispatcher calls from C++, for benchmarks/bench_round_overhead.py: the
// time of a PX scoring's ATen and pxkern calls with no Python between them, which is what
// an executor issuing the same calls from C++ would take.
//
// prepare() turns (operator name, overload, args, kwargs) tuples into argument stacks once,
// so that run() times nothing but the calls. Each call gets a copy of its stack (the
// boxed call consumes it); copying IValues only bumps reference counts.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace {

struct RecordedCalls {
  std::vector<c10::OperatorHandle> operators;
  std::vector<torch::jit::Stack> stacks;
};

std::shared_ptr<RecordedCalls> prepare(const py::list& calls) {
  auto recorded = std::make_shared<RecordedCalls>();
  for (const auto& item : calls) {
    const auto call = item.cast<py::tuple>();
    const auto name = call[0].cast<std::string>();
    const auto overload = call[1].cast<std::string>();
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto args = call[2].cast<py::tuple>();
    const auto kwargs = call[3].cast<py::kwargs>();
    recorded->stacks.push_back(
        torch::jit::createStackForSchema(op.schema(), torch::jit::tuple_slice(args), kwargs, std::nullopt));
    recorded->operators.push_back(op);
  }
  return recorded;
}

// Seconds for all calls, back to back, without the GIL.
double run(const std::shared_ptr<RecordedCalls>& recorded) {
  py::gil_scoped_release no_gil;
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < recorded->operators.size(); ++i) {
    torch::jit::Stack stack = recorded->stacks[i];
    recorded->operators[i].callBoxed(&stack);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<RecordedCalls, std::shared_ptr<RecordedCalls>>(m, "RecordedCalls");
  m.def("prepare", &prepare, "argument stacks of recorded (name, overload, args, kwargs) calls");
  m.def("run", &run, "seconds to run the prepared calls back to back");
}
