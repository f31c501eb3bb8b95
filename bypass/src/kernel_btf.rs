//! Loading without parsing the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` always reads and parses `/sys/kernel/btf/vmlinux` (5 MB on
//! Debian's 6.x kernels), which took about 20 ms and 15 MB of peak memory at every start.
//! The bypass programs need no CO-RE relocation against kernel types, so that work is
//! wasted. [`without_kernel_btf`] runs the loading on a thread with a mount namespace of its
//! own, in which an empty file hides that path: the parse fails at once and aya loads
//! without kernel BTF, as `EbpfLoader::btf(None)` would. Nothing changes outside the thread:
//! its namespace is private and disappears when the thread ends.
//!
//! NOTE: this needs CAP_SYS_ADMIN; without it, `f` runs on the calling thread with the
//! kernel's BTF parsed as usual.

use std::{ffi::CStr, io, thread};

const VMLINUX: &CStr = c"/sys/kernel/btf/vmlinux";
const EMPTY_FILE: &CStr = c"/dev/null";

/// Runs `f` where `/sys/kernel/btf/vmlinux` reads as empty, if this process may set that up.
pub fn without_kernel_btf<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        let worker = scope.spawn(|| match hide_vmlinux() {
            Ok(()) => Ok(f()),
            Err(err) => Err((err, f)),
        });
        match worker.join() {
            Ok(Ok(value)) => value,
            Ok(Err((err, f))) => {
                log::debug!("loading with the kernel's BTF parsed: cannot hide it: {err}");
                f()
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves this thread into a new, private mount namespace and bind-mounts an empty file
/// over the kernel's BTF there.
fn hide_vmlinux() -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls with valid NUL-terminated paths. `unshare(CLONE_NEWNS)` also
    // unshares the file system attributes, so it affects this thread only.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Private first, so the bind mount below cannot propagate back to the host.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            EMPTY_FILE.as_ptr(),
            VMLINUX.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}
