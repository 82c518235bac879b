//! Test harness: runs the real `ragd` binary on a temp folder with the real
//! model, and talks to it over HTTP like a user would.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir() -> PathBuf {
    let dir = repo().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "run ops/fetch-models.sh first"
    );
    dir
}

/// See [`ragd_actors::testkit::free_port`]: one registry of handed-out
/// ports for the daemons and the services they talk to.
pub use ragd_actors::testkit::free_port;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const HR_TOKEN: &str = "hr-reader-token";
pub const ENG_TOKEN: &str = "eng-reader-token";

/// A temp workspace: `kb/` is the watched source, `data/` the data folder.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub query_port: u16,
    pub admin_port: u16,
}

impl Workspace {
    pub fn new() -> Workspace {
        Self::with_extra("")
    }

    /// `extra` is appended to the generated config (e.g. a [pipeline] table).
    pub fn with_extra(extra: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kb/hr")).unwrap();
        std::fs::create_dir_all(dir.path().join("kb/eng")).unwrap();
        let ws = Workspace {
            dir,
            query_port: free_port(),
            admin_port: free_port(),
        };
        let config = format!(
            r#"
data_dir = "data"
[model]
embedder = "{model}"
[query]
bind = "127.0.0.1:{q}"
[admin]
bind = "127.0.0.1:{a}"
token = "{ADMIN_TOKEN}"
{extra}
[[sources]]
name = "kb"
path = "kb"
division = "general"
access_level = "public"
  [[sources.rules]]
  prefix = "hr"
  division = "hr"
  access_level = "internal"
  [[sources.rules]]
  prefix = "eng"
  division = "eng"
  access_level = "internal"
[[principals]]
name = "hr-reader"
token = "{HR_TOKEN}"
divisions = ["hr", "general"]
access_levels = ["public", "internal"]
[[principals]]
name = "eng-reader"
token = "{ENG_TOKEN}"
divisions = ["eng", "general"]
access_levels = ["public", "internal"]
"#,
            model = model_dir().display(),
            q = ws.query_port,
            a = ws.admin_port,
        );
        std::fs::write(ws.config(), config).unwrap();
        ws
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("ragd.toml")
    }

