//! Persisted state files: one directory per process, one file per kind of state, each written
//! atomically and checked whole on load.
//!
//! # File format (version 1)
//!
//! All integers little-endian.
//!
//! | offset | size | field                                                         |
//! |-------:|-----:|---------------------------------------------------------------|
//! | 0      | 8    | magic `b"DFSTATE\0"`                                          |
//! | 8      | 2    | format version ([`FORMAT_VERSION`])                           |
//! | 10     | 2    | reserved, 0                                                   |
//! | 12     | 4    | kind tag ([`Kind`], four ASCII bytes)                         |
//! | 16     | 8    | snapshot version (the caller's `u64`)                         |
//! | 24     | 8    | payload length `n`                                            |
//! | 32     | n    | payload                                                       |
//! | 32 + n | 4    | CRC-32 (IEEE) of bytes `0 .. 32 + n`                          |
//!
//! The file is exactly `36 + n` bytes long; anything else (shorter, longer, a length over the
//! limit) is corruption. CRC-32 detects torn and bit-flipped files; it is not a MAC. The
//! directory is mode 0700 and the files 0600, so only the owner can forge one.
//!
//! # Guarantees
//!
//! - [`StateDir::save`] is atomic: a temp file in the same directory is written, fsynced,
//!   renamed over the old file, and the directory is fsynced. A crash at any point leaves either
//!   the old file or the new one, never a mix; a temp file left by a crash is removed by the next
//!   [`StateDir::open`] or save of that name.
//! - [`StateDir::load`] never hands out a damaged payload: a file that is truncated, has the
//!   wrong magic, format version, kind, length or checksum, or cannot be read, is renamed to
//!   `<name>.corrupt-<unix-seconds>` (at most [`KEEP_CORRUPT`] are kept per name) and reported
//!   as [`StateError::Corrupt`], whose `Display` is one line: print it and fail closed.
//! - A forged length cannot make it allocate: the payload length is checked against the limit
//!   and against the file's size before anything is read.
//! - One process per directory: [`StateDir::open`] takes an exclusive `flock` on
//!   `<dir>/.lock` for the life of the `StateDir` (released by the kernel however the process
//!   exits), so the temp-file clean-up never races another writer.
//!
//! Every call does blocking file I/O (fsync: milliseconds on a busy disk). Call it from a
//! control thread, never from a shard.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"DFSTATE\0";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 32;
/// Bytes after the payload (the CRC-32).
pub const TRAILER_LEN: usize = 4;
/// The default bound on a payload, in bytes (256 MiB).
pub const DEFAULT_MAX_PAYLOAD: u64 = 256 << 20;
/// How many set-aside corrupt files are kept per name (the oldest go first).
pub const KEEP_CORRUPT: usize = 3;

const LOCK_FILE: &str = ".lock";
/// Mode bits of a directory shared with others: sticky, group or other writable.
const SHARED_BITS: u32 = 0o1000 | 0o022;
const TMP_PREFIX: &str = ".";
const TMP_SUFFIX: &str = ".tmp";
const CORRUPT_INFIX: &str = ".corrupt-";

/// What a state file holds: four ASCII bytes stored in the header, checked on load so that a
/// file of one kind is never decoded as another.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kind(pub [u8; 4]);

impl Kind {
    /// The last policy snapshot a process received or compiled (`POLS`).
    pub const POLICY_SNAPSHOT: Kind = Kind(*b"POLS");
    /// The FQDN cache: observed name → addresses (`FQDN`).
    pub const FQDN_CACHE: Kind = Kind(*b"FQDN");
    /// Observations and flow records not yet acknowledged by the agent (`RPLY`).
    pub const REPLAY: Kind = Kind(*b"RPLY");
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kind({self})")
    }
}

/// A state file read back whole and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The snapshot version given to [`StateDir::save`].
    pub version: u64,
    /// The payload, exactly as saved.
    pub payload: Vec<u8>,
}

