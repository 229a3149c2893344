//! `keel server` and `keel restore` on a data directory, as an operator
//! sees them: one server at a time per directory, only the node and cluster
//! the directory belongs to, OS errors printed once, and a bad backup
//! called a bad backup.

mod common;

use common::{free_port, keel, keel_exe};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `keel server` flags for a one-node cluster: node `id` of `cluster` on
/// `dir`, serving clients on `client`.
fn server_args(dir: &Path, id: u64, cluster: u64, client: &str) -> Vec<String> {
    vec![
        "server".into(),
        "--id".into(),
        id.to_string(),
        "--cluster-id".into(),
        cluster.to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--peer-addr".into(),
        format!("127.0.0.1:{}", free_port()),
        "--client-addr".into(),
        client.into(),
    ]
}

/// A server that is killed when this is dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_data_directory_takes_one_server_of_its_own_node_and_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    let client = || format!("127.0.0.1:{}", free_port());
    let mut first = Running(
        Command::new(keel_exe())
            .args(server_args(&dir, 1, 99, &client()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel server"),
    );
    // Up once it has written its pid into the lock file.
    let pid = first.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let locked = || std::fs::read_to_string(dir.join("LOCK")).is_ok_and(|s| s.trim() == pid);
    while !locked() {
        assert!(Instant::now() < deadline, "the first server never locked");
        assert!(first.0.try_wait().expect("try_wait").is_none(), "it exited");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A second server on the same directory (a `keel dev` run again, a
    // mistake): refused, naming the directory and the holder.
    let (code, text) = keel(server_args(&dir, 1, 99, &client()));
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("in use by another process"), "{text}");
    assert!(text.contains(&format!("(pid {pid})")), "{text}");
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(first.0.try_wait().expect("try_wait").is_none());

    // Gone (however it died), the directory is free, but only for node 1
    // of cluster 0x63.
    first.0.kill().expect("kill");
    first.0.wait().expect("wait");
    let (code, text) = keel(server_args(&dir, 5, 99, &client()));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("holds the data of node 1 of cluster 0x63"),
        "{text}"
    );
    assert!(
        text.contains("configured as node 5 of cluster 0x63"),
        "{text}"
    );
    let (code, text) = keel(server_args(&dir, 1, 7, &client()));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("configured as node 1 of cluster 0x7"),
        "{text}"
    );

    // The right node, on a taken address: the OS error once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, text) = keel(server_args(&dir, 1, 99, &addr));
    assert_ne!(code, 0, "{text}");
    let os = std::io::Error::from_raw_os_error(libc::EADDRINUSE).to_string();
    assert_eq!(text.matches(&os).count(), 1, "{text}");
    assert!(text.contains(&format!("cannot listen on {addr}")), "{text}");
}

#[test]
fn a_restore_from_a_bad_backup_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let junk = tmp.path().join("junk.keel");
    std::fs::write(&junk, b"not a backup\n").expect("write");
    let dir = tmp.path().join("data");
    let client = format!("127.0.0.1:{}", free_port());
    let mut args = server_args(&dir, 1, 99, &client);
    args[0] = "restore".into();
    args.insert(1, junk.display().to_string());
    let (code, text) = keel(&args);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("not a Keel backup"), "{text}");
    assert!(text.contains(&junk.display().to_string()), "{text}");
    assert!(!text.contains("Refusing to start"), "{text}");
    assert!(!text.contains("data directory aside"), "{text}");
    assert!(!dir.exists(), "a refused restore wrote files");
    // A missing one: the OS error once.
    args[1] = tmp.path().join("missing.keel").display().to_string();
    let (code, text) = keel(&args);
    assert_ne!(code, 0, "{text}");
    let os = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    assert_eq!(text.matches(&os).count(), 1, "{text}");
}
