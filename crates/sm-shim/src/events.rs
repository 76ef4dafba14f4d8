//! Task events (created, started, exited, deleted, exec added/started)
//! published to containerd, so that it and the CRI see exits without polling.

use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

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

    /// Publishes `event`; a failure is logged (containerd also polls state).
    pub fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) = self.publisher.publish(Context::default(), &topic, &self.namespace, Box::new(event)) {
            tracing::warn!("publishing {topic}: {e}");
        }
    }
}
