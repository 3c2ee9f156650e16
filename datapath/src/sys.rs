//! The few syscalls of the datapath that aya does not make: the boot clock, filesystem
//! magic numbers, mounting cgroup2 and bpffs, inotify on cgroup directories. Every `unsafe` of the crate besides the `Pod`
//! impls of `maps.rs` is here.
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `CGROUP2_SUPER_MAGIC`.
pub const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// `BPF_FS_MAGIC`.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// CLOCK_BOOTTIME in nanoseconds: the clock of `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every kernel
    // that runs these programs, and clock_gettime writes nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// The filesystem magic number of `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Mounts a filesystem of type `fstype` (no source, no data) at `target`.
pub fn mount(fstype: &str, target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    let fstype = CString::new(fstype).expect("no NUL");
    let source = CString::new("none").expect("no NUL");
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An inotify instance watching directories for entries created or removed (cgroup
/// directories appearing under an endpoint's parent).
#[derive(Debug)]
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    /// A new instance (close-on-exec).
    pub fn new() -> io::Result<DirWatch> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this process owns and nothing else closes.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(DirWatch { fd })
    }

    /// Watches `dir` for entries created, removed or moved (adding a directory twice is
    /// harmless: the kernel keeps one watch).
    pub fn add(&self, dir: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let c = c_path(dir)?;
        let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO | libc::IN_MOVED_FROM;
        // SAFETY: the fd is a live inotify instance and `c` a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until at least one event arrives, or `timeout_ms` passes; returns whether
    /// events arrived (their contents are drained and not needed: any change means "sync").
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length; the fd is readable (poll said so); a
        // short or failed read only loses events that were "something changed" anyway.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        Ok(true)
    }
}