    /// Points this workspace's source at `other`'s knowledge base, so two
    /// nodes (own data folders, own ports) index the same files.
    pub fn share_kb_of(&self, other: &Workspace) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let text = text.replace(
            "path = \"kb\"",
            &format!("path = {:?}", other.kb().display().to_string()),
        );
        std::fs::write(self.config(), text).unwrap();
    }

    pub fn kb(&self) -> PathBuf {
        self.dir.path().join("kb")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let p = self.kb().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Write then rename, as editors and sync tools do, so the watcher
        // never reads a half-written file.
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_string_lossy()));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    pub fn start(&self) -> Daemon {
        Daemon::start(self)
    }

    /// `ragd ingest` of `paths` (all the sources when empty) with this
    /// workspace's config, which must succeed; returns what it printed.
    pub fn ingest(&self, paths: &[&Path]) -> String {
        let cfg = self.config();
        let mut args = vec!["ingest", "--config", cfg.to_str().unwrap()];
        args.extend(paths.iter().map(|p| p.to_str().unwrap()));
        let (ok, out, err) = self.ragd(&args);
        assert!(ok, "{out}{err}");
        out
    }

    /// Runs a ragd subcommand to completion; returns (success, stdout, stderr).
    pub fn ragd(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ragd"))
            .args(args)
            .env("RAGD_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

std::thread_local! {
    /// The logs of every daemon this test (its thread) started, so that a
    /// timeout shows what the other nodes of a cluster were doing too.
    static LOGS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The last `n` characters of `s`.
fn tail(s: &str, n: usize) -> &str {
    let start = s.char_indices().rev().nth(n).map_or(0, |(i, _)| i);
    &s[start..]
}

pub struct Daemon {
    pub child: Child,
    pub query: String,
    pub admin: String,
    log: PathBuf,
}

impl Daemon {
    pub fn start(ws: &Workspace) -> Daemon {
        Self::start_with_env(ws, &[])
    }

    pub fn start_with_env(ws: &Workspace, env: &[(&str, &str)]) -> Daemon {
        let log = ws.dir.path().join(format!(
            "ragd-{}.log",
            Instant::now().elapsed().as_nanos() ^ rand_suffix()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_ragd"))
            .args(["up", "--config"])
            .arg(ws.config())
            .env("RAGD_LOG", "info,ragd_actors=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        LOGS.with(|l| l.borrow_mut().push(log.clone()));
        let d = Daemon {
            child,
            query: format!("http://127.0.0.1:{}", ws.query_port),
            admin: format!("http://127.0.0.1:{}", ws.admin_port),
            log,
        };
        d.wait_until("admin API up", Duration::from_secs(60), || {
            d.get_status("/health") == Some(200)
        });
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                let others: String = LOGS.with(|l| {
                    l.borrow()
                        .iter()
                        .filter(|p| **p != self.log)
                        .map(|p| {
                            let log = std::fs::read_to_string(p).unwrap_or_default();
                            format!("\n--- {} tail:\n{}", p.display(), tail(&log, 6000))
                        })
                        .collect()
                });
                let log = self.log();
                panic!(
                    "timed out waiting for {what}; daemon log tail:\n{}\n\
                     other daemons of this test:{others}",
                    tail(&log, 6000)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn client() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    pub fn get_status(&self, path: &str) -> Option<u16> {
        self.status(path, None)
    }

    /// The status of an admin GET made with the admin token.
    pub fn admin_status(&self, path: &str) -> Option<u16> {
        self.status(path, Some(ADMIN_TOKEN))
    }

    fn status(&self, path: &str, token: Option<&str>) -> Option<u16> {
        let mut req = Self::client().get(format!("{}{path}", self.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().ok().map(|r| r.status().as_u16())
    }

    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        Self::client()
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    pub fn ledger(&self) -> serde_json::Value {
        self.admin_json("/ingest")
    }

    /// Waits until the first scan is done and nothing is in flight, and the
    /// ledger satisfies `ok`.
    pub fn wait_ledger(
        &self,
        timeout: Duration,
        mut ok: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        self.wait_until("the ledger", timeout, || {
            if self.get_status("/ready") != Some(200) {
                return false;
            }
            last = self.ledger();
            last["in_flight"] == 0 && ok(&last)
        });
        last
    }

    /// POST /v1/query; returns (status, body).
    pub fn query_raw(&self, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
        let mut req = Self::client()
            .post(format!("{}/v1/query", self.query))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(serde_json::Value::Null))
    }

    pub fn ask(&self, token: &str, question: &str) -> serde_json::Value {
        self.ask_top(token, question, 5)
    }

    pub fn ask_top(&self, token: &str, question: &str, top_k: usize) -> serde_json::Value {
        let (status, body) = self.query_raw(
            Some(token),
            &serde_json::json!({ "question": question, "top_k": top_k }).to_string(),
        );
        assert_eq!(status, 200, "query failed: {body}");
        body
    }

    /// Asks until the answer comes from the cache (stores are asynchronous).
    pub fn wait_for_cached(&self, question: &str) -> serde_json::Value {
        wait_for("a cached answer", Duration::from_secs(10), || {
            let r = self.ask(HR_TOKEN, question);
            (r["cached"] == true).then_some(r)
        })
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory of the daemon so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(&self.child.id().to_string(), "VmHWM:")
    }
}

/// A memory field (`VmHWM:`, `VmRSS:`, ...) of `/proc/<pid>/status` in
/// KiB; `pid` may be "self". 0 where there is none.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A bench knob: the number in environment variable `name`, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn unsafe_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn source_uris(resp: &serde_json::Value) -> Vec<String> {
    source_field(resp, "uri")
}

pub fn source_doc_ids(resp: &serde_json::Value) -> Vec<String> {
    source_field(resp, "doc_id")
}

fn source_field(resp: &serde_json::Value, field: &str) -> Vec<String> {
    resp["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[field].as_str().unwrap().to_string())
        .collect()
}

pub fn texts(resp: &serde_json::Value) -> String {
    resp["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn valid_pdf(lines: &[&str]) -> Vec<u8> {
    let content: String = format!(
        "BT /F1 12 Tf 72 720 Td 16 TL\n{}ET\n",
        lines
            .iter()
            .map(|l| format!("({l}) Tj T*\n"))
            .collect::<String>()
    );
    pdf_document(content.as_bytes(), None, None)
}

/// A one-page PDF: its content stream (`filter` names its encoding, if
/// any) and, if given, another object in place of its font.
pub fn pdf_document(content: &[u8], filter: Option<&str>, font: Option<&[u8]>) -> Vec<u8> {
    let mut stream = format!(
        "<< /Length {}{} >>\nstream\n",
        content.len(),
        filter.map(|f| format!(" /Filter /{f}")).unwrap_or_default()
    )
    .into_bytes();
    stream.extend_from_slice(content);
    stream.extend_from_slice(b"\nendstream");
    let objs: [Vec<u8>; 5] = [
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_vec(),
        stream,
        font.map(<[u8]>::to_vec).unwrap_or_else(|| {
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
                .to_vec()
        }),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = vec![];
    for (i, o) in objs.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n", i + 1).bytes());
        out.extend_from_slice(o);
        out.extend(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objs.len() + 1).bytes());
    for off in offsets {
        out.extend(format!("{off:010} 00000 n \n").bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objs.len() + 1
        )
        .bytes(),
    );
    out
}

/// A PDF whose font object is `depth` arrays nested in one another: a
/// parser that recurses per level overflows its stack (400 KB here).
pub fn nested_pdf(depth: usize) -> Vec<u8> {
    let mut font = vec![b'['; depth];
    font.extend(std::iter::repeat_n(b']', depth));
    pdf_document(b"BT ET", None, Some(&font))
}

/// A PDF whose page shows `text` `times` times, its content stream
/// deflated: `times` in the millions makes a file of a few hundred KB
/// that inflates to hundreds of MB.
pub fn deflated_pdf(text: &str, times: usize) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(b"BT /F1 12 Tf 72 720 Td ").unwrap();
    let show = format!("({text}) Tj ");
    for _ in 0..times {
        z.write_all(show.as_bytes()).unwrap();
    }
    z.write_all(b"ET").unwrap();
    pdf_document(&z.finish().unwrap(), Some("FlateDecode"), None)
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn file_count(dir: &Path) -> usize {
    walk(dir).len()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The daemon's /metrics (Prometheus text).
pub fn metrics_text(d: &Daemon) -> String {
    Daemon::client()
        .get(format!("{}/metrics", d.admin))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// A counter or gauge from the daemon's /metrics, summed over its labels;
/// 0 when it has not been recorded yet.
pub fn metric(d: &Daemon, name: &str) -> f64 {
    metric_series(d, name, |_| true)
}

/// [`metric`], summed over the series whose labels include `label`
/// (`vector="reused"`).
pub fn metric_where(d: &Daemon, name: &str, label: &str) -> f64 {
    metric_series(d, name, |labels| labels.split(',').any(|l| l == label))
}

/// The sum of `name`'s series whose labels (`a="x",b="y"`, empty for none)
/// `keep` keeps.
fn metric_series(d: &Daemon, name: &str, keep: impl Fn(&str) -> bool) -> f64 {
    metrics_text(d)
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let labels = match rest.strip_prefix('{') {
                Some(r) => r.split('}').next()?,
                None if rest.starts_with(' ') => "",
                None => return None,
            };
            keep(labels).then_some(l)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Team names for generated documents (the benches' corpora).
pub const TEAMS: &[&str] = &[
    "payroll",
    "facilities",
    "security",
    "platform",
    "legal",
    "travel",
    "support",
    "research",
];

/// The actor named `name` in /actors (status, processed, last_error, …).
pub fn actor(d: &Daemon, name: &str) -> serde_json::Value {
    fn find(v: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
        if v["name"] == name {
            return Some(v.clone());
        }
        v["children"].as_array()?.iter().find_map(|c| find(c, name))
    }
    let tree = d.admin_json("/actors");
    tree["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|r| find(r, name))
        .expect("actor in /actors")
}

/// `processed` of the actor named `name` in /actors.
pub fn actor_processed(d: &Daemon, name: &str) -> u64 {
    actor(d, name)["processed"].as_u64().expect("a count")
}

/// One-chunk note `i`: a sentence only it contains (badge number 7000 + i).
pub fn note(i: usize) -> String {
    format!(
        "# Note {i}\n\nOffice {i} keeps its spare badge number {n} in the reception safe.\n",
        n = 7000 + i
    )
}

/// `n` one-chunk notes, alternating between the hr and eng partitions.
pub fn write_notes(ws: &Workspace, n: usize) {
    for i in 0..n {
        let div = if i % 2 == 0 { "hr" } else { "eng" };
        ws.write(&format!("{div}/note-{i}.md"), note(i));
    }
}

/// Config tables for the shared services: the Qdrant collection and the
/// Redis cache index `collection`. For `Workspace::with_extra`.
pub fn shared_services_toml(qdrant_url: &str, redis_url: &str, collection: &str) -> String {
    format!(
        r#"[index]
backend = "qdrant"
qdrant_url = "{qdrant_url}"
qdrant_collection = "{collection}"
[cache]
backend = "redis"
redis_url = "{redis_url}"
redis_index = "{collection}"
"#
    )
}

/// Config tables for a cluster node: its name and roles on the Kafka bus at
/// `brokers` (4 partitions). For `Workspace::with_extra`, with
/// [`shared_services_toml`].
pub fn kafka_node_toml(name: &str, roles: &[&str], brokers: &str, max_queued: usize) -> String {
    let roles: Vec<String> = roles.iter().map(|r| format!("{r:?}")).collect();
    format!(
        r#"[node]
name = "{name}"
roles = [{roles}]
[bus]
backend = "kafka"
brokers = "{brokers}"
partitions = 4
max_queued = {max_queued}
"#,
        roles = roles.join(", "),
    )
}

/// splitmix64: a deterministic, dependency-free generator is all a
/// benchmark's data needs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
    /// `n` words drawn from `words`, joined by spaces.
    pub fn words(&mut self, words: &[&str], n: usize) -> String {
        (0..n)
            .map(|_| words[(self.next_u64() % words.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A copy of the model folder with `config.json` rewritten by `edit` (the
/// weights and tokenizer linked): another model where the edit changes
/// what the weights make, the same model under another name otherwise.
pub fn model_variant(ws: &Workspace, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let dir = ws.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(model_dir().join(f), dir.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    let edited = edit(&config);
    assert_ne!(edited, config);
    std::fs::write(dir.join("config.json"), edited).unwrap();
    dir
}

/// `ws`'s config with its model set to `model`, in a file of its own.
pub fn config_with_model(ws: &Workspace, model: &Path) -> PathBuf {
    let text = std::fs::read_to_string(ws.config()).unwrap();
    let from = format!("embedder = {:?}", model_dir().display().to_string());
    assert!(text.contains(&from));
    let to = format!("embedder = {:?}", model.display().to_string());
    let path = ws.dir.path().join(format!(
        "ragd-{}.toml",
        model.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, text.replace(&from, &to)).unwrap();
    path
}
