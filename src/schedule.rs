//! Run-window policy: which window a task obeys, whether it is open now, and until when.
//!
//! A task obeys its own window, or the cluster's default window if it has none, or none at all
//! (it may run at any time). Windows are read in the cluster's time zone, with the semantics of
//! [`RunWindow`] (wall-clock time; see its docs for daylight-saving time). Time comes from the
//! node's [`Clock`], so tests move it.
//!
//! Both the dispatcher (which does not start a task outside its window and wakes up when the
//! earliest waiting task's window opens) and the task controller (which stops a running task at
//! its next block when the window closes, and waits, visibly, for it to open) decide through
//! this one module.

use std::sync::Arc;

use jiff::tz::TimeZone;

use crate::clock::Clock;
use crate::model::{RunWindow, TaskControl};

/// Whether a task may run now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowCheck {
    /// It may run; `until_ms` is when its window closes (`None`: it has no window).
    Open {
        /// When the window closes, Unix milliseconds.
        until_ms: Option<i64>,
    },
    /// It must wait until `opens_at_ms`; `note` says so for people.
    Closed {
        /// When the window opens, Unix milliseconds.
        opens_at_ms: i64,
        /// `waiting for run window 01:00-05:00, opens 01:00 Asia/Shanghai (2026-11-22 01:00 +08)`.
        note: String,
    },
}

/// The settings a [`Schedule`] reads windows with, as stored for the whole cluster in ZooKeeper
/// ([`TaskStore::agree_schedule`](crate::store::TaskStore::agree_schedule)): every node must
/// read windows alike, or a dispatcher would start a task that its runner stops at once.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScheduleSettings {
    /// IANA time zone name, as configured (`Asia/Shanghai`).
    pub time_zone: String,
    /// The run window of tasks that have none of their own.
    pub default_run_window: Option<RunWindow>,
}

impl std::fmt::Display for ScheduleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.default_run_window {
            Some(window) => write!(f, "time zone {}, default run window {window}", self.time_zone),
            None => write!(f, "time zone {}, no default run window", self.time_zone),
        }
    }
}

/// The cluster's run-window settings and clock. Cheap to clone.
#[derive(Clone)]
pub struct Schedule {
    time_zone: TimeZone,
    zone_name: String,
    default_window: Option<RunWindow>,
    clock: Arc<dyn Clock>,
}

impl Schedule {
    /// Windows read in `time_zone` (named `zone_name`), with `default_window` for tasks without
    /// their own, at the time of `clock`.
    pub fn new(time_zone: TimeZone, zone_name: &str, default_window: Option<RunWindow>, clock: Arc<dyn Clock>) -> Self {
        Schedule { time_zone, zone_name: zone_name.to_string(), default_window, clock }
    }

    /// The settings it reads windows with.
    pub fn settings(&self) -> ScheduleSettings {
        ScheduleSettings { time_zone: self.zone_name.clone(), default_run_window: self.default_window }
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The window a task obeys.
    pub fn window_of(&self, control: &TaskControl) -> Option<RunWindow> {
        control.run_window.or(self.default_window)
    }

    /// Whether the task may run now, and until when (or from when).
    pub fn check(&self, control: &TaskControl) -> WindowCheck {
        let Some(window) = self.window_of(control) else { return WindowCheck::Open { until_ms: None } };
        let now = self.clock.now();
        let change = window.next_change(now, &self.time_zone);
        if window.is_open(now, &self.time_zone) {
            return WindowCheck::Open { until_ms: Some(change.as_millisecond()) };
        }
        let local = change.to_zoned(self.time_zone.clone());
        let note = format!(
            "waiting for run window {window}, opens {} {} ({})",
            local.strftime("%H:%M"),
            self.zone_name,
            local.strftime("%Y-%m-%d %H:%M %:z"),
        );
        WindowCheck::Closed { opens_at_ms: change.as_millisecond(), note }
    }
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("time_zone", &self.zone_name)
            .field("default_window", &self.default_window)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::model::{time_zone, CopyOptions, CopyVolumeSpec, TaskSpec, VolumeId};

    fn control(window: Option<&str>) -> TaskControl {
        let spec = TaskSpec::CopyVolume(CopyVolumeSpec {
            source_volume: VolumeId::new("a").unwrap(),
            target_volume: VolumeId::new("b").unwrap(),
            source_hosts: vec!["h".into()],
            target_hosts: vec!["g".into()],
            base_snapshot: None,
            options: CopyOptions::default(),
        });
        TaskControl::new(spec, window.map(|w| w.parse().unwrap()), 0)
    }

    #[test]
    fn own_window_then_default_then_none() {
        let clock = ManualClock::at("2026-11-21T04:00:00Z".parse().unwrap()); // 12:00 in Shanghai
        let tz = time_zone("Asia/Shanghai").unwrap();
        let default = Some("22:00-04:00".parse().unwrap());
        let schedule = Schedule::new(tz.clone(), "Asia/Shanghai", default, Arc::new(clock.clone()));
        match schedule.check(&control(None)) {
            WindowCheck::Closed { opens_at_ms, note } => {
                assert_eq!(opens_at_ms, "2026-11-21T14:00:00Z".parse::<jiff::Timestamp>().unwrap().as_millisecond());
                assert_eq!(
                    note,
                    "waiting for run window 22:00-04:00, opens 22:00 Asia/Shanghai (2026-11-21 22:00 +08:00)"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(schedule.check(&control(Some("11:00-13:00"))), WindowCheck::Open { until_ms: Some(_) }));
        let no_default = Schedule::new(tz, "Asia/Shanghai", None, Arc::new(clock));
        assert_eq!(no_default.check(&control(None)), WindowCheck::Open { until_ms: None });
    }
}
