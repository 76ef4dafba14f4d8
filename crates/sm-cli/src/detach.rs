//! Detached VMs (`run -d`) and the commands that manage them: `ps`, `logs`,
//! `exec`, `stop`, `kill`.
//!
//! `run -d` re-executes this binary with the same arguments and
//! `SM_DETACHED_ID=<id>` set, in its own process group with stdin closed and
//! stdout + stderr going to the VM's log file. That process (the supervisor)
//! owns the VM: it starts it, records `running` with its pid and the VM's vsock
//! socket in `state.json`, runs the command, records the exit code, and stops
//! the VM — the VM lives exactly as long as its command, as a docker container
//! does. The parent returns the id once the supervisor reports `running` (or
//! fails with the log when it does not).
//!
//! State lives in `$SUPERMACHINE_HOME/vms/<id>/` (`state.json`, `log`). `exec`
//! connects to the agent through the recorded vsock socket; `stop` sends the
//! supervisor SIGTERM (it records exit 143 and ends, taking the VM with it),
//! SIGKILL after a grace period; `kill` sends SIGKILL and records 137.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use sm_api::agent::DEFAULT_AGENT_PORT;
use sm_api::{AgentClient, ExecRequest};

use crate::exec;

/// Set in the supervisor's environment: the id it runs under.
pub const DETACHED_ENV: &str = "SM_DETACHED_ID";

/// How long `run -d` waits for the VM to come up (a cold boot is ~30 s on
/// emulated-kernel hosts).
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// Grace period of `stop` before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub id: String,
    pub name: Option<String>,
    pub image: String,
    pub command: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    /// `starting`, `running` or `exited`.
    pub status: String,
    pub exit_code: Option<i32>,
    /// The supervisor process.
    pub pid: Option<i32>,
    /// The VM's vsock socket (host side).
    pub vsock: Option<PathBuf>,
    /// The command's environment (image ENV + -e), inherited by `exec`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Published ports, `HOSTIP:HOSTPORT->GUESTPORT/tcp` (host ports picked for 0 resolved).
    #[serde(default)]
    pub ports: Vec<String>,
}

/// Where detached VMs are recorded.
pub fn state_root() -> PathBuf {
    sm_api::oci::Store::default_root().parent().map(|p| p.join("vms")).unwrap_or_else(|| PathBuf::from("vms"))
}

