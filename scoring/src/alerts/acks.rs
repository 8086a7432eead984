//! Acknowledgements on their way to the battery's owner.
//!
//! `POST /api/alerts/{id}/ack` may reach any instance, but only the instance that owns
//! the battery's partition keeps its episode. The acknowledgement travels as an
//! `acknowledged` event on the alerts topic; every instance's view reads it into this
//! inbox, and each partition task applies what concerns its batteries before its next
//! batch ([`crate::partition::PartitionTask::acknowledge`]). From there the booking is
//! part of the episode, checkpointed with the partition.
//!
//! Why an inbox and not a lookup at decision time: the episode must carry the booking so
//! that it moves with the partition on a rebalance and survives a restart with the
//! checkpoint. An acknowledgement applied after the last checkpoint is read again from
//! the topic after a crash (the view reads it from its start), and applying it twice
//! changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Alert;
use super::policy::Booking;

/// One acknowledgement not yet settled by a partition holding the battery.
#[derive(Debug, Clone)]
pub struct PendingAck {
    pub battery_id: Arc<str>,
    pub alert_id: String,
    pub booking: Booking,
}

/// Acknowledgements of active alerts, by alert id, until a partition task settles them.
/// Few: one per booked alert, and an alert's resolution retires it.
#[derive(Debug, Default)]
pub struct AckInbox {
    pending: Mutex<HashMap<String, PendingAck>>,
}

impl AckInbox {
    /// Takes in an acknowledged alert (ignored unless it carries who and when).
    pub fn push(&self, alert: &Alert) {
        let (Some(at), Some(by)) = (alert.acknowledged_at, alert.acknowledged_by.clone()) else {
            return;
        };
        let ack = PendingAck {
            battery_id: alert.battery_id.clone(),
            alert_id: alert.alert_id.clone(),
            booking: Booking { at, by },
        };
        self.lock().insert(ack.alert_id.clone(), ack);
    }

    /// The alert is no longer active: nothing left to apply.
    pub fn retire(&self, alert_id: &str) {
        self.lock().remove(alert_id);
    }

    /// What waits, in no particular order (empty almost always: a lock and no copy).
    pub fn pending(&self) -> Vec<PendingAck> {
        self.lock().values().cloned().collect()
    }

    /// Done with these: applied, or their episodes are over.
    pub fn settle(&self, alert_ids: &[String]) {
        let mut pending = self.lock();
        for id in alert_ids {
            pending.remove(id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingAck>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}
