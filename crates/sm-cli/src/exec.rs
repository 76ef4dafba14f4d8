//! Running the image's process through the guest agent and streaming its
//! output to the terminal as it arrives: without stdin the agent client's
//! [`sm_api::agent::ExecSession`]; with stdin (`-i`)
//! [`sm_api::AgentClient::exec_interactive`].

use std::os::unix::net::UnixStream;

use sm_api::agent::ProtocolError;
use sm_api::agent::{ClientError, ExecEvent, ExitReport};
use sm_api::{AgentClient, ExecOutput, ExecRequest, ExecTimeline};

/// Runs `req` (stdin: /dev/null or an idle pty) and streams its output.
pub fn stream(client: &mut AgentClient<UnixStream>, req: &ExecRequest) -> Result<ExitReport, ClientError> {
    stream_timed(client, req).map(|(report, _)| report)
}

/// [`stream`], also giving the host-side times of the exec.
pub fn stream_timed(
    client: &mut AgentClient<UnixStream>,
    req: &ExecRequest,
) -> Result<(ExitReport, ExecTimeline), ClientError> {
    let req = ExecRequest { stdin: false, ..req.clone() };
    let mut session = client.exec_streaming(&req)?;
    let mut out = ExecOutput::terminal();
    while let Some(event) = session.next_event()? {
        match event {
            ExecEvent::Stdout(d) => out.stdout(&d),
            ExecEvent::Stderr(d) => out.stderr(&d),
            ExecEvent::Exited(report) => return Ok((report, session.timeline())),
        }
    }
    Err(ProtocolError::Closed.into())
}
