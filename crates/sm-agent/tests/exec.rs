//! Exec end to end: the real agent binary on a unix socket, driven by the client.

mod common;

use std::time::{Duration, Instant};

use common::{pattern, running_as_root, Agent};
use sm_agent::protocol::OUTPUT_CHUNK;
use sm_agent::{ErrorKind, ExecEvent, ExecRequest, ExitStatus};

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[test]
fn exit_codes_and_spawn_failures() {
    let agent = Agent::start();
    let mut c = agent.client();
    assert_eq!(c.exec(&ExecRequest::new(["true"]), None).expect("true").status, ExitStatus::Code(0));
    assert_eq!(c.exec(&ExecRequest::new(["false"]), None).expect("false").status, ExitStatus::Code(1));
    assert_eq!(c.exec(&sh("exit 42"), None).expect("exit 42").status, ExitStatus::Code(42));

    let missing = c.exec(&ExecRequest::new(["sm-agent-test-no-such-command"]), None).expect_err("missing command");
    assert_eq!(missing.agent_kind(), Some(ErrorKind::CommandNotFound));
    assert_eq!(missing.shell_exit_code(), Some(127));

    // A file without execute permission, by path and via PATH.
    let script = agent.dir.file("not-executable.sh");
    c.write_file(&script, 0o644, b"#!/bin/sh\necho hi\n").expect("write script");
    let by_path = c.exec(&ExecRequest::new([script.as_str()]), None).expect_err("not executable");
    assert_eq!(by_path.agent_kind(), Some(ErrorKind::NotExecutable));
    assert_eq!(by_path.shell_exit_code(), Some(126));
    let via_path = c
        .exec(&ExecRequest::new(["not-executable.sh"]).env("PATH", agent.dir.path().to_str().expect("utf-8")), None)
        .expect_err("not executable via PATH");
    assert_eq!(via_path.shell_exit_code(), Some(126));

    // Once executable it runs, with argv[0] as given.
    c.write_file(&script, 0o755, b"#!/bin/sh\necho \"$0 ran\"\n").expect("rewrite script");
    let ran = c.exec(&ExecRequest::new([script.as_str()]), None).expect("runs");
    assert_eq!(ran.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), format!("{script} ran\n"));

    // The connection survives all of that.
    c.ping().expect("ping after failures");
}

#[test]
fn a_process_killed_by_a_signal_reports_the_signal() {
    let agent = Agent::start();
    let mut c = agent.client();
    let out = c.exec(&sh("kill -9 $$"), None).expect("exec");
    assert_eq!(out.status, ExitStatus::Signal(9));
    assert_eq!(out.status.shell_code(), 137);
    assert!(!out.timed_out);
}

#[test]
fn signals_from_the_host_are_delivered() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut session = c.exec_streaming(&sh("echo ready; exec sleep 30")).expect("started");
    assert_eq!(session.next_event().expect("event"), Some(ExecEvent::Stdout(b"ready\n".to_vec())));
    session.signal(libc::SIGTERM).expect("signal");
    let outcome = session.wait().expect("exit");
    assert_eq!(outcome.status, ExitStatus::Signal(libc::SIGTERM));
    assert!(outcome.duration < Duration::from_secs(20), "{:?}", outcome.duration);
}

#[test]
fn ten_mib_of_stdout_streams_in_chunks() {
    const TOTAL: usize = 10 << 20;
    let agent = Agent::start();
    let mut c = agent.client();
    let req = ExecRequest::new(["head", "-c", &TOTAL.to_string(), "/dev/zero"]);
    let mut session = c.exec_streaming(&req).expect("started");
    let (mut bytes, mut chunks, mut largest) = (0usize, 0usize, 0usize);
    let report = loop {
        match session.next_event().expect("event") {
            Some(ExecEvent::Stdout(d)) => {
                assert!(d.iter().all(|&b| b == 0), "data from /dev/zero");
                bytes += d.len();
                chunks += 1;
                largest = largest.max(d.len());
            }
            Some(ExecEvent::Stderr(e)) => panic!("stderr: {}", String::from_utf8_lossy(&e)),
            Some(ExecEvent::Exited(r)) => break r,
            None => panic!("session ended without Exited"),
        }
    };
    assert_eq!(report.status, ExitStatus::Code(0));
    assert_eq!(bytes, TOTAL);
    assert!(largest <= OUTPUT_CHUNK, "chunk of {largest} bytes");
    assert!(chunks >= TOTAL / OUTPUT_CHUNK, "only {chunks} chunks");
}

