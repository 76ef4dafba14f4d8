//! `supermachine run IMAGE [CMD...]`: like `docker run --rm`, in a microVM.
//!
//! Resolve (pull/import if missing) the image, build or reuse its read-only
//! root disk, start the agent guest with the disk as `/dev/vda` (the agent
//! mounts it under a tmpfs overlay and chroots into it) — restored from the
//! image's baked snapshot when there is one, else cold-booted and baked (see
//! [`crate::bake`]) — run the image's process with output streamed, stop the
//! VM, and exit with the process's
//! status (128+N for signal N), 126/127 when it cannot be executed / is not
//! found, 125 for errors of supermachine itself.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use sm_api::agent::ClientError;
use sm_api::oci::{RootfsFormat, RunOverrides};
use sm_api::{BakeOptions, GuestImage, Image};
use sm_api::{ExecRequest, ExitStatus};

use crate::{detach, exec, oci, tty};

/// Environment, working directory and user of a process (`run` and `exec`).
#[derive(Args)]
pub struct ProcessOptions {
    /// Set an environment variable: KEY=VALUE, or KEY to pass the host's value (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the process (default: the image's, else /).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid (default: the image's, else root).
    #[arg(short, long)]
    pub user: Option<String>,
}

/// When to fetch the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    /// Only when it is not in the local store.
    Missing,
    /// Every time.
    Always,
    /// Never: fail if it is not in the store.
    Never,
}

#[derive(Args)]
pub struct RunArgs {
    /// Forward stdin to the process (closed at EOF).
    #[arg(short, long)]
    interactive: bool,
    /// Run the process on a pseudo-terminal (stdout and stderr merge; with -i on a
    /// terminal, ours is put in raw mode).
    #[arg(short, long)]
    tty: bool,
    #[command(flatten)]
    process: ProcessOptions,
    /// Replace the image's entrypoint (also drops the image's CMD); "" clears it.
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// Mount a named volume, NAME:PATH[:ro] (created, 8 GiB sparse, on first
    /// use; see `supermachine volume`; its data outlives the VM; one running
    /// VM at a time), or share a host directory, /DIR:PATH[:OPTIONS] or
    /// ./DIR:PATH (virtio-fs; the guest reaches nothing outside DIR); OPTIONS
    /// comma-separated: ro, rw, dax (file pages mapped into the guest instead
    /// of copied), e.g. /src:/src:ro,dax; repeatable.
    #[arg(short = 'v', long = "volume", value_name = "NAME|DIR:PATH[:OPTIONS]")]
    volumes: Vec<String>,
    /// A name for the VM (used in messages).
    #[arg(long)]
    name: Option<String>,
    /// With -d: forget the VM (state and log) when it exits. Foreground runs
    /// always leave nothing behind.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the VM id; see `ps`, `logs`, `exec`,
    /// `stop`, `kill`, `rm`. The VM ends when its command does.
    #[arg(short, long)]
    detach: bool,
    /// Registry (HOST or HOST:PORT) to speak plain HTTP to (loopback ones always are); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Boot cold instead of restoring the image's baked snapshot (and do not bake one).
    #[arg(long)]
    no_snapshot: bool,
    /// Before baking the snapshot, run this shell command in the guest (to
    /// completion), e.g. to warm caches or start a server with `&`. Part of the
    /// snapshot's identity: runs with the same --warmup restore it.
    #[arg(long, value_name = "SHELL COMMAND")]
    warmup: Option<String>,
    /// Before baking the snapshot, wait until the guest listens on this TCP port.
    #[arg(long, value_name = "PORT")]
    wait_port: Option<u16>,
    /// When to pull the image.
    #[arg(long, value_enum, default_value = "missing")]
    pull: PullPolicy,
    /// Directory with the guest kernel (vmlinux) and agent initrd
    /// (initrd-agent.cpio). Default: <dir of this binary>/../guest.
    #[arg(long, env = "SM_GUEST_DIR", value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// Root disk format: erofs, erofs-lz4hc, squashfs-zstd, squashfs-xz, ext4, or
    /// auto: squashfs-zstd, except erofs on kvm_pvm hosts (their emulated guest
    /// kernel cannot run the BMI2 code of the kernel's zstd decompressor).
    #[arg(long, env = "SM_ROOTFS_FORMAT", value_name = "FORMAT", default_value = "auto")]
    rootfs_format: String,
    #[command(flatten)]
    network: crate::network::NetworkArgs,
    /// Print where the time went to stderr.
    #[arg(long)]
    timings: bool,
    /// The image (NAME[:TAG][@DIGEST], oci-layout:DIR[:TAG], oci-archive:FILE,
    /// docker-archive:FILE, or builtin:default — a busybox image built locally,
    /// also used when no image is given), then the command and its arguments
    /// (default: the image's ENTRYPOINT + CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "IMAGE [CMD]")]
    args: Vec<String>,
}

