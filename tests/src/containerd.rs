//! A real containerd (Debian's) of a test's own: config, root, state and
//! socket in a temp dir, the supermachine shim on its `PATH`, driven with
//! `ctr`; and the checks that nothing (shim, mount, bundle) is left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{
    agent_image, busybox_layout, hypervisor, run_command, skip_or_fail, temp_dir, tools, workspace_root, CliOutput,
    Registry, TempDir,
};

/// A ctr command that boots a VM (cold here), with room for a busy host.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// A ctr command that does not boot a VM.
pub const QUICK: Duration = Duration::from_secs(60);

/// The runtime name of the shim (`ctr run --runtime`).
pub const RUNTIME: &str = "io.containerd.supermachine.v2";
/// The namespace the tests use.
pub const NAMESPACE: &str = "sm-test";
/// The shim binary's name (containerd finds it on `PATH` from [`RUNTIME`]).
pub const SHIM_BINARY: &str = "containerd-shim-supermachine-v2";

/// A running containerd; stopped (and checked for leftovers) by [`Containerd::stop`].
pub struct Containerd {
    dir: TempDir,
    child: Option<Child>,
    /// Its gRPC socket (what `ctr -a` takes).
    pub socket: PathBuf,
}

/// The debug shim binary, or skips/fails with what to build.
pub fn shim_binary(test: &str) -> Option<PathBuf> {
    let bin = workspace_root().join("target/debug").join(SHIM_BINARY);
    if bin.is_file() {
        Some(bin)
    } else {
        skip_or_fail(test, format!("{} is missing: run `cargo build -p sm-shim` first", bin.display()))
    }
}

/// What every containerd test needs (the shim, KVM, the agent guest,
/// containerd, a registry, the root disk tools, `script`); the shim's path,
/// `None` when skipped.
pub fn prerequisites(test: &str) -> Option<PathBuf> {
    let shim = shim_binary(test)?;
    hypervisor(test)?;
    agent_image(test)?;
    let needed = [
        ("/usr/bin/docker-registry", "docker-registry"),
        ("/usr/bin/skopeo", "skopeo"),
        ("/usr/bin/mkfs.erofs", "erofs-utils"),
        ("/usr/bin/mksquashfs", "squashfs-tools"),
        ("/usr/bin/script", "bsdutils"),
    ];
    (containerd_tools(test) && tools(test, &needed)).then_some(shim)
}

/// A registry holding busybox, and the reference containerd pulls it by.
pub fn busybox_in_registry() -> (Registry, String) {
    let registry = Registry::start();
    let layout = temp_dir("ctr-busybox");
    busybox_layout(layout.path());
    registry.push(layout.path(), "busybox:latest");
    let image = format!("127.0.0.1:{}/busybox:latest", registry.port);
    (registry, image)
}

/// The status `ctr task ls` shows for task `id` (RUNNING, STOPPED...).
pub fn task_status(ctd: &Containerd, id: &str) -> Option<String> {
    let out = ctd.ctr(&["task", "ls"], QUICK);
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
}

/// Whether containerd and ctr are installed (skips/fails naming the package).
pub fn containerd_tools(test: &str) -> bool {
    tools(test, &[("/usr/bin/containerd", "containerd"), ("/usr/bin/ctr", "containerd")])
}

