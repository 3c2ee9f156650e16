//! Hot reload of the policy and endpoint files, file by file, never failing open.
//!
//! Each check ([`Sources::check`], every `--reload-interval`) stats every file. A file whose
//! version (size, mtime, ctime, inode) differs from the one in force is read only once it has
//! *settled*: the same version at two checks in a row. It is then read once into memory; the
//! read counts only if the file's version is the same before, during (the open descriptor) and
//! after it, else the file is tried again at the next check. A file rewritten faster than the
//! interval therefore never replaces what is in force: the last good state stays, whatever is
//! on disk at any moment.
//!
//! What a version read that way does (each file on its own, see [`FileVerdict`]):
//! - every document valid: it replaces the file's policies. A file of comments only is an
//!   explicit "no policy"; so is a policy directory left with no files.
//! - some documents invalid, the endpoint selectors of each still readable: the valid ones
//!   apply, and the endpoints the invalid ones select are denied everything (fail closed).
//! - unusable (zero bytes or blank, not YAML, or an invalid document whose selectors cannot be
//!   read): the file's last good version stays in force; a file that never had one denies
//!   everything to every endpoint of its scope (the namespaces of its documents when each names
//!   one, else every endpoint).
//!
//! How a truncated or half-written file is told from an edit: by zero length, by a YAML syntax
//! error (a file cut mid-document rarely parses), and by reading one consistent version after
//! it stopped changing for one interval. A file that parses and validates is an edit, even one
//! that drops rules an earlier version had: that is legitimate. A writer that stops half-way
//! for longer than an interval, at a point where the text still validates, cannot be told from
//! an edit; write files atomically (write a sibling, rename over it), as ConfigMap mounts do.
//!
//! The endpoints file is weighed the same way, as one unit: any problem keeps the last good
//! registry. Policies and endpoints reload independently: a broken policy file never holds
//! back the registry or another policy file.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::endpoints::Endpoints;
use crate::error::{LoadError, LoadErrorKind, LoadErrors};
use crate::policy::{FileVerdict, Policy, PolicySet, parse_policy_file};
use crate::selector::LabelSelector;
use crate::snapshot::Snapshot;

/// One version of a file: what `stat` says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A file's version as seen by a check: its stamp, or `None` when it cannot be stat'ed
/// (missing, no permission).
type Version = Option<Stamp>;

fn version(path: &Path) -> Version {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
}

/// Why a read did not give one consistent version.
enum ReadError {
    /// The file changed during the read.
    Unstable,
    /// It could not be read (or is not UTF-8).
    Failed(LoadError),
}

/// Opens `path` for reading if it is a regular file (review finding: a FIFO at a policy path
/// blocked `open` for ever, and with it the agent's control loop: no reload, no repair, no
/// `/healthz` beat). It is opened without blocking and then judged on the open file, so a swap
/// between a check and the open cannot block either.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular =
        || std::io::Error::other("not a regular file (a FIFO, socket or device): not read");
    // Judged before the open too: opening some devices does something (review finding).
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

/// The largest policy or endpoints file read (review finding: a sparse file of a terabyte
/// aborted the process on the allocation of its size, at every reload and restart; a large
/// one stalled the control loop).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Reads `path` once into memory, as the version `stamp`: the open file and the path must
/// still show `stamp` after the read, and the text must have its length.
fn read_version(path: &Path, stamp: Stamp) -> Result<String, ReadError> {
    let failed = |e: std::io::Error| {
        ReadError::Failed(LoadError::new(path, 0, LoadErrorKind::Io(e.to_string())))
    };
    if stamp.len > MAX_FILE_BYTES {
        return Err(failed(std::io::Error::other(format!(
            "{} bytes, over the {} MiB a policy or endpoints file may have: not read",
            stamp.len,
            MAX_FILE_BYTES >> 20
        ))));
    }
    let mut file = open_regular(path).map_err(failed)?;
    let mut bytes = Vec::with_capacity(usize::try_from(stamp.len).unwrap_or(0) + 1);
    file.by_ref()
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    let held = file.metadata().map(|m| Stamp::of(&m)).map_err(failed)?;
    if held != stamp || version(path) != Some(stamp) || bytes.len() as u64 != stamp.len {
        return Err(ReadError::Unstable);
    }
    String::from_utf8(bytes)
        .map_err(|_| ReadError::Failed(LoadError::new(path, 0, LoadErrorKind::NotUtf8)))
}

/// Reads `path` at start: a few tries for one consistent version.
fn read_now(path: &Path) -> Result<(Stamp, String), LoadError> {
    for _ in 0..20 {
        let Some(stamp) = version(path) else {
            // Let the read say why.
            return Err(match open_regular(path) {
                Err(e) => LoadError::new(path, 0, LoadErrorKind::Io(e.to_string())),
                Ok(_) => LoadError::new(path, 0, LoadErrorKind::Unstable),
            });
        };
        match read_version(path, stamp) {
            Ok(text) => return Ok((stamp, text)),
            Err(ReadError::Failed(e)) => return Err(e),
            Err(ReadError::Unstable) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    Err(LoadError::new(path, 0, LoadErrorKind::Unstable))
}

/// What became of a file version that could not be used as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file's last good version stays in force.
    KeptLastGood,
    /// Its valid documents apply; the endpoints its invalid documents select are denied
    /// everything.
    PartlyLoaded,
    /// It never loaded: the endpoints of its scope are denied everything.
    FailedClosed,
    /// The endpoints file: the last good registry stays in force.
    KeptLastGoodEndpoints,
}

/// A file version that was rejected (in whole or in part), with its `FILE:LINE: reason`s.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The file.
    pub file: PathBuf,
    /// What is wrong with it.
    pub errors: LoadErrors,
    /// What is in force instead.
    pub outcome: Outcome,
}

/// The result of one check.
#[derive(Debug, Default)]
pub struct Report {
    /// A new snapshot to swap in (generation 0: the caller numbers it), when what is in force
    /// changed.
    pub snapshot: Option<Snapshot>,
    /// File versions rejected by this check (each version is reported once).
    pub rejections: Vec<Rejection>,
    /// Files whose new version went in whole.
    pub loaded: Vec<PathBuf>,
}

/// Where the sources stand, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Files whose version on disk was rejected (what is in force for them is their last good
    /// version, or a fail-closed stand-in).
    pub rejected: usize,
    /// Files changed on disk but not loaded yet (not settled, or changing while read).
    pub pending: usize,
}

