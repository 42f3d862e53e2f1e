// What tch lacks, reached in libtorch itself: c10d's rendezvous store and process groups
// (Gloo, and NCCL where libtorch has CUDA). Compiled by build.rs against the libtorch tch links.
//
// Conventions, for every function here:
// - the C ABI only: opaque handles, plain integers, `at::Tensor*` for tch's `*mut C_tensor`;
// - no exception crosses into Rust: a function that can fail returns NULL on success, or an
//   error message allocated with malloc, which the caller frees with `cf_free`;
// - outputs are written only on success.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/headeronly/version.h>

#ifdef CIFAR_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef CIFAR_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#if defined(CIFAR_HAVE_GLOO) && TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11
// Gloo's headers come from Debian, not from the copy compiled into libtorch. c10d holds gloo's
// types only behind pointers, so these layouts do not depend on gloo's; were that to change,
// these sizes (read off libtorch 2.11.0's own build) would catch it at compile time.
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 176,
              "ProcessGroupGloo::Options differs from libtorch 2.11.0's: check the gloo headers");
#endif

namespace {

char* error_message(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, what.c_str(), what.size() + 1);
  }
  return out;
}

// Runs `body`, turning any exception into an error message.
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    // What the user can act on, without libtorch's C++ backtrace.
    return error_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception in libtorch");
  }
}

}  // namespace

// A c10d store: the TCPStore every rank connects to, as torch.distributed's `env://` makes it.
struct cf_store {
  c10::intrusive_ptr<c10d::Store> store;
};

// A process group's backend (Gloo or NCCL) with its rank and size.
struct cf_group {
  c10::intrusive_ptr<c10d::Backend> backend;
};

extern "C" {

// Frees an error message or a value returned by this bridge.
void cf_free(char* p) { std::free(p); }

// Whether this build has the Gloo backend (1) or not (0: built without gloo's headers).
int cf_has_gloo() {
#ifdef CIFAR_HAVE_GLOO
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the NCCL backend.
int cf_has_nccl() {
#ifdef CIFAR_HAVE_NCCL
  return 1;
#else
  return 0;
#endif
}

// Connects to the TCPStore at host:port, serving it when `is_server` (rank 0 under a plain
// launch; no rank under torchrun, whose agent serves it). Waits up to `timeout_ms` for the
// server, and the server for all `world` ranks; `timeout_ms` is also the store's timeout for
// every later get.
char* cf_store_connect(const char* host, uint16_t port, int world, int is_server, int64_t timeout_ms,
                       cf_store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new cf_store{store};
  });
}

// Releases a store (a server stops serving).
void cf_store_free(cf_store* s) { delete s; }

// Sets `key` to the `len` bytes at `value`.
char* cf_store_set(cf_store* s, const char* key, const uint8_t* value, size_t len) {
  return guarded([&] { s->store->set(key, std::vector<uint8_t>(value, value + len)); });
}

// Waits up to `timeout_ms` for `key`, then returns its value (malloc'd, `*len` bytes; free it
// with `cf_free`).
char* cf_store_get(cf_store* s, const char* key, int64_t timeout_ms, uint8_t** value, size_t* len) {
  return guarded([&] {
    s->store->wait({key}, std::chrono::milliseconds(timeout_ms));
    auto v = s->store->get(key);
    auto* buf = static_cast<uint8_t*>(std::malloc(v.empty() ? 1 : v.size()));
    if (buf == nullptr) throw std::bad_alloc();
    std::memcpy(buf, v.data(), v.size());
    *value = buf;
    *len = v.size();
  });
}

// Whether `key` is set now (1) or not (0), without waiting.
char* cf_store_check(cf_store* s, const char* key, int* present) {
  return guarded([&] { *present = s->store->check({key}) ? 1 : 0; });
}

// Makes the process group on `store` under the keys Python's default group uses
// (`default_pg/0/<device>/`), so a `torch.distributed.init_process_group` rank can join.
// `backend` is "gloo" (CPU tensors) or "nccl" (tensors on CUDA device `device`). Blocks until
// all `world` ranks have joined or `timeout_ms` passed; `timeout_ms` is then each collective's.
char* cf_group_new(cf_store* s, const char* backend, int rank, int world, int device, int64_t timeout_ms,
                   cf_group** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto group_store = c10::make_intrusive<c10d::PrefixStore>(
        "0/", c10::make_intrusive<c10d::PrefixStore>("default_pg", s->store));
    std::string name(backend);
    if (name == "gloo") {
#ifdef CIFAR_HAVE_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
      auto prefix = c10::make_intrusive<c10d::PrefixStore>("cpu/", group_store);
      *out = new cf_group{c10::make_intrusive<c10d::ProcessGroupGloo>(prefix, rank, world, opts)};
#else
      throw std::runtime_error("this build has no Gloo backend: gloo's headers were missing when it was "
                               "compiled (run tools/setup, then rebuild)");
#endif
    } else if (name == "nccl") {
#ifdef CIFAR_HAVE_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      auto prefix = c10::make_intrusive<c10d::PrefixStore>("cuda/", group_store);
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefix, rank, world, opts);
      pg->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
      *out = new cf_group{pg};
#else
      (void)device;
      throw std::runtime_error("this build has no NCCL backend (libtorch without CUDA, or its headers "
                               "were missing when it was compiled)");
#endif
    } else {
      throw std::runtime_error("unknown backend " + name + ": expected gloo or nccl");
    }
  });
}

// Releases a process group.
void cf_group_free(cf_group* g) { delete g; }

// Sums `tensor` over all ranks, in place, and waits for the result (on CUDA: until the sum is
// queued on the tensor's current stream).
char* cf_group_allreduce_sum(cf_group* g, at::Tensor* tensor) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    g->backend->allreduce(tensors)->wait();
  });
}

// Replaces `tensor` on every rank by rank `root`'s, and waits.
char* cf_group_broadcast(cf_group* g, at::Tensor* tensor, int root) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    g->backend->broadcast(tensors, opts)->wait();
  });
}

// Waits until every rank has called it.
char* cf_group_barrier(cf_group* g) {
  return guarded([&] { g->backend->barrier()->wait(); });
}

}  // extern "C"
