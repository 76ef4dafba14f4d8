//! The task service containerd calls (ttrpc `containerd.task.v2.Task`): one
//! container per shim. Each request is a method returning the shim's own
//! error; the trait implementation maps it to a ttrpc status (and logs it).

use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::protos::api::{ProcessInfo, Status as TaskStatus};
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExecAdded, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim as api;
use containerd_shim::protos::types::empty::Empty;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};

use crate::container::Container;
use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::process::Status;
use crate::stdio::Stdio;

/// The shim's one container, through its life.
enum Slot {
    Empty,
    /// Create is booting it (no lock held meanwhile).
    Creating(String),
    Ready(Arc<Container>),
}

/// The shim's task service.
pub struct TaskService {
    slot: Mutex<Slot>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    /// A service publishing to `events`; `exit` ends the shim at Shutdown.
    pub fn new(events: Events, exit: Arc<ExitSignal>) -> TaskService {
        TaskService { slot: Mutex::new(Slot::Empty), events: Arc::new(events), exit }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        match &*self.slot() {
            Slot::Ready(c) if c.id == id => Ok(Arc::clone(c)),
            Slot::Creating(c) if c == id => {
                Err(ShimError::FailedPrecondition(format!("container {id} is still being created")))
            }
            _ => Err(ShimError::NotFound(format!("container {id}"))),
        }
    }

    fn create(&self, req: &api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented("creating a task from a checkpoint"));
        }
        {
            let mut slot = self.slot();
            let taken = match &*slot {
                Slot::Empty => None,
                Slot::Creating(id) => Some(id.clone()),
                Slot::Ready(c) => Some(c.id.clone()),
            };
            if let Some(id) = taken {
                return Err(ShimError::AlreadyExists(format!("container {id} (this shim runs one)")));
            }
            *slot = Slot::Creating(req.id.clone());
        }
        let created = Container::create(req);
        *self.slot() = match &created {
            Ok(c) => Slot::Ready(Arc::clone(c)),
            Err(_) => Slot::Empty,
        };
        created?;
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
    }

    fn start(&self, req: &api::StartRequest) -> Result<api::StartResponse> {
        let pid = self.container(&req.id)?.start(&req.exec_id, &self.events)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let (status, pid, exit) = process.status();
        let status = match status {
            Status::Created | Status::Starting => TaskStatus::CREATED,
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
    }

    fn exec(&self, req: &api::ExecProcessRequest) -> Result<Empty> {
        let container = self.container(&req.id)?;
        let spec = req.spec.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
        let process: oci_spec::runtime::Process = serde_json::from_slice(spec)
            .map_err(|e| ShimError::InvalidArgument(format!("the exec's process spec is not an OCI process: {e}")))?;
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
    }

    fn wait(&self, req: &api::WaitRequest) -> Result<api::WaitResponse> {
        let exit = self.container(&req.id)?.process(&req.exec_id)?.wait();
        Ok(api::WaitResponse { exit_status: exit.status, exited_at: Some(exit.at).into(), ..Default::default() })
    }

    fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let container = self.container(&req.id)?;
        let (pid, exit) = if req.exec_id.is_empty() {
            let (pid, exit) = container.delete()?;
            let mut slot = self.slot();
            if matches!(&*slot, Slot::Ready(c) if Arc::ptr_eq(c, &container)) {
                *slot = Slot::Empty;
            }
            drop(slot);
            self.events.publish(TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: Some(exit.at.clone()).into(),
                ..Default::default()
            });
            (pid, exit)
        } else {
            container.delete_exec(&req.exec_id)?
        };
        Ok(api::DeleteResponse { pid, exit_status: exit.status, exited_at: Some(exit.at).into(), ..Default::default() })
    }

    fn pids(&self, req: &api::PidsRequest) -> Result<api::PidsResponse> {
        let processes =
            self.container(&req.id)?.pids().into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn resize_pty(&self, req: &api::ResizePtyRequest) -> Result<Empty> {
        let process = self.container(&req.id)?.process(&req.exec_id)?;
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        process.resize(clamp(req.height), clamp(req.width))?;
        Ok(Empty::default())
    }
}

/// A request's result as ttrpc wants it; failures logged.
fn answer<T>(what: &str, r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        tracing::warn!("{what}: {e}");
        e.into()
    })
}

impl containerd_shim::Task for TaskService {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        answer("create", TaskService::create(self, &req))
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        answer("start", TaskService::start(self, &req))
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        answer("state", TaskService::state(self, &req))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let killed = self.container(&req.id).and_then(|c| c.kill(&req.exec_id, req.signal, req.all, &self.events));
        answer("kill", killed.map(|()| Empty::default()))
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        answer("exec", TaskService::exec(self, &req))
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        answer("wait", TaskService::wait(self, &req))
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        answer("delete", TaskService::delete(self, &req))
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        answer("pids", TaskService::pids(self, &req))
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let process = self.container(&req.id).and_then(|c| c.process(&req.exec_id));
        answer(
            "close_io",
            process.map(|p| {
                if req.stdin {
                    p.close_stdin();
                }
                Empty::default()
            }),
        )
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        answer("resize_pty", TaskService::resize_pty(self, &req))
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

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let stats = self.container(&req.id).and_then(|c| crate::stats::pack(&c.metrics()?));
        answer("stats", stats.map(|s| api::StatsResponse { stats: MessageField::some(s), ..Default::default() }))
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).ok().and_then(|c| c.process("").ok()).map_or(0, |p| p.status().1);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after Delete; a shim with a container (or one
        // being created) keeps serving it.
        if matches!(*self.slot(), Slot::Empty) {
            self.exit.signal();
        }
        Ok(Empty::default())
    }
}
