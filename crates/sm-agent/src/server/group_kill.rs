//! Killing what is left of an exec's process group after its leader was
//! reaped (a pipeline behind `sh -c`, a daemonised child): the agent no
//! longer holds the leader, but the group id cannot have been given to
//! anything else while a member of the group lives (Linux keeps a pid number
//! in use while it names a live process group), so every process whose
//! `/proc/<pid>/stat` shows that group is one of the exec's.

use std::path::Path;

/// The process group in a `/proc/<pid>/stat` line (the field after the
/// state and the parent, past the command's closing parenthesis, which may
/// itself hold spaces and parentheses).
fn stat_pgrp(stat: &str) -> Option<libc::pid_t> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// Sends `signo` to every process of group `pgid` found under `proc_root`
/// (normally `/proc`), except the caller; returns how many were signalled.
pub(crate) fn signal_group_members(proc_root: &Path, pgid: libc::pid_t, signo: i32) -> usize {
    if pgid <= 1 {
        return 0;
    }
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let Ok(entries) = std::fs::read_dir(proc_root) else { return 0 };
    let mut signalled = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        if stat_pgrp(&stat) != Some(pgid) {
            continue;
        }
        // SAFETY: kill takes plain integers; `pid` was a member of the group
        // a moment ago (the same window as any kill by pid).
        if unsafe { libc::kill(pid, signo) } == 0 {
            signalled += 1;
        }
    }
    signalled
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_group_field_is_read_past_a_command_with_spaces_and_parentheses() {
        assert_eq!(stat_pgrp("42 (sleep) S 1 42 42 0 -1"), Some(42));
        assert_eq!(stat_pgrp("77 (a (b) c) R 5 70 70 0"), Some(70));
        assert_eq!(stat_pgrp("garbage"), None);
    }

    #[test]
    fn members_left_after_the_leader_was_reaped_are_killed_and_only_they() {
        // A leader in a group of its own starts two background sleeps and
        // exits; the sleeps stay in its group.
        let mut leader = Command::new("/bin/sh")
            .args(["-c", "sleep 60 >/dev/null 2>&1 & sleep 60 >/dev/null 2>&1 &"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = leader.id() as libc::pid_t;
        // Other tests of this binary run the agent's reaper, which reaps any
        // child of the process (as the guest's PID 1 must): the leader may be
        // reaped by it rather than here (ECHILD).
        let t = Instant::now();
        while !matches!(leader.try_wait(), Ok(Some(_)) | Err(_)) {
            assert!(t.elapsed() < Duration::from_secs(10), "the leader did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A bystander outside the group survives.
        let mut bystander = Command::new("/bin/sleep").arg("60").spawn().unwrap();
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|s| stat_pgrp(s) == Some(pgid) && !s.contains(" Z "))
                .count()
        };
        assert_eq!(members(), 2, "the two sleeps outlive their leader");
        assert_eq!(signal_group_members(Path::new("/proc"), pgid, libc::SIGKILL), 2);
        let t = Instant::now();
        while members() > 0 {
            assert!(t.elapsed() < Duration::from_secs(10), "members still alive");
            std::thread::sleep(Duration::from_millis(10));
        }
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", bystander.id()));
        assert!(alive.is_ok_and(|s| !s.contains(" Z ")), "a process of another group is untouched");
        bystander.kill().unwrap();
        let _ = bystander.wait(); // maybe reaped by the agent's reaper (see above)
        assert_eq!(signal_group_members(Path::new("/proc"), 1, libc::SIGKILL), 0, "never init's group");
    }
}
