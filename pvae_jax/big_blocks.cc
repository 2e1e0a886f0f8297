// A cache of large memory blocks in front of glibc's malloc, preloaded (LD_PRELOAD)
// into the launchers' processes by runtime.py.
//
// Why: XLA:CPU allocates each step's temporaries as one block per device (329 MB for
// gated_noup at 50 images per device) and frees it when the step ends. glibc serves a
// block that large with a fresh mmap and returns it with munmap, so every step the
// kernel maps, faults in and zeroes the whole block again: 1,000-1,500 page faults
// (of 2 MB pages) per gated_noup step on a 2-core Xeon. With this cache, 2-14, and
// the step took 0.78-0.96x the CPU time (four alternated runs of launch/bench.py).
// Serving large blocks from glibc's heap instead (mmap_max=0) removed the faults too,
// but fragmented the heap: the peak RSS grew from 1.33 to 2.23 GB over three rounds of
// train and eval steps.
//
// Here a request of at least kBig bytes, what glibc would map afresh under the
// settings of runtime.MALLOC_ENV, gets a block of its own, mapped once and kept when
// freed. The next request that fits an idle block (at most a quarter larger than
// asked) gets it back as it is, so a step that frees and asks again for the same size
// reuses its memory, with no fault. A request that fits no idle block first unmaps
// every idle one, then maps a new block: when the sizes change (train and eval steps
// alternating, a new model), what is resident stays what is in use, as with glibc.
// pvae_release_idle_blocks() unmaps the idle blocks on demand (runtime.py calls it
// after each compile).
//
// Everything else goes to glibc (its __libc_* entry points). free() tells a block of
// this cache from glibc's memory by its address (2 MB aligned, in the table below);
// glibc's chunks are never at such an address where the table has a block. A block
// carries a glibc-style header (an mmapped chunk of its size) just before it, so that
// glibc's malloc_usable_size, which reads it, gives the block's size.
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

extern "C" {
void* __libc_malloc(size_t size) noexcept;
void __libc_free(void* p) noexcept;
void* __libc_calloc(size_t count, size_t size) noexcept;
void* __libc_realloc(void* p, size_t size) noexcept;
void* __libc_memalign(size_t alignment, size_t size) noexcept;
size_t malloc_usable_size(void* p) noexcept;
}

