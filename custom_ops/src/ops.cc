// onnxruntime glue: the OrtCustomOp wrappers, RegisterCustomOps and the C functions Python calls via ctypes.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "mpi_backend.h"
#include "stretch.h"
#include "world.h"
#ifdef LLMIR_WITH_CUDA
#include "cuda_backend.h"
#endif

#ifndef LLMIR_VERSION
#define LLMIR_VERSION "0.1.0"
#endif

namespace llmir {
namespace {

constexpr const char* kDomain = "ai.llmir";
constexpr int kOpsetVersion = 1;

// Optional attributes: absent is not an error (the status is released), present but wrong type is.
bool attribute_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out) {
  OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, out);
  if (status == nullptr) return true;
  api.ReleaseStatus(status);
  return false;
}

bool attribute_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return false;
  }
  std::string text(size, '\0');
  status = api.KernelInfoGetAttribute_string(info, name, text.data(), &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return false;
  }
  while (!text.empty() && text.back() == '\0') text.pop_back();
  *out = text;
  return true;
}

bool attribute_ints(const OrtApi& api, const OrtKernelInfo* info, const char* name, std::vector<int64_t>* out) {
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return false;
  }
  out->assign(size, 0);
  if (size == 0) return true;
  status = api.KernelInfoGetAttributeArray_int64(info, name, out->data(), &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return false;
  }
  return true;
}

std::string node_name(const OrtApi& api, const OrtKernelInfo* info) {
  size_t size = 0;
  OrtStatus* status = api.KernelInfo_GetNodeName(info, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return {};
  }
  std::string name(size, '\0');
  status = api.KernelInfo_GetNodeName(info, name.data(), &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return {};
  }
  while (!name.empty() && name.back() == '\0') name.pop_back();
  return name;
}

using BackendFactory = std::unique_ptr<Backend> (*)(OrtKernelContext* context, const void* input_data);

std::unique_ptr<Backend> cpu_backend_factory(OrtKernelContext*, const void*) { return mpi::make_cpu_backend(); }

#ifdef LLMIR_WITH_CUDA
std::unique_ptr<Backend> cuda_backend_factory(OrtKernelContext* context, const void* input_data) {
  void* stream = nullptr;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetGPUComputeStream(context, &stream));
  return cuda::make_backend(stream, input_data);
}
#endif

// LLMIR_CHECK_EVERY_CALL=1: run the signature check on every call instead of once per node and shape
// (read when onnxruntime creates the kernel, i.e. per session).
bool check_every_call() {
  const char* text = std::getenv("LLMIR_CHECK_EVERY_CALL");
  if (text == nullptr || *text == '\0' || std::strcmp(text, "0") == 0) return false;
  if (std::strcmp(text, "1") == 0) return true;
  throw Error(std::string("LLMIR_CHECK_EVERY_CALL='") + text + "': use 1 (check every call) or 0 (default)");
}

// The compute meter and LLMIR_COMPUTE_STRETCH (stretch.h): the kernel's entry counts (and, stretched,
// stretches) the compute since the last point, and the point is reset when the kernel is done
// communicating (on return or throw). Host kernels only.
struct MeteredKernel {
  MeteredKernel(bool on_host, bool stretched) : on_(on_host), stretched_(stretched) {
    if (on_) stretch::enter(stretched_);
  }
  ~MeteredKernel() {
    if (on_) stretch::leave(stretched_);
  }
  MeteredKernel(const MeteredKernel&) = delete;
  MeteredKernel& operator=(const MeteredKernel&) = delete;

 private:
  bool on_;
  bool stretched_;
};

struct Kernel {
  OpAttributes attributes;
  BackendFactory backend_factory;
  bool check_every_call = false;
  // CPU-EP kernels only: on the CUDA EP the thread's CPU time is launch work, not the device's compute.
  bool on_host = false;
  AgreedSignatures agreed;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    try {
      MeteredKernel metered(on_host, on_host && stretch::active(&world::rank));
      Ort::KernelContext context(raw_context);
      Ort::ConstValue value = context.GetInput(0);
      const auto info = value.GetTensorTypeAndShapeInfo();
      InputTensor input;
      input.elem_type = static_cast<int>(info.GetElementType());
      input.shape = info.GetShape();
      input.count = info.GetElementCount();
      input.data = value.GetTensorRawData();
      std::unique_ptr<Backend> backend = backend_factory(raw_context, input.data);
      run_op(*backend, attributes, input, [&](const std::vector<int64_t>& shape) -> void* {
        return context.GetOutput(0, shape).GetTensorMutableRawData();
      }, check_every_call ? nullptr : &agreed);
      return nullptr;
    } catch (const Ort::Exception& error) {
      return Ort::GetApi().CreateStatus(error.GetOrtErrorCode(), error.what());
    } catch (const std::exception& error) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, error.what());
    }
  }
};

