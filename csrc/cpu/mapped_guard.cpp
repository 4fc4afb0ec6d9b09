// A SIGBUS guard for the engine's zero-copy reads. Inputs are read through private file mappings; if an input
// file shrinks while it is mapped (another program truncates or rewrites it), touching a page past the new end
// raises SIGBUS, whose default action kills the process at once: no message, the temporary output left behind.
// Within the address ranges registered here the handler maps a zero page over the faulting page instead (so
// the instruction completes) and counts the fault; the engine checks the count after each tensor and fails with
// a named "file shrank" error before anything is committed. Faults outside the ranges go to the previous
// handler (or the default action), so real crashes still crash.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <tuple>

#include "fastmerge/ops.h"

namespace fastmerge {
namespace {

constexpr int kSlots = 4096;
struct Range {
  std::atomic<uintptr_t> lo{0}, hi{0};
};
Range g_ranges[kSlots];
std::atomic<int> g_used{0};            // slots ever handed out (the handler scans these)
std::atomic<int64_t> g_faults{0};
std::atomic<uintptr_t> g_last{0};
struct sigaction g_previous;
std::mutex g_mutex;
bool g_installed = false;

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const int n = g_used.load(std::memory_order_acquire);
  for (int i = 0; i < n; ++i) {
    if (addr >= g_ranges[i].lo.load(std::memory_order_relaxed) && addr < g_ranges[i].hi.load(std::memory_order_relaxed)) {
      const uintptr_t page = addr & ~static_cast<uintptr_t>(sysconf(_SC_PAGESIZE) - 1);
      void* p = mmap(reinterpret_cast<void*>(page), static_cast<size_t>(sysconf(_SC_PAGESIZE)),
                     PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) {
        g_last.store(addr, std::memory_order_relaxed);
        g_faults.fetch_add(1, std::memory_order_release);
        return;
      }
      break;
    }
  }
  // not a registered mapping: whatever handled SIGBUS before us (faulthandler, the default action) handles it
  if (g_previous.sa_flags & SA_SIGINFO) {
    g_previous.sa_sigaction(sig, info, ctx);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
  } else {
    sigaction(SIGBUS, &g_previous, nullptr);  // the faulting access runs again and takes the default action
  }
}

void install() {
  if (g_installed) return;
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &g_previous) != 0) throw std::runtime_error("cannot install the SIGBUS handler");
  g_installed = true;
}

}  // namespace

int64_t mapped_guard_watch(int64_t address, int64_t length) {
  std::lock_guard<std::mutex> lock(g_mutex);
  install();
  int slot = -1;
  const int n = g_used.load();
  for (int i = 0; i < n && slot < 0; ++i)
    if (g_ranges[i].hi.load() == 0) slot = i;
  if (slot < 0) {
    if (n == kSlots) throw std::runtime_error("too many mapped files watched at once");
    slot = n;
  }
  g_ranges[slot].lo.store(static_cast<uintptr_t>(address));
  g_ranges[slot].hi.store(static_cast<uintptr_t>(address + length));
  if (slot == n) g_used.store(n + 1, std::memory_order_release);
  return slot;
}

void mapped_guard_unwatch(int64_t slot) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (slot < 0 || slot >= g_used.load()) return;
  g_ranges[slot].hi.store(0);
  g_ranges[slot].lo.store(0);
}

std::tuple<int64_t, int64_t> mapped_guard_faults() {
  return {g_faults.load(std::memory_order_acquire), static_cast<int64_t>(g_last.load(std::memory_order_relaxed))};
}

}  // namespace fastmerge