fn guest_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(d);
    }
    let exe = std::env::current_exe().context("locating the supermachine binary")?;
    exe.parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("guest"))
        .context("no default guest directory: set SM_GUEST_DIR or pass --guest-dir")
}

/// `-e KEY` takes the host's value (and is dropped when unset), like docker.
pub(crate) fn env_overrides(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(
            |e| {
                if e.contains('=') {
                    Some(e.clone())
                } else {
                    std::env::var(e).ok().map(|v| format!("{e}={v}"))
                }
            },
        )
        .collect()
}

/// The root disk format for `--rootfs-format` (auto: [`sm_api::default_rootfs_format`]).
fn rootfs_format(arg: &str) -> Result<RootfsFormat> {
    if arg == "auto" {
        Ok(sm_api::default_rootfs_format())
    } else {
        arg.parse().map_err(anyhow::Error::new)
    }
}

/// The image `image_arg` names: from the store, or pulled/imported as `--pull` says.
fn resolve_image(store: &sm_api::oci::Store, image_arg: &str, args: &RunArgs) -> Result<sm_api::oci::ImageInfo> {
    let source = oci::parse_source(image_arg)?;
    let opts = oci::pull_options(&args.insecure_registries);
    if args.pull == PullPolicy::Never {
        let name = source.store_name();
        store
            .image_info(&name)
            .with_context(|| format!("image {name} is not in the local store and --pull never forbids fetching it"))
    } else {
        Ok(oci::resolve(store, &source, &opts, args.pull == PullPolicy::Always)?.0)
    }
}

