//! The records the node's tasks keep up to date and everything else reads (the daemon's
//! status, the API's wire types, the metrics, the alerts, the status page): below the daemon
//! and its tasks, so that a reader needs none of the tasks.

pub mod announce;
pub mod limits;
pub mod lock;
pub mod peers;
