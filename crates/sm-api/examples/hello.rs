//! Boot a microVM, run a command in it, snapshot it and restore a copy —
//! with sm-api only. Build the guest first (`cargo xtask kernel` and
//! `cargo xtask agent --initrd`), then:
//!
//! ```sh
//! cargo run -p sm-api --example hello
//! ```

use std::path::Path;
use std::time::Instant;

use sm_api::{default_hypervisor, ConsoleOutput, ExecRequest, GuestImage, Vm, VmConfig};

fn main() -> sm_api::Result<()> {
    let hypervisor = default_hypervisor()?;
    let guest = GuestImage::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))?;

    let t = Instant::now();
    let mut vm = Vm::boot(&*hypervisor, VmConfig::new(guest))?;
    println!("booted in {:.1?}", t.elapsed());

    let out = vm.exec(&ExecRequest::new(["/bin/echo", "hello from the guest"]), None)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    let snapshot = std::env::temp_dir().join(format!("sm-hello-{}.snap", std::process::id()));
    vm.snapshot(&snapshot)?;
    let t = Instant::now();
    let copy = Vm::restore(&*hypervisor, &snapshot, ConsoleOutput::Null, &[])?;
    println!("restored in {:.1?}", t.elapsed());
    let out = copy.exec(&ExecRequest::new(["/bin/uname", "-r"]), None)?;
    print!("restored guest runs kernel {}", String::from_utf8_lossy(&out.stdout));
    drop(copy);
    let _ = std::fs::remove_file(&snapshot);
    Ok(())
}