impl Status {
    /// Whether what is in force differs from what is on disk.
    pub fn stale(&self) -> bool {
        self.rejected + self.pending > 0
    }
}

/// The state of one policy file.
#[derive(Debug, Default)]
struct PolicyFile {
    /// The version seen at the previous check (a version loads once seen twice in a row).
    seen: Option<Version>,
    /// The version last handled (loaded or rejected).
    handled: Option<Version>,
    /// The policies of the last version that validated whole.
    last_good: Option<Vec<Policy>>,
    /// What is in force for this file: policies, and selectors of endpoints denied everything.
    policies: Vec<Policy>,
    fail_closed: Vec<LabelSelector>,
    /// What became of the handled version when it was rejected (in whole or in part).
    rejected: Option<Outcome>,
    /// The text whose verdict is in force: parsed again (by the standalone proxy, from the
    /// agent's snapshot) it gives what is in force here. The last good version's text when
    /// that one stays in force.
    text: Option<Arc<str>>,
    last_good_text: Option<Arc<str>>,
    /// An object of an API source, not a file: each version is whole (never half-written),
    /// so an unusable one fails its scope closed rather than keep the last good version in
    /// force (review finding: an update narrowing a CNP that dnsfence could not read kept
    /// the wider version for as long as it stood).
    atomic: bool,
}

impl PolicyFile {
    /// [`PolicyFile::apply`], recorded in `report` (loaded, or the rejection); whether what
    /// is in force changed.
    fn weigh(
        &mut self,
        path: &Path,
        verdict: FileVerdict,
        text: Arc<str>,
        report: &mut Report,
    ) -> bool {
        let before = self.rejected;
        match self.apply(path, verdict, text) {
            None => {
                report.loaded.push(path.to_path_buf());
                true
            }
            Some(rejection) => {
                report.rejections.push(rejection);
                // A rejected version that leaves the last good one in force, as it already
                // was, changes nothing. (A valid version in force is the last good one.)
                let kept = Some(Outcome::KeptLastGood);
                !(self.rejected == kept && (before.is_none() || before == kept))
            }
        }
    }

    /// Puts `verdict` (of the version just read, `text`) in force; a rejection when it is
    /// not valid.
    fn apply(&mut self, path: &Path, verdict: FileVerdict, text: Arc<str>) -> Option<Rejection> {
        let (errors, outcome) = match verdict {
            FileVerdict::Valid(policies) => {
                self.last_good = Some(policies.clone());
                self.last_good_text = Some(Arc::clone(&text));
                self.text = Some(text);
                self.policies = policies;
                self.fail_closed.clear();
                self.rejected = None;
                return None;
            }
            FileVerdict::Partial {
                policies,
                fail_closed,
                errors,
            } => {
                self.policies = policies;
                self.fail_closed = fail_closed;
                self.text = Some(text);
                (errors, Outcome::PartlyLoaded)
            }
            FileVerdict::Unusable { scope, errors } => match &self.last_good {
                Some(good) if !self.atomic => {
                    self.policies = good.clone();
                    self.fail_closed.clear();
                    self.text = self.last_good_text.clone();
                    (errors, Outcome::KeptLastGood)
                }
                _ => {
                    self.policies.clear();
                    self.fail_closed = scope;
                    self.text = Some(text);
                    (errors, Outcome::FailedClosed)
                }
            },
        };
        self.rejected = Some(outcome);
        Some(Rejection {
            file: path.to_path_buf(),
            errors,
            outcome,
        })
    }
}

/// The endpoints file's state.
#[derive(Debug)]
struct EndpointsFile {
    path: PathBuf,
    seen: Option<Version>,
    handled: Option<Version>,
    /// The registry in force: the last good one, and its text.
    endpoints: Endpoints,
    text: Arc<str>,
    rejected: bool,
    /// Given by an API source ([`Sources::apply_objects`]), not read from a file: checks
    /// leave it alone.
    from_api: bool,
}

/// A policy object of an API source (the Kubernetes source): a text by name, with no file
/// behind it, weighed like a file version each time its text changes.
#[derive(Debug)]
struct ApiObject {
    path: PathBuf,
    /// The text last handled (loaded or rejected).
    handled: Arc<str>,
    file: PolicyFile,
}

/// The texts whose verdicts are in force ([`Sources::in_force`]): what the agent sends the
/// standalone proxy, which compiles the same snapshot from them ([`Sources::from_texts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InForce {
    /// Each policy file, in load order, with the text in force for it.
    pub policies: Vec<(PathBuf, Arc<str>)>,
    /// The endpoints file and the text of the registry in force.
    pub endpoints: Option<(PathBuf, Arc<str>)>,
}

/// The policy and endpoint sources of an agent, with what is in force for each file.
#[derive(Debug)]
pub struct Sources {
    policy_paths: Vec<PathBuf>,
    /// Known policy files, in load order.
    files: Vec<(PathBuf, PolicyFile)>,
    endpoints: Option<EndpointsFile>,
    /// Policy objects of an API source, sorted by name (after the files in load order).
    objects: Vec<ApiObject>,
    /// The registry text an API source gave last (loaded or rejected).
    api_registry: Option<Arc<str>>,
    /// Duplicate-name errors of the snapshot in force (reported when they change).
    duplicates: Vec<LoadError>,
    /// Directories that could not be listed at the last check.
    list_errors: Vec<LoadError>,
    /// What the node knows of itself and its cluster (`toEntities`).
    node: crate::cidr::NodeFacts,
}

/// A registry text parsed and vetted by `accept` (whose refusal is an error of `path`).
fn vetted_registry(
    path: &Path,
    text: &str,
    accept: EndpointsCheck<'_>,
) -> Result<Endpoints, LoadErrors> {
    let endpoints = Endpoints::from_yaml(path, text)?;
    accept(&endpoints).map_err(|reason| {
        LoadErrors(vec![LoadError::new(
            path,
            0,
            LoadErrorKind::Invalid {
                field: "endpoints".to_string(),
                reason,
            },
        )])
    })?;
    Ok(endpoints)
}

/// Checks an endpoint registry before it goes in force (the agent refuses registries it could
/// not enforce); `Err` is the reason.
pub type EndpointsCheck<'a> = &'a dyn Fn(&Endpoints) -> Result<(), String>;

