//! The few syscalls of the datapath that aya does not make: the boot clock, filesystem
//! magic numbers, mounting cgroup2 and bpffs. Every `unsafe` of the crate besides the `Pod`
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
