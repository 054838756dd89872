//! The part that runs in a signal handler: a `SIGPROF` from a thread's CPU-time timer
//! interrupts it, and the handler records where it was (its instruction pointer and the
//! return addresses up its frame-pointer chain) into a fixed ring of slots.
//!
//! What runs here allocates nothing, takes no lock, and cannot fault: stack memory is
//! copied with `process_vm_readv` on the process itself, one page at a time, so a frame
//! pointer into unmapped or protected memory ends the walk instead of crashing. A sample
//! that finds no free slot is counted, not lost silently.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Deepest stack recorded.
pub const MAX_DEPTH: usize = 128;
/// Samples the ring holds between two drains.
pub const SLOTS: usize = 512;

const FREE: u32 = 0;
const WRITING: u32 = 1;
const READY: u32 = 2;

pub struct Slot {
    state: AtomicU32,
    body: UnsafeCell<Body>,
}

/// A recorded sample: the thread, and its stack leaf first (the leaf is the interrupted
/// instruction, the rest return addresses).
#[derive(Clone, Copy)]
pub struct Body {
    pub tid: i32,
    /// Periods of CPU this sample stands for: 1, plus the timer's expirations that came
    /// while its signal was still pending.
    pub weight: u32,
    pub depth: u32,
    pub frames: [u64; MAX_DEPTH],
}

// SAFETY: a slot's body is written only by the handler that moved its state FREE ->
// WRITING, and read only by the drainer after it saw READY, before it sets FREE again.
unsafe impl Sync for Slot {}

pub struct Ring {
    slots: [Slot; SLOTS],
    /// Where the next handler starts looking for a free slot.
    hint: AtomicU32,
    /// Samples with no free slot.
    pub dropped_full: AtomicU64,
    /// Samples taken.
    pub taken: AtomicU64,
    pid: AtomicI32,
}

pub static RING: Ring = Ring {
    slots: [const { Slot { state: AtomicU32::new(FREE), body: UnsafeCell::new(Body { tid: 0, weight: 0, depth: 0, frames: [0; MAX_DEPTH] }) } }; SLOTS],
    hint: AtomicU32::new(0),
    dropped_full: AtomicU64::new(0),
    taken: AtomicU64::new(0),
    pid: AtomicI32::new(0),
};

impl Ring {
    /// Takes every recorded sample out of the ring, oldest slots first.
    pub fn drain(&self, mut each: impl FnMut(&Body)) {
        for slot in &self.slots {
            if slot.state.load(Ordering::Acquire) == READY {
                // SAFETY: READY: the handler is done with it, and no other drainer runs.
                each(unsafe { &*slot.body.get() });
                slot.state.store(FREE, Ordering::Release);
            }
        }
    }
}

