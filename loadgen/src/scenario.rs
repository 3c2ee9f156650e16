//! Timed actions during a run (`--at 'SECS:COMMAND'`, `--scenario FILE`): at second N of the
//! run, `sh -c COMMAND` is started on a separate thread (never on the sending thread) and the
//! event, with the command's exit status, is reported in the timeline.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why an action could not be parsed.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// An `--at` value is not `SECS:COMMAND`.
    #[error("--at {0:?}: expected SECS:COMMAND (e.g. '5:kill -TERM 1234')")]
    At(String),
    /// The scenario file could not be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A scenario line is not `SECS COMMAND...`.
    #[error("scenario line {line}: expected 'SECS COMMAND...'")]
    Line {
        /// 1-based line number.
        line: usize,
    },
}

/// One timed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// When, from the start of the run.
    pub at: Duration,
    /// The shell command.
    pub command: String,
}

fn parse_secs(text: &str) -> Option<Duration> {
    let v: f64 = text.trim().parse().ok()?;
    (0.0..1e9).contains(&v).then(|| Duration::from_secs_f64(v))
}

impl std::str::FromStr for Action {
    type Err = ScenarioError;
    /// `SECS:COMMAND`.
    fn from_str(s: &str) -> Result<Self, ScenarioError> {
        let (secs, command) = s
            .split_once(':')
            .ok_or_else(|| ScenarioError::At(s.into()))?;
        let at = parse_secs(secs).ok_or_else(|| ScenarioError::At(s.into()))?;
        if command.trim().is_empty() {
            return Err(ScenarioError::At(s.into()));
        }
        Ok(Action {
            at,
            command: command.trim().to_string(),
        })
    }
}

/// Reads a scenario file: `SECS COMMAND...` a line; blank lines and `#` comments skipped.
pub fn load_file(path: &Path) -> Result<Vec<Action>, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_file(&text)
}

/// Parses the text of a scenario file.
pub fn parse_file(text: &str) -> Result<Vec<Action>, ScenarioError> {
    let mut actions = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (secs, command) = line
            .split_once(char::is_whitespace)
            .ok_or(ScenarioError::Line { line: i + 1 })?;
        let at = parse_secs(secs).ok_or(ScenarioError::Line { line: i + 1 })?;
        actions.push(Action {
            at,
            command: command.trim().to_string(),
        });
    }
    Ok(actions)
}

/// A command that was started during the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// When it was started, in seconds from the start of the run.
    pub t_s: f64,
    /// The shell command.
    pub command: String,
    /// Its exit status (128 + N when killed by signal N); `None` if still running at the end.
    pub exit: Option<i32>,
}

/// The thread that starts the actions at their time.
pub struct Scenario {
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Scenario {
    /// Starts the actions relative to `start`.
    pub fn start(mut actions: Vec<Action>, start: Instant) -> Self {
        actions.sort_by_key(|a| a.at);
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!actions.is_empty()).then(|| {
            let (events, stop) = (events.clone(), stop.clone());
            thread::spawn(move || run_actions(actions, start, &events, &stop))
        });
        Self {
            events,
            stop,
            thread,
        }
    }

    /// Stops starting actions, waits up to `grace` for the started ones, and returns the
    /// events in start order.
    pub fn finish(mut self, grace: Duration) -> Vec<Event> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let waiters = thread.join().unwrap_or_default();
            let deadline = Instant::now() + grace;
            for w in waiters {
                while !w.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

fn run_actions(
    actions: Vec<Action>,
    start: Instant,
    events: &Arc<Mutex<Vec<Event>>>,
    stop: &AtomicBool,
) -> Vec<JoinHandle<()>> {
    let mut waiters = Vec::new();
    for action in actions {
        let due = start + action.at;
        loop {
            if stop.load(Ordering::Relaxed) {
                return waiters;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            thread::sleep((due - now).min(Duration::from_millis(20)));
        }
        let t_s = start.elapsed().as_secs_f64();
        // The command's stdout goes to our stderr, so that `--json` output stays clean.
        let stdout = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_or_else(|_| Stdio::null(), Stdio::from);
        let child = Command::new("sh")
            .arg("-c")
            .arg(&action.command)
            .stdin(Stdio::null())
            .stdout(stdout)
            .spawn();
        let index = {
            let Ok(mut e) = events.lock() else {
                return waiters;
            };
            e.push(Event {
                t_s,
                command: action.command.clone(),
                exit: None,
            });
            e.len() - 1
        };
        match child {
            Ok(mut child) => {
                let events = events.clone();
                waiters.push(thread::spawn(move || {
                    let code = child.wait().ok().and_then(|status| {
                        use std::os::unix::process::ExitStatusExt;
                        status.code().or_else(|| status.signal().map(|s| 128 + s))
                    });
                    if let Ok(mut e) = events.lock() {
                        e[index].exit = code;
                    }
                }));
            }
            Err(err) => {
                eprintln!("scenario: cannot run {:?}: {err}", action.command);
                if let Ok(mut e) = events.lock() {
                    e[index].exit = Some(127);
                }
            }
        }
    }
    waiters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions() {
        let a: Action = "2.5:kill -TERM 1 2>/dev/null; echo a:b".parse().unwrap();
        assert_eq!(a.at, Duration::from_millis(2500));
        assert_eq!(a.command, "kill -TERM 1 2>/dev/null; echo a:b");
        assert!("x:echo".parse::<Action>().is_err());
        assert!("3:".parse::<Action>().is_err());
        assert!("-1:echo".parse::<Action>().is_err());
        let file = parse_file("# failover\n\n1 echo one\n 4.5\ttouch /tmp/x y\n").unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(file[1].at, Duration::from_millis(4500));
        assert_eq!(file[1].command, "touch /tmp/x y");
        assert!(matches!(
            parse_file("1 ok\nbad"),
            Err(ScenarioError::Line { line: 2 })
        ));
    }

    #[test]
    fn runs_actions_on_time() {
        let start = Instant::now();
        let actions = vec![
            "0.2:exit 3".parse().unwrap(),
            "0.1:true".parse().unwrap(),
            "60:true".parse().unwrap(),
        ];
        let scenario = Scenario::start(actions, start);
        thread::sleep(Duration::from_millis(400));
        let events = scenario.finish(Duration::from_secs(2));
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].command, "true");
        assert_eq!(events[0].exit, Some(0));
        assert!((0.1..0.3).contains(&events[0].t_s), "{events:?}");
        assert_eq!(events[1].exit, Some(3));
    }
}
