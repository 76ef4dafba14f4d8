//! Task events (created, started, exited, deleted, exec added/started)
//! published to containerd, so that it and the CRI see exits without polling.

use containerd_shim::event::Event;
use containerd_shim::protos::ttrpc::context::with_timeout;
use containerd_shim::publisher::RemotePublisher;

/// How long one event may wait for containerd.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// containerd's event service, for one namespace.
pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    /// Events of `namespace` through `publisher`.
    pub fn new(publisher: RemotePublisher, namespace: String) -> Events {
        Events { publisher, namespace }
    }

    /// Publishes `event` (waiting at most [`PUBLISH_TIMEOUT`] for
    /// containerd); a failure is logged (containerd also polls state).
    pub fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        let ctx = with_timeout(PUBLISH_TIMEOUT.as_nanos() as i64);
        if let Err(e) = self.publisher.publish(ctx, &topic, &self.namespace, Box::new(event)) {
            tracing::warn!("publishing {topic}: {e}");
        }
    }
}