/// Installs the handler for `SIGPROF`. Samples come only from timers (`SI_TIMER`).
pub fn install() -> std::io::Result<()> {
    RING.pid.store(std::process::id() as i32, Ordering::Relaxed);
    // SAFETY: a plain sigaction with a handler that is async-signal-safe (see the module).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigprof as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGPROF, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Copies the page of this process's memory holding `address` into `page`; false when it
/// cannot be read (unmapped, protected).
fn read_page(pid: i32, address: u64, page: &mut [u8; 4096]) -> bool {
    let base = address & !4095;
    let local = libc::iovec { iov_base: page.as_mut_ptr().cast(), iov_len: 4096 };
    let remote = libc::iovec { iov_base: base as *mut libc::c_void, iov_len: 4096 };
    // SAFETY: the local buffer is ours and 4096 bytes long; the kernel checks the remote one.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    n == 4096
}

extern "C" fn on_sigprof(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler.
    let errno = unsafe { *libc::__errno_location() };
    if unsafe { (*info).si_code } == libc::SI_TIMER {
        let overrun = unsafe { (*info).si_overrun() };
        record(context, 1 + overrun.max(0) as u32);
    }
    unsafe { *libc::__errno_location() = errno };
}

fn record(context: *mut libc::c_void, weight: u32) {
    let ring = &RING;
    ring.taken.fetch_add(1, Ordering::Relaxed);
    let start = ring.hint.fetch_add(1, Ordering::Relaxed) as usize;
    let Some(slot) = (0..SLOTS).map(|i| &ring.slots[(start + i) % SLOTS]).find(|s| {
        s.state.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }) else {
        ring.dropped_full.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // SAFETY: WRITING is ours; the ucontext is the interrupted thread's.
    let body = unsafe { &mut *slot.body.get() };
    let (ip, sp, fp) = unsafe {
        let registers = &(*(context as *const libc::ucontext_t)).uc_mcontext.gregs;
        (registers[libc::REG_RIP as usize] as u64, registers[libc::REG_RSP as usize] as u64, registers[libc::REG_RBP as usize] as u64)
    };
    body.tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    body.weight = weight;
    body.frames[0] = ip;
    body.depth = 1 + walk(ring.pid.load(Ordering::Relaxed), sp, fp, &mut body.frames[1..]) as u32;
    slot.state.store(READY, Ordering::Release);
}

/// Farthest a frame record may sit above the one below it (or above the stack pointer).
const FRAME_SPAN: u64 = 8 << 20;
/// Words above the stack pointer searched for a frame record when the frame-pointer
/// register holds none.
const SCAN_WORDS: u64 = 32;
/// Farthest the caller's frame record found that way may be: a system-call wrapper's
/// caller is a frame or two up, and a near bound keeps a stray stack pointer among the
/// wrapper's locals from being taken for it.
const SCAN_SPAN: u64 = 64 << 10;

/// Whether `fp` can be a frame record above `below`: aligned, above it, within reach.
fn plausible(fp: u64, below: u64) -> bool {
    fp >= below && fp % 8 == 0 && fp - below < FRAME_SPAN
}

/// Follows the frame-pointer chain from `fp` (each frame: the caller's frame pointer, then
/// the return address), no lower than the stack pointer `sp`, always upward; returns how
/// many return addresses it wrote into `out`.
///
/// glibc's system-call wrappers (`send`, `recv`, `epoll_wait`) keep the thread's cancel
/// state in the frame-pointer register around the call, where most samples of a busy
/// server land; `fp` is then no frame at all. The wrapper saved the caller's frame pointer
/// on its own frame, next to its return address: the walk starts from the first word
/// above `sp` that points to a frame record which itself points up the stack.
fn walk(pid: i32, sp: u64, mut fp: u64, out: &mut [u64]) -> usize {
    let mut page = [0u8; 4096];
    let mut page_base = u64::MAX;
    let mut read = |address: u64, page: &mut [u8; 4096]| -> Option<u64> {
        if address & !4095 != page_base {
            if !read_page(pid, address, page) {
                return None;
            }
            page_base = address & !4095;
        }
        let at = (address & 4095) as usize;
        Some(u64::from_ne_bytes(page[at..at + 8].try_into().ok()?))
    };
    if !plausible(fp, sp) {
        let found = (0..SCAN_WORDS).map(|i| sp + 8 * i).find(|slot| {
            read(*slot, &mut page).is_some_and(|saved| {
                plausible(saved, slot + 16)
                    && saved - slot < SCAN_SPAN
                    && read(saved, &mut page).is_some_and(|up| up == 0 || plausible(up, saved + 16))
            })
        });
        if let Some(slot) = found {
            fp = slot;
        }
    }
    let mut n = 0;
    while n < out.len() {
        // A frame record is two aligned words, on the stack above the interrupted frame.
        if fp < sp || fp % 8 != 0 {
            break;
        }
        let (Some(next), Some(ret)) = (read(fp, &mut page), read(fp + 8, &mut page)) else { break };
        if ret == 0 {
            break;
        }
        out[n] = ret;
        n += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_finds_the_chain_a_system_call_wrapper_hid() {
        // A stack as `send` leaves it: its locals, the caller's frame pointer it saved and
        // its return address; above, the caller's frame record, then its caller's (the last).
        let mut stack = [0u64; 16];
        let base = stack.as_ptr() as u64;
        stack[0] = 7; // the wrapper's locals: not pointers up the stack
        stack[1] = base + 4096 * 1024; // a pointer far up the stack, or past it
        stack[4] = base + 8 * 8; // saved frame pointer -> the caller's record at [8]
        stack[5] = 0x1111; // return into the caller
        stack[8] = base + 12 * 8;
        stack[9] = 0x2222;
        stack[12] = 0;
        stack[13] = 0x3333;
        let pid = std::process::id() as i32;
        let mut out = [0u64; 8];
        // The frame-pointer register holds the cancel state, a small number.
        let n = walk(pid, base, 1, &mut out);
        assert_eq!(&out[..n], &[0x1111, 0x2222, 0x3333]);
        // With a frame pointer, the chain is followed from it.
        let n = walk(pid, base, base + 8 * 8, &mut out);
        assert_eq!(&out[..n], &[0x2222, 0x3333]);
        std::hint::black_box(&mut stack);
    }

    #[test]
    fn a_walk_stops_at_memory_it_cannot_read() {
        let pid = std::process::id() as i32;
        let mut out = [0u64; 8];
        // An address nothing is mapped at: nothing written, no fault.
        assert_eq!(walk(pid, 0x10, 0x1000, &mut out), 0);
    }
}