struct CustomOp : Ort::CustomOpBase<CustomOp, Kernel, /*WithStatus=*/true> {
  CustomOp(OpKind kind, const char* provider, BackendFactory factory, uint32_t api_version)
      : kind_(kind), provider_(provider), factory_(factory) {
    OrtCustomOp::version = api_version;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel_out) const {
    try {
      auto kernel = std::make_unique<Kernel>();
      kernel->backend_factory = factory_;
      kernel->on_host = factory_ == &cpu_backend_factory;
      kernel->check_every_call = check_every_call();
      OpAttributes& attributes = kernel->attributes;
      attributes.kind = kind_;
      attributes.node = node_name(api, info);
      const std::string where = std::string("ai.llmir ") + op_name(kind_) +
                                (attributes.node.empty() ? "" : " [node " + attributes.node + "]");
      std::string reduction = "sum";
      attribute_string(api, info, "reduction", &reduction);
      attributes.reduction = parse_reduction(reduction);
      attribute_int(api, info, "axis", &attributes.axis);
      attribute_ints(api, info, "group", &attributes.group);
      if (kind_ == OpKind::kAllGather) {
        attributes.has_sizes = attribute_ints(api, info, "sizes", &attributes.sizes);
        if (attributes.has_sizes && attributes.sizes.empty()) {
          throw Error(where + ": attribute `sizes` is empty; list one length along `axis` per group member, or "
                              "leave it out for equal parts");
        }
        for (int64_t size : attributes.sizes) {
          if (size < 0) {
            throw Error(where + ": attribute `sizes` has the negative length " + std::to_string(size) +
                        "; lengths are 0 or more");
          }
        }
      }
      if (kind_ == OpKind::kSend || kind_ == OpKind::kRecv) {
        if (!attribute_int(api, info, "peer", &attributes.peer)) {
          throw Error(where + ": the attribute `peer` (the other rank's global rank) is required");
        }
        attribute_int(api, info, "tag", &attributes.tag);
        if (attributes.tag < 0 || attributes.tag > kMaxUserTag) {
          throw Error(where + ": tag " + std::to_string(attributes.tag) + " is outside 0.." +
                      std::to_string(kMaxUserTag));
        }
        attributes.has_shape = attribute_ints(api, info, "shape", &attributes.shape);
      }
      *kernel_out = kernel.release();
      return nullptr;
    } catch (const std::exception& error) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, error.what());
    }
  }

  const char* GetName() const { return op_name(kind_); }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return 1; }
  // Any tensor type: the kernel checks its dtype and names the supported list.
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtMemType GetInputMemoryType(size_t) const {
    // Recv's `like` input only carries a type: keep it on the host even on the CUDA EP.
    return kind_ == OpKind::kRecv ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return kind_ == OpKind::kSend ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  int start_version() const { return start_ver_; }

 private:
  OpKind kind_;
  const char* provider_;
  BackendFactory factory_;
};

std::mutex g_registry_mutex;
// Domains and ops must outlive every session that uses them: never destroyed.
std::vector<Ort::CustomOpDomain>& domains() {
  static auto* kept = new std::vector<Ort::CustomOpDomain>();
  return *kept;
}
std::vector<std::unique_ptr<CustomOp>>& custom_ops() {
  static auto* kept = new std::vector<std::unique_ptr<CustomOp>>();
  return *kept;
}