impl Sources {
    /// Loads every file strictly, as at start: any problem is an error, nothing is in force.
    pub fn load(
        policy_paths: &[PathBuf],
        endpoints_path: Option<&Path>,
    ) -> Result<(Sources, Snapshot), LoadErrors> {
        let mut errors = Vec::new();
        let (listed, _) = list(policy_paths, &mut errors, true);
        let mut files = Vec::with_capacity(listed.len());
        for path in listed {
            let mut file = PolicyFile::default();
            match read_now(&path) {
                Ok((stamp, text)) => {
                    file.seen = Some(Some(stamp));
                    file.handled = Some(Some(stamp));
                    match parse_policy_file(&path, &text) {
                        FileVerdict::Valid(policies) => {
                            let text: Arc<str> = text.into();
                            file.last_good = Some(policies.clone());
                            file.last_good_text = Some(Arc::clone(&text));
                            file.text = Some(text);
                            file.policies = policies;
                        }
                        FileVerdict::Partial { errors: e, .. }
                        | FileVerdict::Unusable { errors: e, .. } => errors.extend(e.0),
                    }
                }
                Err(e) => errors.push(e),
            }
            files.push((path, file));
        }
        let endpoints = match endpoints_path {
            None => None,
            Some(path) => match read_now(path) {
                Ok((stamp, text)) => match Endpoints::from_yaml(path, &text) {
                    Ok(endpoints) => Some(EndpointsFile {
                        path: path.to_path_buf(),
                        seen: Some(Some(stamp)),
                        handled: Some(Some(stamp)),
                        endpoints,
                        text: text.into(),
                        rejected: false,
                        from_api: false,
                    }),
                    Err(e) => {
                        errors.extend(e.0);
                        None
                    }
                },
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        let mut sources = Sources {
            policy_paths: policy_paths.to_vec(),
            files,
            endpoints,
            objects: Vec::new(),
            api_registry: None,
            duplicates: Vec::new(),
            list_errors: Vec::new(),
            node: crate::cidr::NodeFacts::default(),
        };
        let snapshot = sources.assemble();
        errors.extend(sources.duplicates.iter().cloned());
        if errors.is_empty() {
            Ok((sources, snapshot))
        } else {
            Err(LoadErrors(errors))
        }
    }

    /// The registry in force.
    pub fn endpoints(&self) -> Option<&Endpoints> {
        self.endpoints.as_ref().map(|e| &e.endpoints)
    }

    /// Where the sources stand.
    pub fn status(&self) -> Status {
        let mut status = Status::default();
        let files = self
            .files
            .iter()
            .map(|(_, f)| (f.seen, f.handled, f.rejected.is_some()))
            .chain(
                self.objects
                    .iter()
                    .map(|o| (None, None, o.file.rejected.is_some())),
            );
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| (e.seen, e.handled, e.rejected));
        for (seen, handled, rejected) in files.chain(endpoints) {
            if seen != handled {
                status.pending += 1;
            } else if rejected {
                status.rejected += 1;
            }
        }
        status
    }

    /// One check of every file (see the module documentation); `accept` vets a new endpoint
    /// registry.
    pub fn check(&mut self, accept: EndpointsCheck<'_>) -> Report {
        let mut report = Report::default();
        let mut changed = false;
        let mut list_errors = Vec::new();
        let (listed, unreadable_dirs) = list(&self.policy_paths, &mut list_errors, false);
        // A directory that cannot be listed keeps its files as they are; reported once.
        for e in &list_errors {
            if !self.list_errors.contains(e) {
                report.rejections.push(Rejection {
                    file: e.file.clone(),
                    errors: LoadErrors(vec![e.clone()]),
                    outcome: Outcome::KeptLastGood,
                });
            }
        }
        self.list_errors = list_errors;

        // Files gone from their directory: removed once they stay gone for a check.
        let mut i = 0;
        while i < self.files.len() {
            let (path, file) = &mut self.files[i];
            let kept = listed.contains(path)
                || unreadable_dirs
                    .iter()
                    .any(|d| path.parent() == Some(d.as_path()));
            if !kept && file.seen == Some(None) {
                self.files.remove(i);
                changed = true;
                continue;
            }
            if !kept {
                file.seen = Some(None);
            }
            i += 1;
        }
        // Files new to a directory or named on the command line.
        for path in &listed {
            if !self.files.iter().any(|(p, _)| p == path) {
                self.files.push((path.clone(), PolicyFile::default()));
            }
        }
        let order = |p: &PathBuf| listed.iter().position(|l| l == p).unwrap_or(usize::MAX);
        self.files.sort_by_key(|(p, _)| order(p));

        for (path, file) in &mut self.files {
            if !listed.contains(path) {
                continue;
            }
            let Some(now) = settled(path, &mut file.seen, file.handled) else {
                continue;
            };
            // (An unreadable file's text is empty: parsed again it fails closed for every
            // endpoint, as here.)
            let (verdict, text) = match now {
                None => (
                    FileVerdict::Unusable {
                        scope: vec![LabelSelector::default()],
                        errors: LoadErrors(vec![read_error(path)]),
                    },
                    String::new(),
                ),
                Some(stamp) => match read_version(path, stamp) {
                    Ok(text) => (parse_policy_file(path, &text), text),
                    Err(ReadError::Unstable) => continue,
                    Err(ReadError::Failed(e)) => (
                        FileVerdict::Unusable {
                            scope: vec![LabelSelector::default()],
                            errors: LoadErrors(vec![e]),
                        },
                        String::new(),
                    ),
                },
            };
            file.handled = Some(now);
            changed |= file.weigh(path, verdict, text.into(), &mut report);
        }

        if let Some(ep) = &mut self.endpoints
            && !ep.from_api
            && let Some(now) = settled(&ep.path, &mut ep.seen, ep.handled)
        {
            let parsed = match now {
                None => Err(LoadErrors(vec![read_error(&ep.path)])),
                Some(stamp) => match read_version(&ep.path, stamp) {
                    Ok(text) => vetted_registry(&ep.path, &text, accept).map(|e| (e, text)),
                    Err(ReadError::Unstable) => Err(LoadErrors::default()),
                    Err(ReadError::Failed(e)) => Err(LoadErrors(vec![e])),
                },
            };
            match parsed {
                Err(errors) if errors.is_empty() => {} // changed while read: next check
                Err(errors) => {
                    ep.handled = Some(now);
                    ep.rejected = true;
                    report.rejections.push(Rejection {
                        file: ep.path.clone(),
                        errors,
                        outcome: Outcome::KeptLastGoodEndpoints,
                    });
                }
                Ok((endpoints, text)) => {
                    ep.handled = Some(now);
                    ep.rejected = false;
                    ep.endpoints = endpoints;
                    ep.text = text.into();
                    report.loaded.push(ep.path.clone());
                    changed = true;
                }
            }
        }

        if changed {
            self.reassemble(&mut report);
        }
        report
    }

    /// Compiles what is in force into `report`'s snapshot, reporting duplicate names new
    /// since the last compilation.
    fn reassemble(&mut self, report: &mut Report) {
        let before = std::mem::take(&mut self.duplicates);
        let snapshot = self.assemble();
        for dup in self.duplicates.iter().filter(|d| !before.contains(d)) {
            report.rejections.push(Rejection {
                file: dup.file.clone(),
                errors: LoadErrors(vec![dup.clone()]),
                outcome: Outcome::PartlyLoaded,
            });
        }
        report.snapshot = Some(snapshot);
    }

    /// Takes what the node knows of itself and its cluster (flags of the agent) and returns
    /// the snapshot of what is in force compiled with it.
    pub fn set_node(&mut self, node: crate::cidr::NodeFacts) -> Snapshot {
        self.node = node;
        self.assemble()
    }

    /// The texts whose verdicts are in force, file by file.
    pub fn in_force(&self) -> InForce {
        InForce {
            policies: self
                .files
                .iter()
                .filter_map(|(path, f)| Some((path.clone(), Arc::clone(f.text.as_ref()?))))
                .chain(
                    self.objects
                        .iter()
                        .filter_map(|o| Some((o.path.clone(), Arc::clone(o.file.text.as_ref()?)))),
                )
                .collect(),
            endpoints: self
                .endpoints
                .as_ref()
                .map(|e| (e.path.clone(), Arc::clone(&e.text))),
        }
    }

    /// What the node knows of itself and its cluster, as last given to [`Sources::set_node`].
    pub fn node(&self) -> &crate::cidr::NodeFacts {
        &self.node
    }

    /// Sources made of texts (the standalone proxy's, from the agent's [`InForce`]), with no
    /// file behind them: each text gets the verdict a file with it would get at a reload (a
    /// valid one loads, a partly invalid one fails closed for what its invalid documents
    /// select, an unusable one for its scope), and an endpoints text that does not load
    /// leaves the registry empty, so every query is from an unknown source (refused unless
    /// `--unknown-source allow`). Returns the snapshot and the rejections. Never call
    /// [`Sources::check`] on them: there are no files to check.
    pub fn from_texts(
        in_force: &InForce,
        node: crate::cidr::NodeFacts,
    ) -> (Sources, Snapshot, Vec<Rejection>) {
        let mut rejections = Vec::new();
        let mut files = Vec::with_capacity(in_force.policies.len());
        for (path, text) in &in_force.policies {
            let mut file = PolicyFile::default();
            let verdict = parse_policy_file(path, text);
            if let Some(r) = file.apply(path, verdict, Arc::clone(text)) {
                rejections.push(r);
            }
            files.push((path.clone(), file));
        }
        let endpoints = in_force.endpoints.as_ref().and_then(|(path, text)| {
            match Endpoints::from_yaml(path, text) {
                Ok(endpoints) => Some(EndpointsFile {
                    path: path.clone(),
                    seen: None,
                    handled: None,
                    endpoints,
                    text: Arc::clone(text),
                    rejected: false,
                    from_api: false,
                }),
                Err(errors) => {
                    rejections.push(Rejection {
                        file: path.clone(),
                        errors,
                        outcome: Outcome::KeptLastGoodEndpoints,
                    });
                    None
                }
            }
        });
        let mut sources = Sources {
            policy_paths: Vec::new(),
            files,
            endpoints,
            objects: Vec::new(),
            api_registry: None,
            duplicates: Vec::new(),
            list_errors: Vec::new(),
            node,
        };
        let snapshot = sources.assemble();
        (sources, snapshot, rejections)
    }

    /// Puts in force the whole state of an API source (the Kubernetes source): each policy
    /// text by name (an object absent from `state` is removed) and, when given, the endpoint
    /// registry's text. An object whose text changed is weighed like a new file version (valid:
    /// it replaces the object's policies; partly invalid: its valid documents apply and what
    /// the invalid ones select is denied everything; unusable: its scope is denied everything,
    /// whatever version was good before, since an object is never half-written); a registry text that does not load, or that
    /// `accept` refuses, leaves the last good registry in force. Unchanged texts cost nothing.
    /// Files named at load keep being checked by [`Sources::check`]; an API registry replaces
    /// an endpoints file (do not give both).
    pub fn apply_objects(&mut self, state: &InForce, accept: EndpointsCheck<'_>) -> Report {
        let mut report = Report::default();
        let mut changed = false;
        let before = self.objects.len();
        self.objects
            .retain(|o| state.policies.iter().any(|(p, _)| *p == o.path));
        changed |= self.objects.len() != before;
        for (path, text) in &state.policies {
            let at = match self.objects.binary_search_by(|o| o.path.cmp(path)) {
                Ok(i) if *self.objects[i].handled == **text => continue,
                Ok(i) => i,
                Err(i) => {
                    self.objects.insert(
                        i,
                        ApiObject {
                            path: path.clone(),
                            handled: Arc::clone(text),
                            file: PolicyFile {
                                atomic: true,
                                ..PolicyFile::default()
                            },
                        },
                    );
                    i
                }
            };
            let object = &mut self.objects[at];
            object.handled = Arc::clone(text);
            let verdict = parse_policy_file(path, text);
            changed |= object
                .file
                .weigh(path, verdict, Arc::clone(text), &mut report);
        }
        if let Some((path, text)) = &state.endpoints
            && self.api_registry.as_deref() != Some(&**text)
        {
            self.api_registry = Some(Arc::clone(text));
            match vetted_registry(path, text, accept) {
                Ok(endpoints) => {
                    self.endpoints = Some(EndpointsFile {
                        path: path.clone(),
                        seen: None,
                        handled: None,
                        endpoints,
                        text: Arc::clone(text),
                        rejected: false,
                        from_api: true,
                    });
                    report.loaded.push(path.clone());
                    changed = true;
                }
                Err(errors) => {
                    if let Some(e) = self.endpoints.as_mut().filter(|e| e.from_api) {
                        e.rejected = true;
                    }
                    report.rejections.push(Rejection {
                        file: path.clone(),
                        errors,
                        outcome: Outcome::KeptLastGoodEndpoints,
                    });
                }
            }
        }
        if changed {
            self.reassemble(&mut report);
        }
        report
    }

    /// What the policies in force hold that dnsfence accepts but does not enforce, as
    /// `FILE:LINE: note: text` lines.
    pub fn notes(&self) -> Vec<String> {
        let set = PolicySet {
            policies: self
                .files
                .iter()
                .flat_map(|(_, f)| f.policies.iter().cloned())
                .chain(
                    self.objects
                        .iter()
                        .flat_map(|o| o.file.policies.iter().cloned()),
                )
                .collect(),
            files: Vec::new(),
        };
        set.notes()
    }

    /// Compiles what is in force. A policy that repeats another's kind, namespace and name is
    /// left out and the endpoints it selects are denied everything.
    fn assemble(&mut self) -> Snapshot {
        let mut set = PolicySet::default();
        let mut fail_closed = Vec::new();
        let objects = self.objects.iter().map(|o| (&o.path, &o.file));
        for (path, file) in self.files.iter().map(|(p, f)| (p, f)).chain(objects) {
            set.files.push(path.clone());
            set.policies.extend(file.policies.iter().cloned());
            fail_closed.extend(file.fail_closed.iter().cloned());
        }
        self.duplicates.clear();
        for (policy, error) in set.remove_duplicates() {
            fail_closed.extend(policy.specs.into_iter().map(|s| s.selector));
            self.duplicates.push(error);
        }
        let empty = Endpoints::default();
        let endpoints = self.endpoints.as_ref().map_or(&empty, |e| &e.endpoints);
        Snapshot::compile_on(&set, endpoints, &fail_closed, &self.node)
    }
}

/// The version of `path` to read now: `Some` when it differs from the one `handled` and was
/// already seen at the previous check (settled). Records what this check saw in `seen`.
fn settled(path: &Path, seen: &mut Option<Version>, handled: Option<Version>) -> Option<Version> {
    let now = version(path);
    let previous = seen.replace(now);
    (handled != Some(now) && previous == Some(now)).then_some(now)
}

/// Why `path` cannot be read (for a file that cannot be stat'ed).
fn read_error(path: &Path) -> LoadError {
    let reason = match open_regular(path) {
        Err(e) => e.to_string(),
        Ok(_) => "cannot stat".to_string(),
    };
    LoadError::new(path, 0, LoadErrorKind::Io(reason))
}

/// The policy files `paths` name: files as they are, directories expanded to their `*.yaml` /
/// `*.yml` files (sorted, not recursive, no dot files). Also returns the directories that could
/// not be listed (reported in `errors`). At start (`strict`) a directory without policy files
/// is an error; at reload it means its files were removed.
fn list(
    paths: &[PathBuf],
    errors: &mut Vec<LoadError>,
    strict: bool,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut dir_errors = Vec::new();
        let found = crate::policy::expand_paths(std::slice::from_ref(path), &mut dir_errors);
        for e in dir_errors {
            match e.kind {
                LoadErrorKind::EmptyDirectory if !strict => {}
                LoadErrorKind::EmptyDirectory => errors.push(e),
                _ => {
                    unreadable.push(path.clone());
                    errors.push(e);
                }
            }
        }
        files.extend(found);
    }
    (files, unreadable)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use dnsfence_matcher::Name;