/// Run by `unshare --mount` (its mounts private to it): puts a `/dev` of
/// the host's entries but `kvm` (bound one by one onto a tmpfs at
/// `$SM_TEST_DEV`) in place, then runs its arguments.
const HIDE_KVM: &str = r#"
dev="$SM_TEST_DEV"
mount -t tmpfs -o mode=0755 sm-test-dev "$dev"
for f in /dev/* /dev/.[!.]*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  n=${f#/dev/}
  [ "$n" = kvm ] && continue
  if [ -L "$f" ]; then cp -P "$f" "$dev/$n"
  elif [ -d "$f" ]; then mkdir "$dev/$n"; mount --rbind "$f" "$dev/$n"
  else : > "$dev/$n"; mount --bind "$f" "$dev/$n"
  fi
done
mount --move "$dev" /dev
[ ! -e /dev/kvm ]
exec "$@"
"#;

impl Containerd {
    /// Starts containerd (no CRI plugin) with `shim` findable on its `PATH`
    /// and the guest from `guest_dir`; waits until it answers.
    pub fn start(shim: &Path, guest_dir: &Path) -> Containerd {
        Containerd::start_with(shim, guest_dir, false, &[])
    }

    /// [`Self::start`] with more variables in containerd's (and so its
    /// shims') environment.
    pub fn start_with_env(shim: &Path, guest_dir: &Path, env: &[(&str, &str)]) -> Containerd {
        Containerd::start_with(shim, guest_dir, false, env)
    }

    /// [`Self::start`] in a mount namespace of its own whose `/dev` has
    /// everything of the host's but `kvm` (its shims, started by it, see
    /// the same): a host without KVM, for containerd and its shims only.
    pub fn start_without_kvm(shim: &Path, guest_dir: &Path) -> Containerd {
        Containerd::start_with(shim, guest_dir, true, &[])
    }

    fn start_with(shim: &Path, guest_dir: &Path, hide_kvm: bool, env: &[(&str, &str)]) -> Containerd {
        let dir = temp_dir("containerd");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(shim, bin.join(SHIM_BINARY)).unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut command = if hide_kvm {
            let dev = dir.path().join("dev");
            std::fs::create_dir(&dev).unwrap();
            let mut c = Command::new("/usr/bin/unshare");
            c.args(["--mount", "--propagation", "private", "/bin/sh", "-ec", HIDE_KVM, "sh"]).env("SM_TEST_DEV", dev);
            c.arg("/usr/bin/containerd");
            c
        } else {
            Command::new("/usr/bin/containerd")
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("SM_GUEST_DIR", guest_dir)
            .env("SUPERMACHINE_HOME", dir.path().join("supermachine"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Containerd { dir, child: Some(child), socket };
        let t = Instant::now();
        loop {
            let probe = Command::new("/usr/bin/ctr").arg("-a").arg(&c.socket).arg("version").output().unwrap();
            if probe.status.success() {
                break;
            }
            if let Some(Ok(Some(status))) = c.child.as_mut().map(Child::try_wait) {
                panic!("containerd exited ({status}):\n{}", c.log());
            }
            assert!(t.elapsed() < Duration::from_secs(60), "containerd did not answer within 60 s:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// The shims' store (`$SUPERMACHINE_HOME/oci`): cached root disks and baked snapshots.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("supermachine/oci")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a SOCKET -n NAMESPACE args...`, killed after `timeout`.
    pub fn ctr(&self, args: &[&str], timeout: Duration) -> CliOutput {
        self.ctr_with_input(args, None, timeout)
    }

    /// Pulls `image` from a plain-HTTP registry; panics with ctr's output on failure.
    pub fn pull(&self, image: &str) {
        let pull = self.ctr(&["images", "pull", "--plain-http", image], Duration::from_secs(120));
        assert_eq!(pull.code, Some(0), "ctr pull {image}: {}{}", pull.stdout, pull.stderr);
    }

    /// [`Self::ctr`] with `stdin`.
    pub fn ctr_with_input(&self, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> CliOutput {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("-a").arg(&self.socket).args(["-n", NAMESPACE]).args(args);
        run_command(cmd, &format!("ctr {args:?}"), stdin, timeout)
    }

    /// The shim processes of this containerd still running (their command
    /// lines name its socket).
    pub fn shims(&self) -> Vec<String> {
        let mut found = Vec::new();
        let needle = self.socket.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(SHIM_BINARY) && cmdline.contains(&needle) {
                found.push(format!("{}: {cmdline}", e.file_name().to_string_lossy()));
            }
        }
        found
    }

    /// Mounts under this containerd's directories (bundles' root file systems).
    pub fn mounts(&self) -> Vec<String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&dir))
            .map(str::to_string)
            .collect()
    }

    /// Task bundles left in the state directory.
    pub fn bundles(&self) -> Vec<PathBuf> {
        let tasks = self.dir.path().join("state/io.containerd.runtime.v2.task").join(NAMESPACE);
        std::fs::read_dir(tasks).into_iter().flatten().flatten().map(|e| e.path()).collect()
    }

    /// Root disks half-built in the shims' store.
    pub fn partial_disks(&self) -> Vec<PathBuf> {
        let rootfs = self.store().join("rootfs");
        let entries = std::fs::read_dir(rootfs).into_iter().flatten().flatten();
        entries.map(|e| e.path()).filter(|p| p.to_string_lossy().contains(".partial-")).collect()
    }

    /// Waits (up to `timeout`) until no shim, mount, bundle or half-built
    /// disk of this containerd is left; panics naming what is.
    pub fn assert_nothing_left(&self, timeout: Duration) {
        let t = Instant::now();
        loop {
            let (shims, mounts, bundles, partial) = (self.shims(), self.mounts(), self.bundles(), self.partial_disks());
            if shims.is_empty() && mounts.is_empty() && bundles.is_empty() && partial.is_empty() {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "left behind after {timeout:?}: shims {shims:?}, mounts {mounts:?}, bundles {bundles:?}, \
                 half-built disks {partial:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 20 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill sends a signal to the pid of a child we have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("containerd's log (shim logs included):\n{}", self.log());
        }
        self.stop();
        // A failed test must not leave shims (and their VMs) running.
        for shim in self.shims() {
            if let Some(pid) = shim.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill sends a signal to a pid; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