/// Why a state file was judged corrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    /// The file ends before its header, payload or checksum does.
    Truncated {
        /// Bytes in the file.
        len: u64,
        /// Bytes the format needs (the header, or the header's length plus payload and CRC).
        needed: u64,
    },
    /// The file is longer than its header says.
    TrailingBytes {
        /// Bytes in the file.
        len: u64,
        /// Bytes the header accounts for.
        expected: u64,
    },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic,
    /// A format version this build does not read.
    UnsupportedFormat(u16),
    /// The reserved header field is not zero.
    BadReserved(u16),
    /// The file holds another kind of state.
    WrongKind {
        /// The kind the caller asked for.
        expected: Kind,
        /// The kind in the file.
        found: Kind,
    },
    /// The declared payload length is over the limit.
    TooLong {
        /// Declared payload length.
        declared: u64,
        /// The limit.
        max: u64,
    },
    /// The checksum does not match the contents.
    BadChecksum {
        /// CRC stored in the file.
        stored: u32,
        /// CRC of what was read.
        computed: u32,
    },
    /// The path is not a regular file (a directory, a socket, ...).
    NotAFile,
    /// Reading the file failed.
    Unreadable(String),
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Truncated { len, needed } => {
                write!(f, "truncated ({len} bytes, at least {needed} needed)")
            }
            Corruption::TrailingBytes { len, expected } => {
                write!(f, "{len} bytes where the header accounts for {expected}")
            }
            Corruption::BadMagic => write!(f, "not a dnsfence state file (bad magic)"),
            Corruption::UnsupportedFormat(v) => write!(
                f,
                "format version {v} is not supported (this build reads {FORMAT_VERSION})"
            ),
            Corruption::BadReserved(v) => write!(f, "reserved header field is {v:#06x}, not 0"),
            Corruption::WrongKind { expected, found } => {
                write!(f, "holds kind {found}, expected {expected}")
            }
            Corruption::TooLong { declared, max } => {
                write!(
                    f,
                    "declared payload of {declared} bytes exceeds the limit of {max}"
                )
            }
            Corruption::BadChecksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            Corruption::NotAFile => write!(f, "not a regular file"),
            Corruption::Unreadable(e) => write!(f, "unreadable: {}", one_line(e)),
        }
    }
}

/// Errors of the state directory. Every `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file was corrupt; it has been moved aside.
    #[error("state file {path:?}: {reason}; moved aside to {moved_to:?}")]
    Corrupt {
        /// The file's path.
        path: PathBuf,
        /// What was wrong with it.
        reason: Corruption,
        /// Where it is now.
        moved_to: PathBuf,
    },
    /// The file was corrupt and could not be moved aside either.
    #[error("state file {path:?}: {reason}; could not move it aside: {}", one_line(&source.to_string()))]
    CorruptNotMoved {
        /// The file's path.
        path: PathBuf,
        /// What was wrong with it.
        reason: Corruption,
        /// Why the rename failed.
        source: io::Error,
    },
    /// An I/O operation on the directory or a file failed.
    #[error("state dir: {op} {path:?}: {}", one_line(&source.to_string()))]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another process holds the directory's lock.
    #[error("state dir {path:?} is in use by another process (lock {:?} is held)", path.join(LOCK_FILE))]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The path exists and is not a directory (a symlink is not followed).
    #[error("state dir {path:?} exists and is not a directory (a symlink is not followed)")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The directory belongs to another user, or others may write it (sticky or group/other
    /// writable): a state directory must be the process's own.
    #[error(
        "state dir {path:?} is not a directory of this process's own (mode {mode:o}, owner uid \
         {owner}): give it a directory only it uses"
    )]
    Shared {
        /// The path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// Its owner.
        owner: u32,
    },
    /// A name that is not a plain file name of `[A-Za-z0-9_.-]`, or starts with a dot.
    #[error("invalid state file name {name:?} (use [A-Za-z0-9_.-], not starting with '.')")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The payload to save is over the limit (it could not be loaded back).
    #[error("state file {name:?}: payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The name given.
        name: String,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The order of set-aside files: (unix seconds, sequence within that second).
type CorruptKey = (u64, u32);

/// A process's state directory, locked for its exclusive use while this value lives.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    max_payload: u64,
    // Holds the exclusive flock; dropped (and so released) with the StateDir.
    _lock: File,
}

impl StateDir {
    /// Opens (creating it, mode 0700, if absent) the state directory at `path` and locks it;
    /// an existing directory is chmodded to 0700. Removes temp files a crashed save left.
    /// Payloads are bounded by [`DEFAULT_MAX_PAYLOAD`].
    pub fn open(path: impl Into<PathBuf>) -> Result<StateDir, StateError> {
        Self::open_with_limit(path, DEFAULT_MAX_PAYLOAD)
    }

