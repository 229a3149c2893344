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
    // Locked, and the membership recorded (the hard state is written
    // whole, by a rename): killed before that, the restart would be a first
    // start again.
    let locked = || {
        std::fs::read_to_string(dir.join("LOCK")).is_ok_and(|s| s.trim() == pid)
            && dir.join("hardstate").exists()
    };
    while !locked() {
        assert!(
            Instant::now() < deadline,
            "the first server never recorded its membership"
        );
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

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A first start that fails (a taken port, a bad `http_addr`, bad TLS
/// files) writes nothing: before, it had already recorded the node's
/// identity and, from its `--peer`s, the initial membership, which every
/// later start kept whatever its peers (a pre-candidate for good with
/// `voters: [1, 2, 3]`). A later start whose peers leave out recorded
/// members names both.
#[test]
fn a_failed_first_start_writes_nothing_and_a_later_one_names_missing_members() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("d");
    let addr = || format!("127.0.0.1:{}", free_port());
    let peers = [
        "--peer".to_string(),
        format!("2={},{}", addr(), addr()),
        "--peer".to_string(),
        format!("3={},{}", addr(), addr()),
    ];
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let fails = |args: Vec<String>, says: &str| {
        let (code, text) = keel(&args);
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: expected {says:?} in {text}");
    };

    // The client port taken.
    let mut args = server_args(&dir, 1, 99, &taken);
    args.extend(peers.iter().cloned());
    fails(args, &format!("cannot listen on {taken}"));
    assert!(!dir.exists(), "the failed start wrote {:?}", entries(&dir));
    // The HTTP port taken, and an http_addr that is no address.
    for (http, says) in [
        (taken.clone(), format!("cannot listen on {taken}")),
        (
            "127.0.0.1:99999".to_string(),
            "http_addr \"127.0.0.1:99999\" is not host:port".to_string(),
        ),
    ] {
        let mut args = server_args(&dir, 1, 99, &addr());
        args.extend(peers.iter().cloned());
        args.extend(["--http-addr".to_string(), http]);
        fails(args, &says);
        assert!(!dir.exists(), "the failed start wrote {:?}", entries(&dir));
    }
    // TLS files that are not PEM.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let mut args = server_args(&dir, 1, 99, &addr());
    args.extend(peers.iter().cloned());
    for flag in [
        "--etcd-cert-file",
        "--etcd-key-file",
        "--etcd-trusted-ca-file",
    ] {
        args.extend([flag.to_string(), junk.display().to_string()]);
    }
    args.extend(["--etcd-addr".to_string(), addr()]);
    fails(
        args,
        &format!(
            "etcd_cert_file {}: no PEM certificate in it",
            junk.display()
        ),
    );
    assert!(!dir.exists(), "the failed start wrote {:?}", entries(&dir));
    // A directory that exists keeps what it had, and only that.
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("README"), "node 1's data").expect("write");
    let mut args = server_args(&dir, 1, 99, &taken);
    args.extend(peers.iter().cloned());
    fails(args, &format!("cannot listen on {taken}"));
    assert_eq!(entries(&dir), ["README"]);

    // A first start with peers 2 and 3 records them as voters; a restart
    // without them says so, naming the recorded members and its own.
    let mut args = server_args(&dir, 1, 99, &addr());
    args.extend(peers.iter().cloned());
    let mut first = Running(
        Command::new(keel_exe())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keel server"),
    );
    let pid = first.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Locked, and the membership recorded (as in the test above: killed
    // before the hard state is written, the restart is a first start).
    let locked = || {
        std::fs::read_to_string(dir.join("LOCK")).is_ok_and(|s| s.trim() == pid)
            && dir.join("hardstate").exists()
    };
    while !locked() {
        assert!(
            Instant::now() < deadline,
            "the first server never recorded its membership"
        );
        assert!(first.0.try_wait().expect("try_wait").is_none(), "it exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.0.kill().expect("kill");
    first.0.wait().expect("wait");
    let mut again = Running(
        Command::new(keel_exe())
            .args(server_args(&dir, 1, 99, &addr()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel server"),
    );
    let stderr = again.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            if line.map(|l| tx.send(l)).is_err() {
                return;
            }
        }
    });
    // The warning comes as the node starts, before it runs; the server
    // exiting ends the wait too.
    let deadline = Instant::now() + Duration::from_secs(20);
    let warning = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("WARN") && l.contains("records the cluster's members") => {
                break Some(l)
            }
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    drop(again);
    let warning = warning.expect("no warning about the recorded membership");
    assert!(
        warning.contains(&format!(
            "data directory {} records the cluster's members as voters {{1, 2, 3}}",
            dir.display()
        )),
        "{warning}"
    );
    assert!(
        warning.contains("the configuration lists nodes {1} (this node and its peers): nodes [2, 3] have no address"),
        "{warning}"
    );
}

/// A `data_dir` that is a file is called that, not "File exists".
#[test]
fn a_data_directory_that_is_a_file_is_refused_as_such() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("afile");
    std::fs::write(&file, "mine").expect("write");
    let client = format!("127.0.0.1:{}", free_port());
    let (code, text) = keel(server_args(&file, 1, 99, &client));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "data directory {} exists and is not a directory",
            file.display()
        )),
        "{text}"
    );
    assert!(!text.contains("File exists"), "{text}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "mine");
    // Under a file: the OS's "Not a directory".
    let (code, text) = keel(server_args(&file.join("data"), 1, 99, &client));
    assert_ne!(code, 0, "{text}");
    let os = std::io::Error::from_raw_os_error(libc::ENOTDIR).to_string();
    assert!(text.contains(&os), "{text}");
}
