//! The task service containerd calls (ttrpc `containerd.task.v2.Task`): the
//! shim's containers (one, or with a warm pool all of a namespace's). Each
//! request is a method returning the shim's own error; the trait
//! implementation maps it to a ttrpc status (and logs it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

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
use crate::warm::WarmPools;

/// A container of the shim, through its life.
enum Slot {
    /// Create is booting it (no lock held meanwhile).
    Creating,
    Ready(Arc<Container>),
}

/// The shim's containers, and whether it is closing.
pub struct Containers {
    slots: HashMap<String, Slot>,
    /// The shim is ending (its socket is gone): no container is created.
    closing: bool,
    /// The last request that may precede a Create (a Create, a Connect).
    last_activity: Instant,
}

impl Containers {
    /// Whether no container is created or being created.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// When a request last came that may precede a Create.
    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    /// Marks the shim closing: every later Create and Connect is refused.
    pub fn close(&mut self) {
        self.closing = true;
    }
}

/// The shim's task service.
pub struct TaskService {
    containers: Arc<Mutex<Containers>>,
    events: Arc<Events>,
    exit: Arc<ExitSignal>,
    warm: Option<Arc<WarmPools>>,
    /// The shim's socket (removed when a shim with a warm pool ends).
    socket: PathBuf,
    /// With a warm pool: started at the first Shutdown, ends the shim once
    /// it has no containers and no warm VMs.
    linger: std::sync::Once,
}

impl TaskService {
    /// A service publishing to `events`; `exit` ends the shim after
    /// Shutdown (at once, or with `warm` once its VMs are gone).
    pub fn new(events: Events, exit: Arc<ExitSignal>, warm: Option<Arc<WarmPools>>, socket: PathBuf) -> TaskService {
        let containers = Containers { slots: HashMap::new(), closing: false, last_activity: Instant::now() };
        TaskService {
            containers: Arc::new(Mutex::new(containers)),
            events: Arc::new(events),
            exit,
            warm,
            socket,
            linger: std::sync::Once::new(),
        }
    }

    fn containers(&self) -> MutexGuard<'_, Containers> {
        lock(&self.containers)
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        match self.containers().slots.get(id) {
            Some(Slot::Ready(c)) => Ok(Arc::clone(c)),
            Some(Slot::Creating) => {
                Err(ShimError::FailedPrecondition(format!("container {id} is still being created")))
            }
            None => Err(ShimError::NotFound(format!("container {id}"))),
        }
    }

    fn create(&self, req: &api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented("creating a task from a checkpoint"));
        }
        {
            let mut containers = self.containers();
            if containers.closing {
                return Err(ShimError::Unavailable(
                    "the warm pool's shim is ending (it was idle): run the container again, a new shim starts".into(),
                ));
            }
            if containers.slots.contains_key(&req.id) {
                return Err(ShimError::AlreadyExists(format!("container {}", req.id)));
            }
            if self.warm.is_none() && !containers.slots.is_empty() {
                return Err(ShimError::AlreadyExists("a container (without a warm pool a shim runs one)".into()));
            }
            containers.slots.insert(req.id.clone(), Slot::Creating);
            containers.last_activity = Instant::now();
        }
        let created = Container::create(req, self.warm.as_deref());
        {
            let mut containers = self.containers();
            match &created {
                Ok(c) => containers.slots.insert(req.id.clone(), Slot::Ready(Arc::clone(c))),
                Err(_) => containers.slots.remove(&req.id),
            };
            containers.last_activity = Instant::now();
        }
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

    /// Connect (containerd's, or a `start` of this binary about to hand
    /// out this shim's address): refused once the shim is closing, else it
    /// puts the shim's end off.
    fn connect(&self, req: &api::ConnectRequest) -> Result<api::ConnectResponse> {
        {
            let mut containers = self.containers();
            if containers.closing {
                return Err(ShimError::Unavailable("this shim is ending".into()));
            }
            containers.last_activity = Instant::now();
        }
        let task_pid = self.container(&req.id).ok().and_then(|c| c.process("").ok()).map_or(0, |p| p.status().1);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// After containerd's Shutdown: a shim without a pool and without
    /// containers ends now; one with a pool ends once it has neither
    /// containers nor warm VMs (see [`crate::linger`]).
    fn shutdown(&self) {
        match &self.warm {
            None => {
                if self.containers().is_empty() {
                    self.exit.signal();
                }
            }
            Some(warm) => self.linger.call_once(|| {
                crate::linger::spawn(Arc::clone(&self.containers), Arc::clone(warm), self.socket.clone())
            }),
        }
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
            let mut containers = self.containers();
            if matches!(containers.slots.get(&req.id), Some(Slot::Ready(c)) if Arc::ptr_eq(c, &container)) {
                containers.slots.remove(&req.id);
            }
            drop(containers);
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
        answer("connect", TaskService::connect(self, &req))
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after each Delete.
        TaskService::shutdown(self);
        Ok(Empty::default())
    }
}

/// A lock that outlives a panic of its holder.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