    /// [`StateDir::open`] with another bound on payloads (a flag of the binary).
    pub fn open_with_limit(
        path: impl Into<PathBuf>,
        max_payload: u64,
    ) -> Result<StateDir, StateError> {
        let path = path.into();
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(StateError::NotADirectory { path });
            }
            Err(e) => return Err(io_err("create", &path)(e)),
        }
        // Not followed if a symlink (one planted in a shared parent could point at /etc).
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        if !meta.is_dir() {
            return Err(StateError::NotADirectory { path });
        }
        // A directory of another user, or one others may write (`/tmp`, a home): refused,
        // not made 0700 and cleaned of temp-named files (review finding).
        let mode = meta.permissions().mode();
        let euid = rustix::process::geteuid().as_raw();
        if meta.uid() != euid || mode & (SHARED_BITS) != 0 {
            return Err(StateError::Shared {
                path,
                mode: mode & 0o7777,
                owner: meta.uid(),
            });
        }
        if mode & 0o777 != 0o700 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod 0700", &path))?;
        }
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StateError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let dir = StateDir {
            path,
            max_payload,
            _lock: lock,
        };
        dir.remove_temp_files()?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bound on payloads.
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// The path of the file `name` (after validating the name).
    pub fn file_path(&self, name: &str) -> Result<PathBuf, StateError> {
        check_name(name)?;
        Ok(self.path.join(name))
    }

    /// Writes `payload` as the state `name` of kind `kind` and version `version`, atomically
    /// (temp file, fsync, rename, fsync of the directory). Blocks on the disk.
    pub fn save(
        &self,
        name: &str,
        kind: Kind,
        version: u64,
        payload: &[u8],
    ) -> Result<(), StateError> {
        let path = self.file_path(name)?;
        let len = payload.len() as u64;
        if len > self.max_payload {
            return Err(StateError::TooLarge {
                name: name.to_string(),
                len,
                max: self.max_payload,
            });
        }
        let tmp = self.path.join(format!("{TMP_PREFIX}{name}{TMP_SUFFIX}"));
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale temp file", &tmp)(e)),
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&kind.0);
        header[16..24].copy_from_slice(&version.to_le_bytes());
        header[24..32].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(payload);
        let crc = crc.finalize();

        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&header)?;
            f.write_all(payload)?;
            f.write_all(&crc.to_le_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename into place", &path)(e));
        }
        self.sync_dir()
    }

    /// Reads the state `name`, expecting kind `kind`. `Ok(None)` when there is no such file;
    /// [`StateError::Corrupt`] (the file moved aside) when it is damaged in any way. Blocks on
    /// the disk.
    pub fn load(&self, name: &str, kind: Kind) -> Result<Option<Loaded>, StateError> {
        let path = self.file_path(name)?;
        self.read_checked(&path, kind).map_err(|e| match e {
            Unread::Corrupt(reason) => self.set_aside(name, &path, reason),
            Unread::Io(source) => io_err("open", &path)(source),
        })
    }

    /// Removes the state `name`, if present (and fsyncs the directory).
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let path = self.file_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn read_checked(&self, path: &Path, kind: Kind) -> Result<Option<Loaded>, Unread> {
        // Not through a symlink, and never waiting on a FIFO (whose open would block until
        // a writer came): what is opened is checked to be a plain file right after.
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        let mut f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // A symlink (O_NOFOLLOW), a socket: not a state file.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => {
                return Err(Unread::Corrupt(Corruption::Unreadable(e.to_string())));
            }
            // Permissions, descriptors, the disk: not the file's fault (review finding: a
            // good policy file was moved aside, and later pruned, for an EACCES).
            Err(e) => return Err(Unread::Io(e)),
        };
        self.read_opened(&mut f, kind)
            .map(Some)
            .map_err(Unread::Corrupt)
    }

    /// The content of an opened state file, checked.
    fn read_opened(&self, f: &mut File, kind: Kind) -> Result<Loaded, Corruption> {
        let meta = f
            .metadata()
            .map_err(|e| Corruption::Unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(Corruption::NotAFile);
        }
        let file_len = meta.len();
        let mut header = [0u8; HEADER_LEN];
        if file_len < HEADER_LEN as u64 {
            return Err(Corruption::Truncated {
                len: file_len,
                needed: (HEADER_LEN + TRAILER_LEN) as u64,
            });
        }
        read_exact(f, &mut header, file_len)?;
        let h = parse_header(&header, kind, self.max_payload)?;
        let expected = HEADER_LEN as u64 + h.payload_len + TRAILER_LEN as u64;
        if file_len < expected {
            return Err(Corruption::Truncated {
                len: file_len,
                needed: expected,
            });
        }
        if file_len > expected {
            return Err(Corruption::TrailingBytes {
                len: file_len,
                expected,
            });
        }
        // Bounded: payload_len <= max_payload and the file really has that many bytes.
        let mut payload = vec![0u8; h.payload_len as usize];
        read_exact(f, &mut payload, file_len)?;
        let mut trailer = [0u8; TRAILER_LEN];
        read_exact(f, &mut trailer, file_len)?;
        let stored = u32::from_le_bytes(trailer);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header);
        crc.update(&payload);
        let computed = crc.finalize();
        if stored != computed {
            return Err(Corruption::BadChecksum { stored, computed });
        }
        Ok(Loaded {
            version: h.version,
            payload,
        })
    }

    /// Renames a corrupt file to `<name>.corrupt-<secs>[-<n>]` and prunes old ones.
    fn set_aside(&self, name: &str, path: &Path, reason: Corruption) -> StateError {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Names sort in the order files were set aside, even within one second or when the
        // clock steps back: the next one follows the newest present.
        let newest = self
            .corrupt_names(name)
            .ok()
            .and_then(|v| v.last().map(|(key, _)| *key));
        let (secs, n) = match newest {
            Some((secs, n)) if secs >= now => (secs, n + 1),
            _ => (now, 1),
        };
        let moved_to = if n == 1 {
            self.path.join(format!("{name}{CORRUPT_INFIX}{secs}"))
        } else {
            self.path.join(format!("{name}{CORRUPT_INFIX}{secs}-{n}"))
        };
        if let Err(source) = fs::rename(path, &moved_to) {
            return StateError::CorruptNotMoved {
                path: path.to_path_buf(),
                reason,
                source,
            };
        }
        let _ = self.sync_dir();
        self.prune_corrupt(name);
        StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
            moved_to,
        }
    }

    /// The set-aside files of `name`, oldest first.
    pub fn corrupt_files(&self, name: &str) -> Result<Vec<PathBuf>, StateError> {
        check_name(name)?;
        Ok(self
            .corrupt_names(name)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// The set-aside files of `name` with their (seconds, sequence) keys, oldest first.
    fn corrupt_names(&self, name: &str) -> Result<Vec<(CorruptKey, PathBuf)>, StateError> {
        let prefix = format!("{name}{CORRUPT_INFIX}");
        let mut found: Vec<(CorruptKey, PathBuf)> = Vec::new();
        let rd = fs::read_dir(&self.path).map_err(io_err("list", &self.path))?;
        for entry in rd.flatten() {
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(rest) = file_name.strip_prefix(&prefix) else {
                continue;
            };
            let (secs, n) = match rest.split_once('-') {
                Some((s, n)) => (s.parse::<u64>(), n.parse::<u32>()),
                None => (rest.parse::<u64>(), Ok(1)),
            };
            if let (Ok(secs), Ok(n)) = (secs, n) {
                found.push(((secs, n), entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    fn prune_corrupt(&self, name: &str) {
        let Ok(files) = self.corrupt_files(name) else {
            return;
        };
        let excess = files.len().saturating_sub(KEEP_CORRUPT);
        for p in &files[..excess] {
            let gone = match fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(p),
                _ => fs::remove_file(p),
            };
            let _ = gone;
        }
    }

    fn remove_temp_files(&self) -> Result<(), StateError> {
        let rd = fs::read_dir(&self.path).map_err(io_err("list", &self.path))?;
        for entry in rd.flatten() {
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(inner) = file_name
                .strip_prefix(TMP_PREFIX)
                .and_then(|s| s.strip_suffix(TMP_SUFFIX))
            else {
                continue;
            };
            if check_name(inner).is_err() {
                continue;
            }
            let p = entry.path();
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove stale temp file", &p)(e)),
            }
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StateError> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.path))
    }
}

struct Header {
    version: u64,
    payload_len: u64,
}

fn parse_header(h: &[u8; HEADER_LEN], kind: Kind, max: u64) -> Result<Header, Corruption> {
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if h[0..8] != MAGIC {
        return Err(Corruption::BadMagic);
    }
    let format = u16_at(8);
    if format != FORMAT_VERSION {
        return Err(Corruption::UnsupportedFormat(format));
    }
    let reserved = u16_at(10);
    if reserved != 0 {
        return Err(Corruption::BadReserved(reserved));
    }
    let found = Kind([h[12], h[13], h[14], h[15]]);
    if found != kind {
        return Err(Corruption::WrongKind {
            expected: kind,
            found,
        });
    }
    let payload_len = u64_at(24);
    if payload_len > max {
        return Err(Corruption::TooLong {
            declared: payload_len,
            max,
        });
    }
    Ok(Header {
        version: u64_at(16),
        payload_len,
    })
}

/// Why a state file was not read: its content (set aside), or the system (left in place).
enum Unread {
    Corrupt(Corruption),
    Io(io::Error),
}

fn read_exact(f: &mut File, buf: &mut [u8], file_len: u64) -> Result<(), Corruption> {
    f.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            // The file shrank while we read it.
            Corruption::Truncated {
                len: file_len,
                needed: file_len + 1,
            }
        } else {
            Corruption::Unreadable(e.to_string())
        }
    })
}

fn check_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains(CORRUPT_INFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidName {
            name: name.to_string(),
        })
    }
}