fn state_path(id: &str) -> PathBuf {
    state_root().join(id).join("state.json")
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read_state(id: &str) -> Result<VmState> {
    let p = state_path(id);
    let bytes = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", p.display()))
}

/// Writes the state atomically (temp file + rename), so readers never see half of it.
pub fn write_state(s: &VmState) -> Result<()> {
    let p = state_path(&s.id);
    let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, serde_json::to_vec_pretty(s)?).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The state as it really is: a `running` VM whose supervisor is gone exited
/// without recording it (killed from outside).
fn effective(mut s: VmState) -> VmState {
    if s.status != "exited" && !s.pid.is_some_and(alive) && s.status != "starting" {
        s.status = "exited".into();
        s.exit_code.get_or_insert(137);
    }
    s
}

fn all_states() -> Result<Vec<VmState>> {
    let root = state_root();
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(&root) else { return Ok(out) };
    for e in entries.flatten() {
        if let Ok(s) = read_state(&e.file_name().to_string_lossy()) {
            out.push(effective(s));
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.created));
    Ok(out)
}

/// The VM `key` names: its name, its id or a unique id prefix.
fn find(key: &str) -> Result<VmState> {
    let all = all_states()?;
    if let Some(s) = all.iter().find(|s| s.name.as_deref() == Some(key) || s.id == key) {
        return Ok(s.clone());
    }
    let matches: Vec<&VmState> = all.iter().filter(|s| s.id.starts_with(key)).collect();
    match matches.len() {
        1 => Ok(matches[0].clone()),
        0 => bail!("no such VM: {key} (see `supermachine ps -a`)"),
        n => bail!("{key:?} matches {n} VMs: give more of the id or the name"),
    }
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        b.copy_from_slice(&(t ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `run -d`: starts the supervisor and returns the id once the VM runs.
pub fn launch(name: Option<&str>, image: &str, command: &[String]) -> Result<ExitCode> {
    if let Some(n) = name {
        if all_states()?.iter().any(|s| s.name.as_deref() == Some(n)) {
            bail!("the name {n:?} is already in use (remove it with `supermachine rm {n}` or pick another)");
        }
    }
    let id = new_id();
    let dir = state_root().join(&id);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = VmState {
        id: id.clone(),
        name: name.map(String::from),
        image: image.to_string(),
        command: command.to_vec(),
        created: now_secs(),
        status: "starting".into(),
        exit_code: None,
        pid: None,
        vsock: None,
        env: Vec::new(),
        ports: Vec::new(),
    };
    write_state(&state)?;
    let log_path = dir.join("log");
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the supermachine binary")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, &id)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the VM supervisor")?;
    let t0 = Instant::now();
    loop {
        let s = read_state(&id)?;
        if s.status != "starting" {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let _ = fs::remove_dir_all(&dir);
            bail!("the VM did not start ({status}):\n{}", log.trim_end());
        }
        if t0.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            bail!("the VM did not start within {START_TIMEOUT:?}; log: {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}

/// In the supervisor: SIGTERM records exit 143 and ends the process (and the
/// VM with it). Call first thing, before any other thread exists, so every
/// thread inherits SIGTERM blocked and only the waiting thread takes it.
pub fn handle_stop_signal(id: &str) -> Result<()> {
    // SAFETY: sigset operations on a local set; pthread_sigmask changes only
    // this thread's mask (inherited by threads created later).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let id = id.to_string();
    std::thread::Builder::new().name("sigterm".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait blocks until a signal of `set` is pending for us.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            record_exit(&id, 143);
            std::process::exit(143);
        }
    })?;
    Ok(())
}

/// In the supervisor, once the VM is up.
pub fn record_running(id: &str, vsock: &Path, env: &[String], ports: &[String]) -> Result<()> {
    let mut s = read_state(id)?;
    s.status = "running".into();
    s.pid = Some(std::process::id() as i32);
    s.vsock = Some(vsock.to_path_buf());
    s.env = env.to_vec();
    s.ports = ports.to_vec();
    write_state(&s)
}

/// Records how the VM's command ended (best effort: the state file may be gone after `rm`).
pub fn record_exit(id: &str, code: i32) {
    if let Ok(mut s) = read_state(id) {
        s.status = "exited".into();
        s.exit_code = Some(code);
        let _ = write_state(&s);
    }
}

#[derive(Args)]
pub struct PsArgs {
    /// Also list VMs that have exited.
    #[arg(short, long)]
    all: bool,
}

pub fn ps(args: PsArgs) -> Result<ExitCode> {
    println!("{:<14}{:<32}{:<28}{:<16}{:<32}NAME", "VM ID", "IMAGE", "COMMAND", "STATUS", "PORTS");
    for s in all_states()?.into_iter().filter(|s| args.all || s.status != "exited") {
        let status = match (s.status.as_str(), s.exit_code) {
            ("exited", Some(c)) => format!("Exited ({c})"),
            ("running", _) => "Up".to_string(),
            (other, _) => other.to_string(),
        };
        let mut command = s.command.join(" ");
        if command.len() > 26 {
            command.truncate(23);
            command.push_str("...");
        }
        let mut image = s.image.clone();
        if image.len() > 30 {
            image = format!("...{}", &image[image.len() - 27..]);
        }
        let ports = if s.status == "running" { s.ports.join(", ") } else { String::new() };
        println!("{:<14}{:<32}{:<28}{:<16}{:<32}{}", s.id, image, command, status, ports, s.name.unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct LogsArgs {
    /// Keep printing new output until the VM exits.
    #[arg(short, long)]
    follow: bool,
    /// VM name or id.
    vm: String,
}

pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    let s = find(&args.vm)?;
    let path = state_root().join(&s.id).join("log");
    let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::stdout();
    loop {
        std::io::copy(&mut f, &mut out)?;
        if !args.follow || effective(read_state(&s.id)?).status == "exited" {
            std::io::copy(&mut f, &mut out)?; // what arrived meanwhile
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    process: crate::run::ProcessOptions,
    /// VM name or id, then the command and its arguments.
    #[arg(required = true, num_args = 2.., trailing_var_arg = true, allow_hyphen_values = true, value_name = "VM CMD")]
    args: Vec<String>,
}

pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    let (key, argv) = args.args.split_first().context("missing VM")?;
    let s = find(key)?;
    let (true, Some(vsock)) = (s.status == "running", s.vsock.as_ref()) else {
        bail!("VM {key} is not running ({}); start a new one with `supermachine run -d`", s.status);
    };
    let stream = sm_api::connect_vsock(vsock, DEFAULT_AGENT_PORT)
        .with_context(|| format!("connecting to the agent of VM {key} through {}", vsock.display()))?;
    let mut client = AgentClient::connect_within(stream, sm_api::agent::GREETING_TIMEOUT)
        .with_context(|| format!("greeting the agent of VM {key}"))?;
    let mut req = ExecRequest::new(argv.iter().cloned());
    // The command's environment, with -e on top (as docker exec does).
    req.env = s.env.clone();
    for e in crate::run::env_overrides(&args.process.env) {
        let key = e.split('=').next().unwrap_or_default().to_string();
        req.env.retain(|x| x.split('=').next() != Some(key.as_str()));
        req.env.push(e);
    }
    req.cwd = args.process.workdir.clone();
    req.user = args.process.user.clone();
    match exec::stream(&mut client, &req) {
        Ok(report) => Ok(ExitCode::from(crate::run::status_code(report.status))),
        Err(e) => crate::run::exec_error(&argv[0], args.process.workdir.as_deref().unwrap_or("/"), e),
    }
}

#[derive(Args)]
pub struct StopArgs {
    /// VM names or ids.
    #[arg(required = true)]
    vms: Vec<String>,
}

fn signal_and_wait(key: &str, signal: i32, grace: Duration) -> Result<VmState> {
    let s = find(key)?;
    let Some(pid) = s.pid.filter(|p| alive(*p) && s.status == "running") else {
        return Ok(s); // already exited
    };
    // SAFETY: sending a signal to the recorded supervisor process.
    unsafe { libc::kill(pid, signal) };
    let t0 = Instant::now();
    while alive(pid) && t0.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above; the grace period is over.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = read_state(&s.id)?;
    if s.status != "exited" {
        record_exit(&s.id, 137);
    }
    read_state(&s.id)
}

#[derive(Args)]
pub struct PortArgs {
    /// VM name or id.
    vm: String,
}

/// `port VM`: the VM's published ports, one per line (as `docker port`).
pub fn port(args: PortArgs) -> Result<ExitCode> {
    let s = find(&args.vm)?;
    if s.status != "running" {
        bail!("VM {} is not running ({})", args.vm, s.status);
    }
    for p in &s.ports {
        println!("{p}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: StopArgs) -> Result<ExitCode> {
    for key in &args.vms {
        signal_and_wait(key, libc::SIGTERM, STOP_GRACE)?;
        println!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn kill(args: StopArgs) -> Result<ExitCode> {
    for key in &args.vms {
        signal_and_wait(key, libc::SIGKILL, Duration::from_secs(5))?;
        println!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rm(args: StopArgs) -> Result<ExitCode> {
    for key in &args.vms {
        let s = find(key)?;
        if s.status == "running" {
            bail!("VM {key} is running: stop it first");
        }
        let dir = state_root().join(&s.id);
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        println!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}