namespace {

constexpr size_t kBig = size_t{32} << 20;  // glibc maps anything this large (MALLOC_ENV)
constexpr size_t kAlign = size_t{2} << 20;  // one transparent huge page
constexpr size_t kPage = 4096;
constexpr int kSlots = 64;

struct Block {
  char* p;  // nullptr: the slot is free
  size_t size;  // usable bytes, a multiple of kAlign
  bool live;
};
Block blocks[kSlots];
pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

// Unmapping takes the header page before the block too.
void Unmap(const Block& b) { munmap(b.p - kPage, b.size + kPage); }

// A new block of ``size`` bytes at a kAlign boundary, with the page before it mapped
// for the header; nullptr where the kernel has no memory for it.
char* Map(size_t size) {
  const size_t span = size + kAlign + kPage;
  void* mapped = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
  if (mapped == MAP_FAILED) return nullptr;
  char* raw = static_cast<char*>(mapped);
  char* p = reinterpret_cast<char*>(
      (reinterpret_cast<uintptr_t>(raw) + kPage + kAlign - 1) & ~(kAlign - 1));
  if (p - kPage > raw) munmap(raw, p - kPage - raw);
  if (raw + span > p + size) munmap(p + size, raw + span - (p + size));
  madvise(p, size, MADV_HUGEPAGE);
  // glibc's header of an mmapped chunk: the chunk's size (header included) with the
  // IS_MMAPPED bit, so that malloc_usable_size(p) reads size.
  reinterpret_cast<size_t*>(p)[-1] = (size + 2 * sizeof(size_t)) | 2;
  return p;
}

// A block of at least n bytes (n >= kBig), and whether it was used before; nullptr
// where none can be had (the caller then asks glibc).
char* Take(size_t n, bool* reused) {
  const size_t size = (n + kAlign - 1) & ~(kAlign - 1);
  pthread_mutex_lock(&mu);
  int best = -1;
  for (int i = 0; i < kSlots; ++i) {
    const Block& b = blocks[i];
    if (b.p && !b.live && b.size >= size && b.size - size <= size / 4 &&
        (best < 0 || b.size < blocks[best].size))
      best = i;
  }
  char* p = nullptr;
  *reused = best >= 0;
  if (best >= 0) {
    blocks[best].live = true;
    p = blocks[best].p;
  } else {
    // No idle block fits: they are of other sizes, and are given back first.
    int slot = -1;
    for (int i = 0; i < kSlots; ++i) {
      if (blocks[i].p && !blocks[i].live) {
        Unmap(blocks[i]);
        blocks[i].p = nullptr;
      }
      if (!blocks[i].p && slot < 0) slot = i;
    }
    if (slot >= 0 && (p = Map(size)) != nullptr) blocks[slot] = Block{p, size, true};
  }
  pthread_mutex_unlock(&mu);
  return p;
}

// Only a kAlign-aligned pointer can be a block here: any other is glibc's, told so
// without taking the lock.
bool MayBeBlock(const void* p) {
  return p != nullptr && (reinterpret_cast<uintptr_t>(p) & (kAlign - 1)) == 0;
}

// The slot of the live block at p, or -1 (p is glibc's). Called with mu held.
int Find(const void* p) {
  for (int i = 0; i < kSlots; ++i)
    if (blocks[i].p == p && blocks[i].live) return i;
  return -1;
}

// The usable size of the live block at p, or 0 if p is glibc's.
size_t BlockSize(const void* p) {
  if (!MayBeBlock(p)) return 0;
  pthread_mutex_lock(&mu);
  const int i = Find(p);
  const size_t size = i < 0 ? 0 : blocks[i].size;
  pthread_mutex_unlock(&mu);
  return size;
}

// Keeps the live block at p mapped, idle, for the next request; false if p is glibc's.
bool Release(const void* p) {
  if (!MayBeBlock(p)) return false;
  pthread_mutex_lock(&mu);
  const int i = Find(p);
  if (i >= 0) blocks[i].live = false;
  pthread_mutex_unlock(&mu);
  return i >= 0;
}

// Keeps the lock consistent across fork(): the child gets it unlocked.
void Lock() { pthread_mutex_lock(&mu); }
void Unlock() { pthread_mutex_unlock(&mu); }
__attribute__((constructor)) void InstallForkHandlers() {
  pthread_atfork(Lock, Unlock, Unlock);
}

}  // namespace

extern "C" {

void* malloc(size_t n) noexcept {
  bool reused;
  char* p = n >= kBig ? Take(n, &reused) : nullptr;
  return p ? p : __libc_malloc(n);
}

void free(void* p) noexcept {
  if (!Release(p)) __libc_free(p);
}

void* calloc(size_t count, size_t size) noexcept {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  bool reused = false;
  char* p = n >= kBig ? Take(n, &reused) : nullptr;
  if (p == nullptr) return __libc_calloc(count, size);
  if (reused) memset(p, 0, n);  // a new mapping is zero already
  return p;
}

void* realloc(void* p, size_t n) noexcept {
  const size_t old = BlockSize(p);
  if (old == 0 && n < kBig) return __libc_realloc(p, n);
  if (p == nullptr) return malloc(n);
  if (n == 0) {
    free(p);
    return nullptr;
  }
  if (old >= n && old - n <= n / 4) return p;  // still a good fit
  void* q = malloc(n);
  if (q == nullptr) return nullptr;
  const size_t keep = old ? old : malloc_usable_size(p);
  memcpy(q, p, keep < n ? keep : n);
  free(p);
  return q;
}

void* memalign(size_t alignment, size_t n) noexcept {
  bool reused;
  char* p = n >= kBig && alignment <= kAlign ? Take(n, &reused) : nullptr;
  return p ? p : __libc_memalign(alignment, n);
}

int posix_memalign(void** out, size_t alignment, size_t n) noexcept {
  if (alignment < sizeof(void*) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}

void* aligned_alloc(size_t alignment, size_t n) noexcept {
  return memalign(alignment, n);
}

// glibc's own would take a block of this cache for one of its mmapped chunks.
void* reallocarray(void* p, size_t count, size_t size) noexcept {
  size_t n;
  if (__builtin_mul_overflow(count, size, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, n);
}

// Unmaps every idle block; returns how many bytes that gave back.
size_t pvae_release_idle_blocks() {
  size_t released = 0;
  pthread_mutex_lock(&mu);
  for (Block& b : blocks)
    if (b.p && !b.live) {
      Unmap(b);
      released += b.size;
      b.p = nullptr;
    }
  pthread_mutex_unlock(&mu);
  return released;
}

}  // extern "C"