#[test]
fn output_arrives_while_the_process_still_runs() {
    let agent = Agent::start();
    let mut c = agent.client();
    let mut session = c.exec_streaming(&sh("echo first; echo oops >&2; sleep 1; echo second")).expect("started");
    let mut first_at = None;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let exited_at = loop {
        match session.next_event().expect("event") {
            Some(ExecEvent::Stdout(d)) => {
                first_at.get_or_insert_with(Instant::now);
                stdout.extend(d);
            }
            Some(ExecEvent::Stderr(d)) => stderr.extend(d),
            Some(ExecEvent::Exited(_)) => break Instant::now(),
            None => panic!("no Exited"),
        }
    };
    let first_at = first_at.expect("some stdout");
    assert!(
        exited_at - first_at >= Duration::from_millis(800),
        "first output only {:?} before the exit: it was buffered",
        exited_at - first_at
    );
    assert_eq!(stdout, b"first\nsecond\n");
    assert_eq!(stderr, b"oops\n");
}

#[test]
fn stdin_is_piped_with_flow_control() {
    let agent = Agent::start();
    let mut c = agent.client();
    // Several times the agent's stdin window, so credit must cycle.
    let input = pattern(3 << 20, 11);
    let out = c.exec(&ExecRequest::new(["cat"]), Some(&input)).expect("cat");
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat echoed different bytes");

    // Interleaved by hand: each line comes back before the next is sent.
    let mut session = c.exec_streaming(&ExecRequest { stdin: true, ..ExecRequest::new(["cat"]) }).expect("started");
    for i in 0..3 {
        let line = format!("line {i}\n");
        session.send_stdin(line.as_bytes()).expect("stdin");
        let mut echoed = Vec::new();
        while echoed.len() < line.len() {
            match session.next_event().expect("event") {
                Some(ExecEvent::Stdout(d)) => echoed.extend(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(echoed, line.as_bytes());
    }
    session.close_stdin().expect("close");
    assert_eq!(session.wait().expect("exit").status, ExitStatus::Code(0));

    // Without stdin the process reads EOF at once.
    let no_stdin = c.exec(&sh("cat; echo done"), None).expect("no stdin");
    assert_eq!(no_stdin.stdout, b"done\n");
}

#[test]
fn env_and_cwd_are_applied_and_nothing_leaks() {
    let agent = Agent::start();
    let mut c = agent.client();
    let dir = agent.dir.path().to_str().expect("utf-8").to_owned();
    let req = sh("printf '%s|%s|%s|%s' \"$GREETING\" \"$(pwd)\" \"${SM_AGENT_TEST_SECRET:-unset}\" \"$EMPTY\"")
        .env("GREETING", "hello world")
        .env("EMPTY", "")
        .cwd(dir.clone());
    let out = c.exec(&req, None).expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("hello world|{dir}|unset|"));
    // Defaults: a PATH that finds the usual tools, HOME for root, cwd "/".
    let defaults =
        c.exec(&sh("printf '%s|%s' \"$(pwd)\" \"$HOME\"; command -v sh >/dev/null"), None).expect("defaults");
    assert_eq!(defaults.status, ExitStatus::Code(0));
    let home = if running_as_root() { "/root" } else { "" };
    let text = String::from_utf8_lossy(&defaults.stdout).into_owned();
    assert!(text.starts_with("/|"), "{text}");
    if running_as_root() {
        assert_eq!(text, format!("/|{home}"));
    }
    // A missing working directory is an error, not a spawn in "/".
    let err = c.exec(&ExecRequest::new(["true"]).cwd(agent.dir.file("missing")), None).expect_err("missing cwd");
    assert_eq!(err.agent_kind(), Some(ErrorKind::NotFound));
}

#[test]
fn timeout_kills_the_process_group_and_reports_it() {
    let agent = Agent::start();
    let mut c = agent.client();
    let started = Instant::now();
    let out = c.exec(&sh("sleep 30 & echo $!; wait").timeout(Duration::from_millis(500)), None).expect("exec");
    let elapsed = started.elapsed();
    assert!(out.timed_out);
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(out.duration >= Duration::from_millis(500), "{:?}", out.duration);
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    // The background sleep was in the group: killed too (and reaped).
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("background pid");
    wait_until_gone(pid);

    // A process that finishes in time is not marked.
    let quick = c.exec(&ExecRequest::new(["true"]).timeout(Duration::from_secs(30)), None).expect("quick");
    assert!(!quick.timed_out);
    assert_eq!(quick.status, ExitStatus::Code(0));
}

/// Waits (up to 10 s) until `pid` no longer exists — neither running nor a zombie.
fn wait_until_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stat = format!("/proc/{pid}/stat");
    while std::path::Path::new(&stat).exists() {
        let state = std::fs::read_to_string(&stat).unwrap_or_default();
        assert!(Instant::now() < deadline, "pid {pid} still exists after 10 s: {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn orphans_are_reaped_and_exec_statuses_are_not_stolen() {
    let agent = Agent::start();
    let mut c = agent.client();
    // The shell exits at once; its background child is orphaned to the agent.
    let started = Instant::now();
    let out = c.exec(&sh("sleep 1 >/dev/null 2>&1 & echo $!"), None).expect("exec");
    assert_eq!(out.status, ExitStatus::Code(0));
    let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("orphan pid");
    let status = std::fs::read_to_string(format!("/proc/{orphan}/status")).unwrap_or_default();
    if started.elapsed() < Duration::from_millis(800) {
        let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(str::trim).unwrap_or("gone");
        assert_eq!(ppid, agent.pid().to_string(), "orphan re-parented to the agent");
    }
    // While orphans come and go, every exec still gets its own status.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mut c = agent.client();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let code = (t * 10 + i) % 200;
                    let out = c.exec(&sh(&format!("sleep 0.1 & exit {code}")), None).expect("exec");
                    assert_eq!(out.status, ExitStatus::Code(code));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("exec thread");
    }
    wait_until_gone(orphan);
}

#[test]
fn a_background_process_holding_stdout_does_not_block_the_exit() {
    let agent = Agent::start();
    let mut c = agent.client();
    let started = Instant::now();
    let out = c.exec(&sh("sleep 5 & echo started"), None).expect("exec");
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout, b"started\n");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "Exited waited for the background sleep: {:?}",
        started.elapsed()
    );
    // The connection is in sync for the next request.
    c.ping().expect("ping");
}

