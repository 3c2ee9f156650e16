//! The peer check of the agent socket against a real peer of another user. In a test binary
//! of its own: spawning a process forks this one, and a forked child holds every descriptor
//! of the parent until it execs, which would keep other tests' closed listeners alive.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use dnsfence_sync::conn::{AgentListener, try_connect};

/// A peer of another user is closed and counted; the accept goes on to the next peer. Needs
/// root (to run the other peer as `nobody`); skipped otherwise.
#[test]
fn a_peer_of_another_user_is_closed_and_counted() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("agent.sock");
    let listener = AgentListener::bind(&path).unwrap();
    // Let the kernel admit `nobody` so that our check is what refuses it.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        print('connected',flush=True)\n\
        print('eof' if s.recv(1)==b'' else 'data',flush=True)\n";
    let mut child = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    // Now an admitted peer, queued behind it.
    let _me = try_connect(&path).unwrap();
    let (_stream, peer) = listener.accept().unwrap();
    assert_eq!(peer.uid, 0);
    assert_eq!(listener.rejected(), 1);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "eof\n", "the rejected peer must be closed");
    assert!(child.wait().unwrap().success());
}