const OrtApi* negotiate_api(const OrtApiBase* api_base, uint32_t* version) {
  // Our headers' version first; 16 is the oldest with KernelComputeV2, all this library calls.
  for (uint32_t candidate = ORT_API_VERSION; candidate >= 16; --candidate) {
    if (const OrtApi* api = api_base->GetApi(candidate)) {
      *version = candidate;
      return api;
    }
  }
  return nullptr;
}

}  // namespace
}  // namespace llmir

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
  using namespace llmir;
  uint32_t version = 0;
  const OrtApi* api = negotiate_api(api_base, &version);
  if (api == nullptr) {
    std::fprintf(stderr, "ai.llmir: this onnxruntime is too old (needs the C API version 16, onnxruntime >= 1.16)\n");
    const OrtApi* oldest = api_base->GetApi(1);
    return oldest ? oldest->CreateStatus(ORT_FAIL, "ai.llmir needs onnxruntime >= 1.16") : nullptr;
  }
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    if (custom_ops().empty()) {
      for (OpKind kind : {OpKind::kAllReduce, OpKind::kAllGather, OpKind::kReduceScatter, OpKind::kSend,
                          OpKind::kRecv}) {
        custom_ops().push_back(std::make_unique<CustomOp>(kind, nullptr, &cpu_backend_factory, version));
#ifdef LLMIR_WITH_CUDA
        custom_ops().push_back(
            std::make_unique<CustomOp>(kind, "CUDAExecutionProvider", &cuda_backend_factory, version));
#endif
      }
    }
    Ort::CustomOpDomain domain(kDomain);
    for (auto& op : custom_ops()) domain.Add(op.get());
    Ort::UnownedSessionOptions(options).Add(domain);
    domains().push_back(std::move(domain));
    (void)kOpsetVersion;  // ops are registered from opset 1 on (CustomOpBase's start_ver_)
    return nullptr;
  } catch (const std::exception& error) {
    return api->CreateStatus(ORT_FAIL, error.what());
  }
}

// ctypes helpers. Failures print one line and return -1 (there is no Python exception to raise from C).
__attribute__((visibility("default"))) int llmir_world_rank(void) {
  try {
    return llmir::world::rank();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return -1;
  }
}

__attribute__((visibility("default"))) int llmir_world_size(void) {
  try {
    return llmir::world::size();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return -1;
  }
}

// 0: finalized (or nothing of ours to finalize); 1: skipped because a communication failed or timed out
// (MPI_Finalize would wait for the dead peer); -1: error.
__attribute__((visibility("default"))) int llmir_finalize(void) {
  try {
#ifdef LLMIR_WITH_CUDA
    const std::string failures = llmir::cuda::finalize();
    if (!failures.empty()) {
      std::fprintf(stderr, "ai.llmir: NCCL teardown failed: %s\n", failures.c_str());
      llmir::mpi::mark_broken();  // a peer may be gone: MPI_Finalize could wait for it
      return -1;
    }
#endif
    return llmir::mpi::finalize();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return -1;
  }
}

__attribute__((visibility("default"))) void llmir_abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (llmir::mpi::is_initialized()) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

// Signature exchanges this process has run (kernels.h, AgreedSignatures); for tests and benchmarks.
__attribute__((visibility("default"))) uint64_t llmir_signature_checks(void) { return llmir::signature_checks(); }

// The compute meter (every rank) and LLMIR_COMPUTE_STRETCH (stretch.h), for the rank runner: start()
// before a run, point() right after it (counts, and stretched stretches, the work after the run's last
// collective; returns the total seconds slept so far, -1 on a malformed variable or a kernel on another
// thread under the stretch); the totals: seconds slept, thread CPU seconds counted as compute, kernels
// that ran on another thread than the bracket's (not measured).
__attribute__((visibility("default"))) void llmir_compute_start(void) {
  try {
    llmir::stretch::start();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
  }
}

__attribute__((visibility("default"))) double llmir_compute_point(void) {
  try {
    llmir::stretch::point(llmir::stretch::active(&llmir::world::rank));
    return llmir::stretch::slept_seconds();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return -1;
  }
}

__attribute__((visibility("default"))) double llmir_stretch_slept_seconds(void) {
  return llmir::stretch::slept_seconds();
}

__attribute__((visibility("default"))) double llmir_compute_seconds(void) { return llmir::stretch::compute_seconds(); }

__attribute__((visibility("default"))) uint64_t llmir_compute_foreign_kernels(void) {
  return llmir::stretch::foreign_kernels();
}

__attribute__((visibility("default"))) const char* llmir_version(void) {
#ifdef LLMIR_WITH_CUDA
  return LLMIR_VERSION " (cpu+mpi, cuda+nccl)";
#else
  return LLMIR_VERSION " (cpu+mpi)";
#endif
}

}  // extern "C"