#[test]
fn eight_concurrent_execs_on_eight_connections() {
    let agent = Agent::start();
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let mut c = agent.client();
            std::thread::spawn(move || {
                let req = ExecRequest::new(["sh", "-c", "sleep 1; echo \"$1\"", "sh", &i.to_string()]);
                let out = c.exec(&req, None).expect("exec");
                assert_eq!(out.status, ExitStatus::Code(0));
                assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
                out.pid
            })
        })
        .collect();
    let mut pids: Vec<i32> = threads.into_iter().map(|t| t.join().expect("thread")).collect();
    let elapsed = started.elapsed();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 8, "distinct processes");
    // In sequence they would take at least 8 s.
    assert!(elapsed < Duration::from_secs(6), "not concurrent: {elapsed:?}");
}

#[test]
fn tty_mode_runs_on_a_pseudo_terminal() {
    let agent = Agent::start();
    let mut c = agent.client();
    let out = c.exec(&ExecRequest::new(["tty"]).tty(true), None).expect("tty");
    assert_eq!(out.status, ExitStatus::Code(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(out.stderr.is_empty(), "stderr merges into the pty");

    let checks = c
        .exec(&sh("test -t 0 && test -t 1 && test -t 2 && echo \"$TERM\" && echo err >&2").tty(true), None)
        .expect("checks");
    assert_eq!(checks.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&checks.stdout), "xterm\r\nerr\r\n");

    // Input through the pty (echoed by the line discipline), ended by ^D.
    let cat = c.exec(&ExecRequest::new(["cat"]).tty(true), Some(b"hello tty\n")).expect("cat");
    assert_eq!(cat.status, ExitStatus::Code(0));
    let text = String::from_utf8_lossy(&cat.stdout);
    assert_eq!(text.matches("hello tty").count(), 2, "{text:?}");

    // Without a tty the same checks fail.
    let piped = c.exec(&sh("test -t 1"), None).expect("piped");
    assert_eq!(piped.status, ExitStatus::Code(1));
}

#[test]
fn user_selection() {
    let agent = Agent::start();
    let mut c = agent.client();
    let req = sh("echo $(id -u):$(id -g)").user("1234:5678");
    if running_as_root() {
        let out = c.exec(&req, None).expect("as 1234:5678");
        assert_eq!(out.stdout, b"1234:5678\n");
        let nobody = c.exec(&sh("id -un").user("nobody"), None).expect("as nobody");
        assert_eq!(nobody.stdout, b"nobody\n");
    } else {
        let err = c.exec(&req, None).expect_err("no privileges to switch user");
        assert_eq!(err.agent_kind(), Some(ErrorKind::PermissionDenied));
    }
    let unknown = c.exec(&ExecRequest::new(["true"]).user("sm-agent-no-such-user"), None).expect_err("unknown user");
    assert_eq!(unknown.agent_kind(), Some(ErrorKind::InvalidRequest));
}

#[test]
fn children_start_clean_stdio_only_no_blocked_or_ignored_signals() {
    let agent = Agent::start();
    let mut c = agent.client();
    // Keep a second connection open so the agent holds extra descriptors.
    let _other = agent.client();
    // ls lists its own directory handle (3) besides the inherited fds.
    let fds = c.exec(&ExecRequest::new(["ls", "/proc/self/fd"]), None).expect("ls");
    assert_eq!(String::from_utf8_lossy(&fds.stdout), "0\n1\n2\n3\n");
    let status = c.exec(&ExecRequest::new(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]), None).expect("grep");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
    // Its own process group (timeouts kill the group), in the agent's session.
    let ids = c.exec(&sh("echo $$ $(cut -d' ' -f5 /proc/$$/stat)"), None).expect("pgid");
    let text = String::from_utf8_lossy(&ids.stdout).into_owned();
    let mut parts = text.split_whitespace();
    assert_eq!(parts.next(), parts.next(), "pid == pgid in {text:?}");
}

