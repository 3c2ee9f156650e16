//! The few syscalls of the datapath that aya does not make: the boot clock, filesystem
//! magic numbers, mounting cgroup2 and bpffs, inotify on cgroup directories, what a pinned
//! cgroup link is attached to. Every `unsafe` of the crate besides the `Pod`
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

/// What a pinned bpf_link is, as the kernel says (`struct bpf_link_info`, its cgroup arm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The program it runs.
    pub prog_id: u32,
    /// For a cgroup link: the cgroup it is attached to, 0 once detached.
    pub cgroup_id: u64,
    /// For a cgroup link: `BPF_CGROUP_*`.
    pub attach_type: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The kernel's `struct bpf_link_info` up to its cgroup arm (the kernel fills as many bytes as
/// it is given).
#[repr(C, align(8))]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What the link pinned at `path` is (`BPF_OBJ_GET`, then `BPF_OBJ_GET_INFO_BY_FD`).
pub fn pinned_link_info(path: &Path) -> io::Result<LinkInfo> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let c = c_path(path)?;
    // The `obj` arm of `union bpf_attr`: pathname, bpf_fd, file_flags (zero-padded).
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: a zero-padded bpf_attr for BPF_OBJ_GET whose pathname points to a
    // NUL-terminated string that outlives the call; the kernel only reads it.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = RawLinkInfo::default();
    // The `info` arm: bpf_fd, info_len, info (pointer).
    let mut attr = [0u64; 2];
    attr[0] = u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32)
        | (std::mem::size_of::<RawLinkInfo>() as u64) << 32;
    attr[1] = &mut info as *mut RawLinkInfo as u64;
    // SAFETY: a bpf_attr for BPF_OBJ_GET_INFO_BY_FD; the kernel writes at most `info_len`
    // bytes to `info`, a live, writable struct of that size.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(LinkInfo {
        link_type: info.link_type,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// The `bpf(2)` syscall with `attr` as its `union bpf_attr`; its non-negative result.
///
/// # Safety
///
/// `attr` must be a valid `bpf_attr` for `cmd`: every pointer in it valid for what the
/// kernel reads or writes there, for the length of the call.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; its size is passed with it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
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

/// The first bytes of a file, mapped shared by every process that maps the same file: a few
/// 64-bit words and a ring of fixed-size slots, all read and written as atomic 64-bit words
/// (sound whoever else touches them; a slot's words are consistent with one another only
/// under a lock the processes share: the allow writers' flock). The allow writers' epoch and
/// the ring of the entries their revocations removed live in their lock file (see `sink`).
pub struct SharedRegion {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: the mapping is accessed only through atomic 64-bit words; it lives until `drop`.
unsafe impl Send for SharedRegion {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion {}

/// Words at the start of the region.
pub const SHARED_WORDS: usize = 8;
/// Bytes of one ring slot.
pub const SLOT_LEN: usize = 32;
/// The length mapped: 64 KiB (the words, then the ring).
const SHARED_LEN: usize = 64 << 10;
/// Slots in the ring.
pub const RING_SLOTS: usize = (SHARED_LEN - SHARED_WORDS * 8) / SLOT_LEN;

impl SharedRegion {
    /// Maps the first [`SHARED_LEN`] bytes of `file` (opened for reading and writing),
    /// allocating them if the file is shorter (the added bytes read as zero; allocated, not a
    /// hole, so that a full tmpfs fails here instead of raising SIGBUS at the first touch).
    pub fn map(file: &std::fs::File) -> io::Result<SharedRegion> {
        use std::os::fd::AsRawFd;
        // Always (a hole left by an older build's `set_len` is allocated too); where the
        // filesystem cannot, the length at least.
        match rustix::fs::fallocate(
            file,
            rustix::fs::FallocateFlags::empty(),
            0,
            SHARED_LEN as u64,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                if file.metadata()?.len() < SHARED_LEN as u64 {
                    file.set_len(SHARED_LEN as u64)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        // SAFETY: a fresh shared mapping of a file descriptor we own, of a length the file
        // now has; the kernel picks the address; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SHARED_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedRegion { ptr })
    }

    /// The 64-bit word at byte offset `at` (8-aligned, within the mapping).
    fn at(&self, at: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            at.is_multiple_of(8) && at + 8 <= SHARED_LEN,
            "shared word at {at}"
        );
        // SAFETY: the mapping is page-aligned, so an 8-aligned offset within it is an aligned,
        // in-bounds u64; it lives as long as `self`, and every process touches it only
        // through atomics.
        unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(at)
                .cast::<std::sync::atomic::AtomicU64>()
        }
    }

    /// Word `i` (< [`SHARED_WORDS`]).
    pub fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < SHARED_WORDS, "shared word {i}");
        self.at(i * 8)
    }

    /// Writes ring slot `i % RING_SLOTS` (consistent for a reader under the same lock).
    pub fn write_slot(&self, i: u64, bytes: &[u8; SLOT_LEN]) {
        use std::sync::atomic::Ordering;
        let base = SHARED_WORDS * 8 + (i % RING_SLOTS as u64) as usize * SLOT_LEN;
        for (w, chunk) in bytes.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.at(base + w * 8).store(v, Ordering::Relaxed);
        }
    }

    /// Reads ring slot `i % RING_SLOTS` (consistent under the writers' lock).
    pub fn read_slot(&self, i: u64) -> [u8; SLOT_LEN] {
        use std::sync::atomic::Ordering;
        let base = SHARED_WORDS * 8 + (i % RING_SLOTS as u64) as usize * SLOT_LEN;
        let mut out = [0u8; SLOT_LEN];
        for (w, chunk) in out.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.at(base + w * 8).load(Ordering::Relaxed).to_le_bytes());
        }
        out
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` made; no reference to it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), SHARED_LEN);
        }
    }
}
