//! Helpers shared by the real-process tests: `walrus-node` processes on loopback with free
//! ports and their own data directories, driven with the `walrus-cli` client. Every process is
//! killed by its handle (by pid) when dropped; every wait is bounded.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use walrus_cli::Client;
use walrus_core::wire::Reply;

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `walrus-node` process; killed on drop.
pub struct NodeProc {
    pub id: u64,
    pub dir: PathBuf,
    pub raft_port: u16,
    pub client_port: u16,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
    /// The raft port of the node it joined through (restarts pass it again).
    join: Option<u16>,
}

impl NodeProc {
    pub fn start(id: u64, dir: &Path, join: Option<u16>, env: &[(&str, &str)]) -> NodeProc {
        let mut n = NodeProc {
            id,
            dir: dir.to_path_buf(),
            raft_port: free_port(),
            client_port: free_port(),
            child: None,
            join,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        n.spawn(join);
        n
    }

    pub fn spawn(&mut self, join: Option<u16>) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walrus-node"));
        cmd.arg("--node-id")
            .arg(self.id.to_string())
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--raft-port")
            .arg(self.raft_port.to_string())
            .arg("--client-port")
            .arg(self.client_port.to_string())
            .arg("--request-timeout-ms")
            .arg("3000")
            .env("RUST_LOG", "warn")
            // Snapshots, log purges and store rewrites happen within every test's run.
            .env("WALRUS_RAFT_SNAPSHOT_EVERY", "64")
            .stdout(Stdio::null());
        // `WALRUS_TEST_NODE_LOGS=1` shows the nodes' warnings, for debugging a failure.
        if std::env::var_os("WALRUS_TEST_NODE_LOGS").is_none() {
            cmd.stderr(Stdio::null());
        }
        if let Some(p) = join {
            cmd.arg("--join").arg(format!("127.0.0.1:{p}"));
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn walrus-node"));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn(self.join);
    }

    /// Kills the process, deletes its whole data directory and starts it again (joining
    /// through the same peer): a node that lost its disk.
    pub fn wipe_and_restart(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).expect("wipe the data directory");
        self.spawn(self.join);
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing until
    /// [`NodeProc::resume`].
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the node is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal the node");
    }

    /// Waits up to `limit` for the process to exit on its own; its status if it did.
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether the process is running (started and not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn client(&self) -> Client {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut c) = Client::connect(&self.addr(), Duration::from_secs(5)) {
                if let Ok(Reply::Ok(Some(m))) = c.request(b"METRICS") {
                    if String::from_utf8_lossy(&m).contains("\"current_leader\":")
                        && !String::from_utf8_lossy(&m).contains("\"current_leader\":null")
                    {
                        return c;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not become ready",
                self.id
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn ok(r: Reply) -> Option<Vec<u8>> {
    match r {
        Reply::Ok(p) => p,
        other => panic!("expected OK, got {other:?}"),
    }
}

pub fn put(c: &mut Client, topic: &str, payload: &[u8]) -> Reply {
    let mut body = format!("PUT {topic} ").into_bytes();
    body.extend_from_slice(payload);
    c.request(&body).unwrap()
}

/// Retries a request until it is not `ERR` (leadership moves, topics propagate), bounded.
pub fn eventually(c: &mut Client, body: &[u8]) -> Reply {
    eventually_counting(c, body).0
}

/// [`eventually`], also saying how many times the request was answered `ERR` first. A PUT
/// answered `ERR` may still have been written (acknowledgement is at-least-once), so a test
/// that retries one may read it twice.
pub fn eventually_counting(c: &mut Client, body: &[u8]) -> (Reply, u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut errors = 0;
    loop {
        let r = c.request(body).unwrap();
        if !matches!(r, Reply::Err(_)) || Instant::now() > deadline {
            return (r, errors);
        }
        eprintln!("retrying {:?} after {r:?}", String::from_utf8_lossy(body));
        errors += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a 3-node cluster (ids 1, 2, 3) in `dir` and returns it with a ready client each.
pub fn cluster(dir: &Path, env: &[(&str, &str)]) -> Vec<NodeProc> {
    cluster_of(3, dir, env)
}

/// Starts a cluster of `n` nodes (ids 1..=n, each joining through node 1), each ready.
pub fn cluster_of(n: u64, dir: &Path, env: &[(&str, &str)]) -> Vec<NodeProc> {
    let first = NodeProc::start(1, &dir.join("n1"), None, env);
    drop(first.client());
    let mut nodes = vec![first];
    for id in 2..=n {
        let node = NodeProc::start(
            id,
            &dir.join(format!("n{id}")),
            Some(nodes[0].raft_port),
            env,
        );
        drop(node.client());
        nodes.push(node);
    }
    nodes
}

/// GETs from `c` until `EMPTY` (bounded), returning the payloads.
pub fn drain(c: &mut Client, topic: &str, max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let body = format!("GET {topic}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < max && Instant::now() < deadline {
        match c.request(body.as_bytes()).unwrap() {
            Reply::Ok(Some(p)) => out.push(p),
            Reply::Empty => break,
            Reply::Ok(None) => panic!("GET answered OK without a payload"),
            Reply::Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    out
}

/// GETs from `c` until `want` payloads came back or 60 s passed: an `EMPTY` in between (while
/// restarted nodes catch up, or a failover runs) only pauses for 200 ms.
pub fn drain_until(c: &mut Client, topic: &str, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        got.extend(drain(c, topic, 1000));
        std::thread::sleep(Duration::from_millis(200));
    }
    got
}

/// The leader of the open segment of `topic`, from `STATE`.
pub fn open_leader(c: &mut Client, topic: &str) -> u64 {
    let state =
        String::from_utf8(ok(eventually(c, format!("STATE {topic}").as_bytes())).unwrap()).unwrap();
    state
        .rsplit("\"leader\":")
        .next()
        .unwrap()
        .split(|ch: char| !ch.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A counter from `METRICS`, summed over the given running nodes.
pub fn metric_sum(nodes: &[&NodeProc], name: &str) -> u64 {
    nodes
        .iter()
        .filter_map(|n| {
            let mut c = Client::connect(&n.addr(), Duration::from_secs(5)).ok()?;
            let Ok(Reply::Ok(Some(m))) = c.request(b"METRICS") else {
                return None;
            };
            let v: serde_json::Value = serde_json::from_slice(&m).ok()?;
            v["counters"][name].as_u64()
        })
        .sum()
}