    use super::*;
    use crate::{DnsVerdict, Proto};

    /// A CNP in namespace `ns` selecting `app: APP` that may resolve `*.NAME.test`.
    fn cnp(name: &str, ns: &str, app: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
             metadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
             endpointSelector: {{matchLabels: {{app: {app}}}}}\n  egress:\n  \
             - toPorts:\n    - ports: [{{port: \"53\"}}]\n      rules:\n        \
             dns: [{{matchPattern: \"*.{name}.test\"}}]\n"
        )
    }

    const ENDPOINTS: &str = "endpoints:\n\
        - {name: a, namespace: team-a, labels: {app: a}, ips: [10.0.0.1]}\n\
        - {name: b, namespace: team-b, labels: {app: b}, ips: [10.0.0.2]}\n";

    /// A fresh directory with a `policies/` subdirectory (those earlier test processes left
    /// are removed first, once).
    fn dir() -> PathBuf {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            let entries = std::fs::read_dir(std::env::temp_dir());
            for entry in entries.into_iter().flatten().filter_map(Result::ok) {
                let name = entry.file_name();
                let pid = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("dnsfence-reload-"))
                    .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok());
                if pid.is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                }) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        });
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "dnsfence-reload-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("policies")).unwrap();
        d
    }

    /// Writes `path` in place (truncate, write), after a pause longer than a clock tick so that
    /// two versions never share a modification time.
    fn put(path: &Path, text: &str) {
        std::thread::sleep(std::time::Duration::from_millis(15));
        std::fs::write(path, text).unwrap();
    }

    fn verdict(s: &Snapshot, ep: &str, name: &str) -> DnsVerdict {
        let id = s.endpoint_by_name(ep).unwrap();
        s.dns_verdict(
            id,
            "10.9.9.9:53".parse().unwrap(),
            Proto::Udp,
            &Name::from_text(name).unwrap(),
        )
    }

    fn accept_all(_: &Endpoints) -> Result<(), String> {
        Ok(())
    }

    /// Two checks: a changed file loads at the second (it must be seen unchanged twice).
    fn settle(sources: &mut Sources) -> Report {
        let first = sources.check(&accept_all);
        assert!(
            first.snapshot.is_none() && first.rejections.is_empty(),
            "{first:?}"
        );
        sources.check(&accept_all)
    }

    fn start(d: &Path) -> (Sources, Snapshot) {
        let e = d.join("endpoints.yaml");
        if !e.exists() {
            std::fs::write(&e, ENDPOINTS).unwrap();
        }
        Sources::load(&[d.join("policies")], Some(&e)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn file_verdicts() {
        let f = Path::new("p.yaml");
        for empty in ["", "  \n\n"] {
            let FileVerdict::Unusable { scope, errors } = parse_policy_file(f, empty) else {
                panic!("{empty:?} accepted");
            };
            assert_eq!(scope, [LabelSelector::default()]);
            assert_eq!(errors.errors()[0].kind, LoadErrorKind::Empty);
        }
        assert!(matches!(
            parse_policy_file(f, "# no policy here\n---\n"),
            FileVerdict::Valid(p) if p.is_empty()
        ));
        // Cut mid-flow: a syntax error, nothing of it used.
        let text = cnp("a", "team-a", "a");
        let cut = &text[..text.find("namespace").unwrap()];
        assert!(matches!(
            parse_policy_file(f, cut),
            FileVerdict::Unusable { scope, .. } if scope == [LabelSelector::default()]
        ));
        // Cut after `metadata:`: YAML, but no spec and no namespace to go by.
        let cut = &text[..text.find("metadata:").unwrap() + 9];
        assert!(matches!(
            parse_policy_file(f, cut),
            FileVerdict::Unusable { scope, .. } if scope == [LabelSelector::default()]
        ));
        // An unsupported field: the selector still reads, so only its endpoints fail closed.
        let bad = cnp("a", "team-a", "a").replace(
            "  - toPorts:",
            "  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n  - toPorts:",
        );
        let two = format!("{}---\n{bad}", cnp("b", "team-b", "b"));
        let FileVerdict::Partial {
            policies,
            fail_closed,
            errors,
        } = parse_policy_file(f, &two)
        else {
            panic!("not partial");
        };
        assert_eq!(policies.len(), 1);
        assert_eq!(fail_closed.len(), 1);
        assert!(errors.to_string().starts_with("p.yaml:18: "), "{errors}");
        // A selector that does not read: the document's namespace fails closed.
        let unreadable = cnp("a", "team-a", "a").replace("{matchLabels: {app: a}}", "[a]");
        let FileVerdict::Unusable { scope, .. } = parse_policy_file(f, &unreadable) else {
            panic!("accepted");
        };
        let mut team_a = LabelSelector::default();
        team_a.require(crate::NAMESPACE_LABEL, "team-a");
        assert_eq!(scope, [team_a]);
        // Not a policy kind: every endpoint.
        let other = cnp("a", "team-a", "a").replace("CiliumNetworkPolicy", "NetworkPolicy");
        assert!(matches!(
            parse_policy_file(f, &other),
            FileVerdict::Unusable { scope, .. } if scope == [LabelSelector::default()]
        ));
    }

    /// The standalone proxy compiles the agent's texts in force and gets the agent's verdicts:
    /// a valid file, a file whose broken edit keeps its last good version, a partly invalid
    /// file that fails closed for one endpoint, and the endpoints in force.
    #[test]
    fn texts_in_force_compile_to_the_same_verdicts() {
        let d = dir();
        let (a, b, c) = (
            d.join("policies/a.yaml"),
            d.join("policies/b.yaml"),
            d.join("policies/c.yaml"),
        );
        std::fs::write(&a, cnp("a", "team-a", "a")).unwrap();
        std::fs::write(&b, cnp("b", "team-b", "b")).unwrap();
        std::fs::write(&c, cnp("c", "team-a", "a")).unwrap();
        let (mut sources, _) = start(&d);
        // b: broken (its last good version stays); c: an unsupported field (a fails closed).
        put(&b, "spec: [unterminated");
        put(
            &c,
            &cnp("c", "team-a", "a").replace(
                "  - toPorts:",
                "  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n  - toPorts:",
            ),
        );
        let report = settle(&mut sources);
        assert_eq!(report.rejections.len(), 2, "{report:?}");
        let here = report.snapshot.expect("reloaded");
        let in_force = sources.in_force();
        assert_eq!(in_force.policies.len(), 3);
        assert!(
            in_force.policies[1].1.contains("*.b.test"),
            "b's last good text"
        );
        let (_, there, rejections) = Sources::from_texts(&in_force, sources.node().clone());
        assert_eq!(rejections.len(), 1, "c again: {rejections:?}");
        for (ep, name, want) in [
            ("a", "x.a.test", DnsVerdict::Deny),
            ("a", "x.c.test", DnsVerdict::Deny),
            ("b", "x.b.test", DnsVerdict::Allow),
            ("b", "x.a.test", DnsVerdict::Deny),
        ] {
            assert_eq!(verdict(&here, ep, name), want, "{ep} {name} here");
            assert_eq!(verdict(&there, ep, name), want, "{ep} {name} there");
        }
        assert_eq!(here.stats(), there.stats());
        // A registry text that does not load leaves none: every query is unknown.
        let broken = InForce {
            endpoints: Some((d.join("endpoints.yaml"), "endpoints: [".into())),
            ..in_force
        };
        let (_, none, rejections) = Sources::from_texts(&broken, sources.node().clone());
        assert_eq!(none.stats().endpoints, 0);
        assert_eq!(rejections.len(), 2);
    }

    #[test]
    fn an_empty_file_keeps_the_last_good_version_and_comments_remove_it() {
        let d = dir();
        let p = d.join("policies/a.yaml");
        std::fs::write(&p, cnp("a", "team-a", "a")).unwrap();
        let (mut sources, s) = start(&d);
        assert_eq!(verdict(&s, "team-a/a", "x.b.test"), DnsVerdict::Deny);

        put(&p, "");
        let report = settle(&mut sources);
        assert!(report.snapshot.is_none(), "nothing changes");
        assert_eq!(report.rejections.len(), 1);
        assert_eq!(report.rejections[0].outcome, Outcome::KeptLastGood);
        assert!(
            report.rejections[0]
                .errors
                .to_string()
                .contains("a.yaml:0: empty file")
        );
        assert_eq!(
            sources.status(),
            Status {
                rejected: 1,
                pending: 0
            }
        );
        // Reported once per version.
        assert!(sources.check(&accept_all).rejections.is_empty());

        put(&p, "# team-a: no egress policy for now\n");
        let s = settle(&mut sources)
            .snapshot
            .expect("explicit removal loads");
        assert_eq!(
            verdict(&s, "team-a/a", "x.b.test"),
            DnsVerdict::Unrestricted
        );
        assert!(!sources.status().stale());
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A FIFO at a policy path is refused with a reason (the last good version stays); it
    /// blocked the reload's `open` for ever, and with it the agent's control loop.
    #[test]
    fn a_fifo_is_refused_not_waited_on() {
        let d = dir();
        // Named as a file (in a directory, only regular files are policy files).
        let p = d.join("a.yaml");
        let e = d.join("endpoints.yaml");
        std::fs::write(&p, cnp("a", "team-a", "a")).unwrap();
        std::fs::write(&e, ENDPOINTS).unwrap();
        let (mut sources, _) =
            Sources::load(std::slice::from_ref(&p), Some(&e)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::remove_file(&p).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(settle(&mut sources));
        });
        let Ok(report) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
            // Let the blocked reader go before failing.
            let _ = std::fs::OpenOptions::new().write(true).open(&p);
            panic!("the check blocked on the FIFO");
        };
        assert!(report.snapshot.is_none(), "{report:?}");
        assert_eq!(report.rejections.len(), 1, "{report:?}");
        assert_eq!(report.rejections[0].outcome, Outcome::KeptLastGood);
        let errors = report.rejections[0].errors.to_string();
        assert!(errors.contains("not a regular file"), "{errors}");
        std::fs::remove_dir_all(d).unwrap();
    }

    /// A file over the size bound is refused with its size (the last good version stays);
    /// a sparse file of a terabyte aborted the process allocating its size.
    #[test]
    fn a_huge_file_is_refused_not_read() {
        let d = dir();
        let p = d.join("a.yaml");
        let e = d.join("endpoints.yaml");
        std::fs::write(&p, cnp("a", "team-a", "a")).unwrap();
        std::fs::write(&e, ENDPOINTS).unwrap();
        let (mut sources, _) =
            Sources::load(std::slice::from_ref(&p), Some(&e)).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(std::time::Duration::from_millis(15));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1 << 40).unwrap();
        drop(f);
        let report = settle(&mut sources);
        assert!(report.snapshot.is_none(), "{report:?}");
        assert_eq!(report.rejections.len(), 1, "{report:?}");
        assert_eq!(report.rejections[0].outcome, Outcome::KeptLastGood);
        let errors = report.rejections[0].errors.to_string();
        assert!(
            errors.contains("1099511627776 bytes, over the 64 MiB"),
            "{errors}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_file_that_keeps_changing_never_loads() {
        let d = dir();
        let p = d.join("policies/a.yaml");
        std::fs::write(&p, cnp("a", "team-a", "a")).unwrap();
        let (mut sources, _) = start(&d);
        for i in 0..10 {
            // A different version at every check, some of them empty.
            put(&p, if i % 2 == 0 { "" } else { "# none\n" });
            let report = sources.check(&accept_all);
            assert!(
                report.snapshot.is_none() && report.rejections.is_empty(),
                "{report:?}"
            );
            assert_eq!(sources.status().pending, 1);
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_broken_file_fails_closed_for_what_it_selects_and_holds_nothing_back() {
        let d = dir();
        let (a, b) = (d.join("policies/a.yaml"), d.join("policies/b.yaml"));
        std::fs::write(&a, cnp("a", "team-a", "a")).unwrap();
        std::fs::write(&b, cnp("b", "team-b", "b")).unwrap();
        let (mut sources, s) = start(&d);
        assert_eq!(verdict(&s, "team-b/b", "x.b.test"), DnsVerdict::Allow);

        // b gets an unsupported field: its endpoint is denied everything.
        let bad = cnp("b", "team-b", "b").replace(
            "  - toPorts:",
            "  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n  - toPorts:",
        );
        put(&b, &bad);
        let report = settle(&mut sources);
        assert_eq!(report.rejections[0].outcome, Outcome::PartlyLoaded);
        assert!(
            report.rejections[0]
                .errors
                .to_string()
                .contains("b.yaml:7: "),
            "{:?}",
            report.rejections
        );
        let s = report.snapshot.expect("b's endpoints fail closed");
        assert_eq!(verdict(&s, "team-b/b", "x.b.test"), DnsVerdict::Deny);
        assert_eq!(verdict(&s, "team-a/a", "x.a.test"), DnsVerdict::Allow);
        assert_eq!(s.stats().fail_closed, 1);

        // An edit of a and a new endpoint still go in while b is broken.
        put(
            &a,
            &cnp("a", "team-a", "a").replace("*.a.test", "*.later.test"),
        );
        let mut endpoints = ENDPOINTS.to_string();
        endpoints.push_str("- {name: c, namespace: team-a, labels: {app: a}, ips: [10.0.0.3]}\n");
        put(&d.join("endpoints.yaml"), &endpoints);
        let s = settle(&mut sources).snapshot.expect("the edit loads");
        assert_eq!(verdict(&s, "team-a/a", "x.later.test"), DnsVerdict::Allow);
        assert_eq!(verdict(&s, "team-a/c", "x.later.test"), DnsVerdict::Allow);
        assert_eq!(verdict(&s, "team-b/b", "x.b.test"), DnsVerdict::Deny);
        assert_eq!(
            sources.status(),
            Status {
                rejected: 1,
                pending: 0
            }
        );

        // A new file that never loaded and cannot be read fails closed for its namespace.
        let c = d.join("policies/c.yaml");
        put(
            &c,
            &cnp("c", "team-a", "a").replace("{matchLabels: {app: a}}", "[a]"),
        );
        let report = settle(&mut sources);
        assert_eq!(report.rejections[0].outcome, Outcome::FailedClosed);
        let s = report.snapshot.unwrap();
        assert_eq!(verdict(&s, "team-a/a", "x.later.test"), DnsVerdict::Deny);
        assert_eq!(verdict(&s, "team-b/b", "x.b.test"), DnsVerdict::Deny);
        // Removing it (and fixing b) restores everything; removal is explicit.
        std::fs::remove_file(&c).unwrap();
        put(&b, &cnp("b", "team-b", "b"));
        let s = settle(&mut sources).snapshot.unwrap();
        assert_eq!(verdict(&s, "team-a/a", "x.later.test"), DnsVerdict::Allow);
        assert_eq!(verdict(&s, "team-b/b", "x.b.test"), DnsVerdict::Allow);
        assert_eq!(s.stats().fail_closed, 0);
        assert!(!sources.status().stale());

        // A broken endpoints file keeps the last good registry; policies still reload.
        put(
            &d.join("endpoints.yaml"),
            "endpoints:\n- {name: x, ips: [not-an-ip]}\n",
        );
        put(&a, &cnp("a", "team-a", "a"));
        let report = settle(&mut sources);
        assert!(
            report
                .rejections
                .iter()
                .any(|r| r.outcome == Outcome::KeptLastGoodEndpoints)
        );
        let s = report.snapshot.unwrap();
        assert_eq!(verdict(&s, "team-a/c", "x.a.test"), DnsVerdict::Allow);

        // Every file gone from the directory: explicitly no policy.
        for f in [&a, &b] {
            std::fs::remove_file(f).unwrap();
        }
        let s = settle(&mut sources).snapshot.unwrap();
        assert_eq!(
            verdict(&s, "team-b/b", "x.b.test"),
            DnsVerdict::Unrestricted
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    /// An API source's objects: added, edited, broken (its namespace fails closed), removed; the
    /// registry replaced and a broken registry keeping the last good one; unchanged texts
    /// give no snapshot; files keep loading beside them; the proxy gets the same verdicts.
    #[test]
    fn api_objects_load_like_files_and_never_fail_open() {
        let d = dir();
        std::fs::write(d.join("policies/file.yaml"), cnp("f", "team-b", "b")).unwrap();
        let (mut sources, _) =
            Sources::load(&[d.join("policies")], None).unwrap_or_else(|e| panic!("{e}"));
        let obj = |ns: &str, name: &str| PathBuf::from(format!("k8s/cnp/{ns}/{name}"));
        let reg = |text: &str| Some((PathBuf::from("k8s/endpoints"), Arc::<str>::from(text)));
        let mut state = InForce {
            policies: vec![(obj("team-a", "a"), cnp("a", "team-a", "a").into())],
            endpoints: reg(ENDPOINTS),
        };
        let report = sources.apply_objects(&state, &accept_all);
        assert_eq!(report.loaded.len(), 2, "{report:?}");
        let s = report.snapshot.expect("first state");
        assert_eq!(verdict(&s, "team-a/a", "x.a.test"), DnsVerdict::Allow);
        assert_eq!(
            verdict(&s, "team-b/b", "x.f.test"),
            DnsVerdict::Allow,
            "file"
        );
        // The same state again: nothing to do.
        let again = sources.apply_objects(&state, &accept_all);
        assert!(
            again.snapshot.is_none() && again.loaded.is_empty(),
            "{again:?}"
        );
        // Edited: the new text replaces the old.
        state.policies[0].1 = cnp("a", "team-a", "a")
            .replace("*.a.test", "*.a2.test")
            .into();
        let s = sources.apply_objects(&state, &accept_all).snapshot.unwrap();
        assert_eq!(verdict(&s, "team-a/a", "x.a2.test"), DnsVerdict::Allow);
        assert_eq!(verdict(&s, "team-a/a", "x.a.test"), DnsVerdict::Deny);
        // Broken (review finding: the last good version stayed, wider than the update): an
        // object is never half-written, so what it may concern, its namespace, is denied
        // everything, reported once; the rest stays.
        let good = state.policies[0].1.clone();
        state.policies[0].1 = good.replace("endpointSelector", "endpointSelektor").into();
        let report = sources.apply_objects(&state, &accept_all);
        assert_eq!(report.rejections.len(), 1);
        assert_eq!(report.rejections[0].outcome, Outcome::FailedClosed);
        assert_eq!(sources.status().rejected, 1);
        let s = report.snapshot.expect("a new state");
        assert_eq!(verdict(&s, "team-a/a", "x.a2.test"), DnsVerdict::Deny);
        assert_eq!(verdict(&s, "team-b/b", "x.f.test"), DnsVerdict::Allow);
        // The proxy gets the broken text, and fails the same scope closed.
        let (_, there, _) = Sources::from_texts(&sources.in_force(), sources.node().clone());
        assert_eq!(verdict(&there, "team-a/a", "x.a2.test"), DnsVerdict::Deny);
        assert_eq!(verdict(&there, "team-b/b", "x.f.test"), DnsVerdict::Allow);
        assert!(
            sources
                .apply_objects(&state, &accept_all)
                .rejections
                .is_empty()
        );
        // (A file's broken version may be half-written: there the last good one stays, see
        // the tests of files above.) Fixed again:
        state.policies[0].1 = good;
        let s = sources.apply_objects(&state, &accept_all).snapshot.unwrap();
        assert_eq!(verdict(&s, "team-a/a", "x.a2.test"), DnsVerdict::Allow);
        // A new object that never loaded: what it selects is denied everything.
        state.policies.push((
            obj("team-b", "bad"),
            cnp("bad", "team-b", "b")
                .replace("  - toPorts:", "  - toGroups: [{aws: {}}]\n  - toPorts:")
                .into(),
        ));
        let s = sources.apply_objects(&state, &accept_all).snapshot.unwrap();
        assert_eq!(verdict(&s, "team-b/b", "x.f.test"), DnsVerdict::Deny);
        // Removed: the file's policy applies again.
        state.policies.pop();
        let s = sources.apply_objects(&state, &accept_all).snapshot.unwrap();
        assert_eq!(verdict(&s, "team-b/b", "x.f.test"), DnsVerdict::Allow);
        // A broken registry keeps the last good one; a refused one too.
        state.endpoints = reg("endpoints: [");
        let report = sources.apply_objects(&state, &accept_all);
        assert!(report.snapshot.is_none());
        assert_eq!(report.rejections[0].outcome, Outcome::KeptLastGoodEndpoints);
        assert_eq!(sources.endpoints().unwrap().endpoints.len(), 2);
        let relabelled = ENDPOINTS.replace("labels: {app: a}", "labels: {app: z}");
        state.endpoints = reg(&relabelled);
        let refuse = |_: &Endpoints| Err("no".to_string());
        let report = sources.apply_objects(&state, &refuse);
        assert!(report.snapshot.is_none() && report.rejections.len() == 1);
        // A registry accepted: the relabelled endpoint is no longer selected.
        state.endpoints = reg(&format!("{relabelled}# v2\n"));
        let s = sources.apply_objects(&state, &accept_all).snapshot.unwrap();
        assert_eq!(
            verdict(&s, "team-a/a", "x.a2.test"),
            DnsVerdict::Unrestricted
        );
        // Checks of the files leave the API registry alone.
        let report = settle(&mut sources);
        assert!(
            report.snapshot.is_none() && report.rejections.is_empty(),
            "{report:?}"
        );
        // (Nothing stays rejected.)
        let status = Status {
            rejected: 0,
            pending: 0,
        };
        assert_eq!(sources.status(), status);
        assert_eq!(sources.endpoints().unwrap().endpoints[0].labels["app"], "z");
        // The proxy compiles the same verdicts from the texts in force.
        let (_, there, _) = Sources::from_texts(&sources.in_force(), sources.node().clone());
        assert_eq!(
            verdict(&there, "team-a/a", "x.a2.test"),
            DnsVerdict::Unrestricted
        );
        assert_eq!(verdict(&there, "team-b/b", "x.f.test"), DnsVerdict::Allow);
    }

    #[test]
    fn start_is_strict() {
        let d = dir();
        std::fs::write(d.join("policies/a.yaml"), "").unwrap();
        let e = d.join("endpoints.yaml");
        std::fs::write(&e, ENDPOINTS).unwrap();
        let errors = Sources::load(&[d.join("policies")], Some(&e)).unwrap_err();
        assert!(
            errors.to_string().contains("a.yaml:0: empty file"),
            "{errors}"
        );
        std::fs::remove_file(d.join("policies/a.yaml")).unwrap();
        let errors = Sources::load(&[d.join("policies")], Some(&e)).unwrap_err();
        assert!(errors.to_string().contains("no *.yaml"), "{errors}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