/// The exit code of a finished process, as a shell reports it.
pub(crate) fn status_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(c) => (c & 0xff) as u8,
        ExitStatus::Signal(n) => (128 + (n & 0x7f)) as u8,
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let t0 = Instant::now();
    let detached_id = std::env::var(detach::DETACHED_ENV).ok().filter(|_| args.detach);
    if args.detach && detached_id.is_none() {
        if args.interactive || args.tty {
            bail!("-d cannot be combined with -i or -t (a detached VM has no terminal); use `supermachine exec` later");
        }
        let image = args.args.first().map_or(sm_api::oci::builtin::DEFAULT_IMAGE, String::as_str);
        return detach::launch(args.name.as_deref(), image, args.args.get(1..).unwrap_or(&[]));
    }
    if let Some(id) = &detached_id {
        detach::handle_stop_signal(id)?;
    }
    let format = rootfs_format(&args.rootfs_format)?;
    let default_args = [sm_api::oci::builtin::DEFAULT_IMAGE.to_string()];
    let (image_arg, cmd) = if args.args.is_empty() {
        (&default_args[0], &[][..])
    } else {
        args.args.split_first().context("missing IMAGE")?
    };
    if image_arg.starts_with('-') {
        bail!("unknown option {image_arg:?} before the image (see `supermachine run --help`)");
    }
    let what = match &args.name {
        Some(n) => format!("{n} ({image_arg})"),
        None => image_arg.clone(),
    };
    let crate::network::NetworkChoice { network, vsock_ports } = args.network.network()?;
    let (volumes, shares) = crate::volumes::mounts(&args.volumes)?;
    let store = oci::open_store()?;
    let image = if image_arg == sm_api::oci::builtin::DEFAULT_IMAGE {
        let rec = sm_api::oci::builtin::default_image(&store).context("building the built-in default image")?;
        store.info_for(&rec).context("reading the built-in default image")?
    } else {
        resolve_image(&store, image_arg, &args)?
    };
    let t_image = t0.elapsed();

    let overrides = RunOverrides {
        entrypoint: args.entrypoint.as_deref().map(sm_api::oci::config::entrypoint_from_cli),
        cmd: cmd.to_vec(),
        env: env_overrides(&args.process.env),
        working_dir: args.process.workdir.clone(),
        user: args.process.user.clone(),
    };
    let name = image.name.clone();
    let image = Image::new(store, image, format).with_context(|| format!("building the root disk of {name}"))?;
    let spec = image.run_spec(&overrides).with_context(|| {
        format!("{name}: nothing to run (the image has no ENTRYPOINT or CMD): give a command after the image")
    })?;
    let t_disk = t0.elapsed();

    let dir = guest_dir(args.guest_dir.clone())?;
    let guest = GuestImage::from_dir(&dir)
        .with_context(|| format!("the guest kernel and agent are needed to run {what} (or set SM_GUEST_DIR)"))?;
    let hv = sm_api::default_hypervisor().context("opening KVM (/dev/kvm must exist and be accessible)")?;
    let mut config = image.vm_config(guest);
    config.vcpus = args.vcpus;
    config.memory_mib = args.memory;
    config.network = network;
    config.volumes = volumes;
    config.shares = shares;
    let bake = BakeOptions {
        warmup: args
            .warmup
            .as_ref()
            .map(|c| ExecRequest { env: spec.env.clone(), ..ExecRequest::new(["/bin/sh", "-c", c.as_str()]) }),
        wait_port: args.wait_port,
        prefetch: spec.argv.first().cloned().into_iter().collect(),
        ..BakeOptions::default()
    };
    if args.no_snapshot && (args.warmup.is_some() || args.wait_port.is_some()) {
        bail!("--warmup and --wait-port prepare the baked snapshot; they do nothing with --no-snapshot");
    }
    let (vm, start) = image
        .start(&*hv, config, (!args.no_snapshot).then_some(&bake))
        .with_context(|| format!("starting the VM for {what}"))?;
    let t_boot = t0.elapsed();
    let vm_start_timings = vm.start_timings();
    // Held until the VM stops: ports published over vsock (--network none).
    let forwards = vsock_ports
        .iter()
        .map(|&p| vm.forward_port(p).with_context(|| format!("publishing {p}")))
        .collect::<Result<Vec<_>>>()?;
    let published: Vec<sm_api::PublishedPort> =
        vm.published_ports().iter().copied().chain(forwards.iter().map(|f| f.port())).collect();
    for port in &published {
        eprintln!("supermachine: published {port}");
    }

    if let Some(id) = &detached_id {
        let ports: Vec<String> = published.iter().map(|p| p.to_string()).collect();
        detach::record_running(id, vm.vsock_path(), &spec.env, &ports)?;
    }
    let req = ExecRequest { tty: args.tty, stdin: args.interactive, ..Image::exec_request(&spec) };
    let client = vm.agent().with_context(|| format!("connecting to the agent of {what}"))?;
    let t_agent = t0.elapsed();
    let mut timeline = None;
    let result = if args.interactive {
        let _raw = if args.tty { tty::RawMode::enable().context("setting the terminal to raw mode")? } else { None };
        client.exec_interactive(&req, std::io::stdin(), sm_api::ExecOutput::terminal())
    } else {
        let mut client = client;
        exec::stream_timed(&mut client, &req).map(|(report, times)| {
            timeline = Some(times);
            report
        })
    };
    let t_exec = t0.elapsed();
    vm.stop();
    if args.timings {
        eprintln!(
            "timings: image {:.2?}, root disk {:.2?} ({}), VM start {:.2?} ({}), command {:.2?}, total {:.2?}",
            t_image,
            t_disk - t_image,
            if image.disk().cached { "cached" } else { "built" },
            t_boot - t_disk,
            start.describe(),
            t_exec - t_boot,
            t0.elapsed()
        );
        if let Some(s) = vm_start_timings {
            eprintln!("{}", crate::timings::describe_start(&s));
        }
        let report = result.as_ref().ok();
        eprintln!("{}", crate::timings::describe_command(t_agent - t_boot, timeline.as_ref(), report));
    }
    let (code, outcome) = match result {
        Ok(report) => {
            let code = status_code(report.status);
            (code, Ok(ExitCode::from(code)))
        }
        Err(e) => {
            let code = e.shell_exit_code().and_then(|c| u8::try_from(c).ok()).unwrap_or(crate::EXIT_RUNTIME_ERROR);
            (code, exec_error(&spec.argv[0], &spec.working_dir, e))
        }
    };
    if let Some(id) = &detached_id {
        if args.rm {
            let _ = std::fs::remove_dir_all(detach::state_root().join(id));
        } else {
            detach::record_exit(id, i32::from(code));
        }
    }
    outcome
}

/// A process that could not start: 127/126 like a shell, else an error (125).
pub(crate) fn exec_error(argv0: &str, cwd: &str, e: ClientError) -> Result<ExitCode> {
    if let Some(code) = e.shell_exit_code() {
        let why = if code == 127 { "not found in the image (check the name and PATH)" } else { "cannot be executed" };
        eprintln!("supermachine: {argv0}: {why}: {e}");
        return Ok(ExitCode::from(code as u8));
    }
    Err(anyhow::Error::new(e).context(format!("running {argv0:?} (working directory {cwd})")))
}
