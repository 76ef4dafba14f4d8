//! `run --timings`: the restored start and the command, step by step.

use std::time::Duration;

use sm_api::agent::ExitReport;
use sm_api::{ExecTimeline, StartTimings};

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn us(micros: u64) -> String {
    ms(Duration::from_micros(micros))
}

/// The steps of a restore, each from its start.
pub fn describe_start(s: &StartTimings) -> String {
    format!(
        "timings: VM start: snapshot restored {}, vCPUs running {}, agent connected {} ({} attempt{}), \
         clock + entropy set {}, mounts {}; {} guest round trips",
        ms(s.restored),
        ms(s.resumed),
        ms(s.agent_connected),
        s.attempts,
        if s.attempts == 1 { "" } else { "s" },
        ms(s.refreshed),
        ms(s.mounted),
        s.round_trips,
    )
}

/// The command: host-side times from the request sent, and what the agent
/// measured in the guest.
pub fn describe_command(connect: Duration, timeline: Option<&ExecTimeline>, report: Option<&ExitReport>) -> String {
    let mut text = format!("timings: command: agent connection {}", ms(connect));
    if let Some(t) = timeline {
        let first = t.first_output.map_or_else(|| "none".to_string(), ms);
        text += &format!(
            ", exec sent -> started {}, first output {first}, exited {} (1 guest round trip + output)",
            ms(t.started),
            ms(t.exited)
        );
    }
    if let Some(r) = report {
        let c = &r.cost;
        text += &format!(
            "\ntimings: in the guest: agent spawn {} (its kernel time {}), process {} (user {}, kernel {}, \
             {} page faults, {} from disk), output drained and reported {}",
            us(c.spawn_us),
            us(c.agent_system_us),
            us(r.duration_us),
            us(c.user_us),
            us(c.system_us),
            c.minor_faults + c.major_faults,
            c.major_faults,
            us(c.finish_us),
        );
    }
    text
}