#[test]
fn an_exec_reports_what_it_cost_in_the_guest_and_when_the_host_saw_it() {
    let agent = Agent::start();
    let mut c = agent.client();
    // Busy in user mode for a while, touching fresh memory, then printing.
    let out = c.exec(&sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done"), None).expect("exec");
    assert_eq!(out.stdout, b"done\n");
    let cost = out.cost;
    assert!(cost.spawn_us > 0, "{cost:?}");
    assert!(cost.user_us + cost.system_us > 0, "the shell's CPU time is reported: {cost:?}");
    assert!(cost.minor_faults > 0, "an exec faults its pages in: {cost:?}");
    let t = out.timeline;
    let first = t.first_output.expect("it printed");
    assert!(t.started <= first && first <= t.exited, "{t:?}");
    // A silent command has no first output.
    let quiet = c.exec(&ExecRequest::new(["true"]), None).expect("true");
    assert_eq!(quiet.timeline.first_output, None);
}

#[test]
fn prefetch_reads_programs_and_skips_what_is_missing() {
    let agent = Agent::start();
    let mut c = agent.client();
    let programs = ["sh".to_string(), "/no/such/program".to_string(), String::new()];
    c.prefetch(&programs).expect("prefetch answers Ok, missing programs skipped");
    c.ping().expect("the connection goes on");
}

#[test]
fn collected_output_past_the_limit_is_an_error_at_once_and_the_connection_is_dropped() {
    let agent = Agent::start();
    let limit = 1 << 20;
    // Output up to the limit arrives whole.
    let mut c = agent.client();
    let exact = c.exec_limited(&sh("head -c 1048576 /dev/zero"), None, limit).expect("exactly the limit");
    assert_eq!(exact.stdout.len(), limit);
    // Endless output from a pipeline (killing the shell alone would not end
    // it): the error comes at once, and the connection is out of sync.
    let started = Instant::now();
    let err = c.exec_limited(&sh("cat /dev/zero | cat"), None, limit).expect_err("over the limit");
    assert!(matches!(err, sm_agent::ClientError::OutputTooLarge { limit: l } if l == limit), "{err}");
    assert!(err.to_string().contains("exec_streaming"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(c.ping(), Err(sm_agent::ClientError::Desynchronized)));
    drop(c);
    // Output a process writes while it does not read its stdin is bounded too.
    let mut c = agent.client();
    let stdin = vec![b'x'; 8 << 20];
    let err = c.exec_limited(&sh("cat /dev/zero"), Some(&stdin), limit).expect_err("over the limit");
    assert!(matches!(err, sm_agent::ClientError::OutputTooLarge { .. }), "{err}");
    drop(c);
    // A leader that is gone (reaped) before the limit is reached: what is
    // left of its group is killed all the same.
    let mut c = agent.client();
    let err = c.exec_limited(&sh("cat /dev/zero & exit 0"), None, limit).expect_err("over the limit");
    assert!(matches!(err, sm_agent::ClientError::OutputTooLarge { .. }), "{err}");
    drop(c);
    // Dropping the connections made the agent kill the three process groups.
    let mut c = agent.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ps = c.exec(&sh("ps -o pid,args 2>/dev/null || ps"), None).expect("ps");
        let left = String::from_utf8_lossy(&ps.stdout).lines().filter(|l| l.contains("cat /dev/zero")).count();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "processes left:\n{}", String::from_utf8_lossy(&ps.stdout));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sm_agent::DEFAULT_OUTPUT_LIMIT, 256 << 20);
}
