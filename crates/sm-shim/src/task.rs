//! The task service containerd calls (ttrpc `containerd.task.v2.Task`): one
//! container per shim.

use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::protos::api::{ProcessInfo, Status as TaskStatus};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim as api;
use containerd_shim::protos::types::empty::Empty;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::container::Container;
use crate::error::ShimError;
use crate::events::Events;
use crate::process::Status;
use crate::stdio::Stdio;

/// The shim's task service.
pub struct TaskService {
    container: Mutex<Option<Arc<Container>>>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    /// A service publishing to `events`; `exit` ends the shim at Shutdown.
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> TaskService {
        TaskService { container: Mutex::new(None), events: Arc::new(events), exit }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Container>>> {
        self.container.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ShimError> {
        match self.slot().as_ref() {
            Some(c) if c.id == id => Ok(Arc::clone(c)),
            _ => Err(ShimError::NotFound(format!("container {id}"))),
        }
    }
}

fn log_err<T>(what: &str, r: Result<T, ShimError>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::warn!("{what}: {e}");
        e.into()
    })
}

impl containerd_shim::Task for TaskService {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        log_err(
            "create",
            (|| {
                if let Some(c) = self.slot().as_ref() {
                    return Err(ShimError::AlreadyExists(format!("container {} (this shim runs one)", c.id)));
                }
                if !req.checkpoint.is_empty() {
                    return Err(ShimError::Unimplemented("creating a task from a checkpoint"));
                }
                let container = Arc::new(Container::create(&req)?);
                *self.slot() = Some(container);
                self.events.publish(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                Ok(api::CreateTaskResponse::default())
            })(),
        )
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        log_err(
            "start",
            (|| {
                let container = self.container(&req.id)?;
                let pid = container.start(&req.exec_id, &self.events)?;
                if req.exec_id.is_empty() {
                    self.events.publish(TaskStart { container_id: req.id.clone(), pid, ..Default::default() });
                } else {
                    self.events.publish(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid,
                        ..Default::default()
                    });
                }
                Ok(api::StartResponse { pid, ..Default::default() })
            })(),
        )
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        log_err(
            "state",
            (|| {
                let container = self.container(&req.id)?;
                let process = container.process(&req.exec_id)?;
                let (status, pid, exit) = process.status();
                let status = match status {
                    Status::Created => TaskStatus::CREATED,
                    Status::Running => TaskStatus::RUNNING,
                    Status::Stopped => TaskStatus::STOPPED,
                };
                Ok(api::StateResponse {
                    id: req.id.clone(),
                    bundle: container.bundle.to_string_lossy().into_owned(),
                    pid,
                    status: status.into(),
                    stdin: process.stdio.stdin.clone(),
                    stdout: process.stdio.stdout.clone(),
                    stderr: process.stdio.stderr.clone(),
                    terminal: process.stdio.terminal,
                    exit_status: exit.as_ref().map_or(0, |e| e.status),
                    exited_at: exit.map(|e| e.at).into(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                })
            })(),
        )
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        log_err(
            "kill",
            (|| {
                self.container(&req.id)?.kill(&req.exec_id, req.signal, req.all)?;
                Ok(Empty::default())
            })(),
        )
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        log_err(
            "exec",
            (|| {
                let container = self.container(&req.id)?;
                let spec = req.spec.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
                let process: oci_spec::runtime::Process = serde_json::from_slice(spec).map_err(|e| {
                    ShimError::InvalidArgument(format!("the exec's process spec is not an OCI process: {e}"))
                })?;
                let stdio = Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                };
                container.add_exec(&req.exec_id, &process, stdio)?;
                self.events.publish(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                });
                Ok(Empty::default())
            })(),
        )
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        log_err(
            "wait",
            (|| {
                let process = self.container(&req.id)?.process(&req.exec_id)?;
                let exit = process.wait();
                Ok(api::WaitResponse {
                    exit_status: exit.status,
                    exited_at: Some(exit.at).into(),
                    ..Default::default()
                })
            })(),
        )
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        log_err(
            "delete",
            (|| {
                let container = self.container(&req.id)?;
                let (pid, exit) = if req.exec_id.is_empty() {
                    let ended = container.delete()?;
                    *self.slot() = None;
                    self.events.publish(TaskDelete {
                        container_id: req.id.clone(),
                        pid: ended.0,
                        exit_status: ended.1.status,
                        exited_at: Some(ended.1.at.clone()).into(),
                        ..Default::default()
                    });
                    ended
                } else {
                    container.delete_exec(&req.exec_id)?
                };
                Ok(api::DeleteResponse {
                    pid,
                    exit_status: exit.status,
                    exited_at: Some(exit.at).into(),
                    ..Default::default()
                })
            })(),
        )
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        log_err(
            "pids",
            (|| {
                let processes = self
                    .container(&req.id)?
                    .pids()
                    .into_iter()
                    .map(|pid| ProcessInfo { pid, ..Default::default() })
                    .collect();
                Ok(api::PidsResponse { processes, ..Default::default() })
            })(),
        )
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        log_err(
            "close_io",
            (|| {
                if req.stdin {
                    self.container(&req.id)?.process(&req.exec_id)?.close_stdin();
                }
                Ok(Empty::default())
            })(),
        )
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        log_err(
            "resize_pty",
            (|| {
                let process = self.container(&req.id)?.process(&req.exec_id)?;
                let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
                process.resize(clamp(req.height), clamp(req.width))?;
                Ok(Empty::default())
            })(),
        )
    }

    fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented("pause").into())
    }

    fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented("resume").into())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented("checkpoint").into())
    }

    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unimplemented("updating resources").into())
    }

    fn stats(&self, _ctx: &TtrpcContext, _req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        Err(ShimError::Unimplemented("stats").into())
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.process("").map(|p| p.status().1).unwrap_or(0)).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after Delete; a shim with a container keeps serving it.
        if self.slot().is_none() {
            self.exit.signal();
        }
        Ok(Empty::default())
    }
}
