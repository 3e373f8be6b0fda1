//! Daily run windows: `[start, end)` wall-clock times, printed and parsed as `HH:MM-HH:MM`.
//!
//! A window has no date and no zone of its own: it is read in the cluster's configured time
//! zone. `start > end` wraps past midnight (`22:00-04:00` runs from 22:00 to 04:00 the next
//! morning). `start == end` is refused: it would mean either "never" or "always", and an
//! operator who wants "always" clears the window instead.
//!
//! # Daylight-saving time
//!
//! Whether the window is open is decided by the **local wall-clock time** in the zone: open
//! exactly while the clock on the wall reads a time in `[start, end)`. It follows that:
//!
//! - when a start time does not exist that day (spring forward, 02:30 in a 02:00-03:00 gap), the
//!   window opens at the end of the gap (03:00), the first instant at which the wall clock reads
//!   a time past the start; likewise an end in the gap closes it at the end of the gap;
//! - when wall-clock times happen twice (fall back), the window is open during both: a
//!   `01:00-02:00` window lasts two hours that night, and a window that starts inside the
//!   repeated hour opens at its first occurrence.
//!
//! [`RunWindow::next_change`] gives the next instant at which openness flips, consistently with
//! [`RunWindow::is_open`], so a timer set to it never fires early or late by a DST offset.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// A wall-clock time of day, minute precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    hour: u8,
    minute: u8,
}

impl TimeOfDay {
    /// `hour` in `0..24`, `minute` in `0..60`.
    pub fn new(hour: u8, minute: u8) -> Result<Self, ModelError> {
        if hour > 23 {
            return Err(ModelError::invalid("hour", hour.to_string(), "must be 0 to 23"));
        }
        if minute > 59 {
            return Err(ModelError::invalid("minute", minute.to_string(), "must be 0 to 59"));
        }
        Ok(TimeOfDay { hour, minute })
    }

    /// The hour, `0..24`.
    pub fn hour(self) -> u8 {
        self.hour
    }

    /// The minute, `0..60`.
    pub fn minute(self) -> u8 {
        self.minute
    }

    /// Minutes since midnight, `0..1440`.
    pub fn minute_of_day(self) -> u16 {
        u16::from(self.hour) * 60 + u16::from(self.minute)
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

impl FromStr for TimeOfDay {
    type Err = ModelError;

    /// Exactly `HH:MM`, two digits each.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let b = s.as_bytes();
        let digits = |i: usize| b[i].is_ascii_digit() && b[i + 1].is_ascii_digit();
        if b.len() != 5 || b[2] != b':' || !digits(0) || !digits(3) {
            return Err(ModelError::invalid("time of day", s, "expected HH:MM with two digits each, like 01:30"));
        }
        let hour = (b[0] - b'0') * 10 + (b[1] - b'0');
        let minute = (b[3] - b'0') * 10 + (b[4] - b'0');
        if hour > 23 {
            return Err(ModelError::invalid("time of day", s, "hour must be 00 to 23"));
        }
        if minute > 59 {
            return Err(ModelError::invalid("time of day", s, "minute must be 00 to 59"));
        }
        Ok(TimeOfDay { hour, minute })
    }
}

/// A daily window `[start, end)` in which a task may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunWindow {
    start: TimeOfDay,
    end: TimeOfDay,
}

impl RunWindow {
    /// A window from `start` (inclusive) to `end` (exclusive); `start > end` wraps midnight.
    pub fn new(start: TimeOfDay, end: TimeOfDay) -> Result<Self, ModelError> {
        if start == end {
            return Err(ModelError::invalid(
                "run window",
                format!("{start}-{end}"),
                "start and end are equal; clear the window to run at any time",
            ));
        }
        Ok(RunWindow { start, end })
    }

    /// Where the window opens.
    pub fn start(&self) -> TimeOfDay {
        self.start
    }

    /// Where the window closes (exclusive).
    pub fn end(&self) -> TimeOfDay {
        self.end
    }

    /// Whether the window wraps past midnight.
    pub fn wraps_midnight(&self) -> bool {
        self.start > self.end
    }

    /// Whether a wall-clock time falls inside `[start, end)`.
    pub fn contains(&self, t: TimeOfDay) -> bool {
        if self.wraps_midnight() {
            t >= self.start || t < self.end
        } else {
            t >= self.start && t < self.end
        }
    }
}

impl fmt::Display for RunWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for RunWindow {
    type Err = ModelError;

    /// `HH:MM-HH:MM`, for instance `22:00-04:00`.
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let (start, end) = s
            .split_once('-')
            .ok_or_else(|| ModelError::invalid("run window", s, "expected HH:MM-HH:MM, like 22:00-04:00"))?;
        let part = |p: &str| {
            p.parse::<TimeOfDay>().map_err(|_| {
                ModelError::invalid("run window", s, "expected HH:MM-HH:MM with hours 00-23 and minutes 00-59")
            })
        };
        RunWindow::new(part(start)?, part(end)?)
    }
}

impl TryFrom<String> for RunWindow {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, ModelError> {
        s.parse()
    }
}

impl From<RunWindow> for String {
    fn from(w: RunWindow) -> String {
        w.to_string()
    }
}

impl RunWindow {
    /// Whether the window is open at `at`, read in zone `tz` (by wall-clock time; see the module
    /// docs for daylight-saving time).
    pub fn is_open(&self, at: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> bool {
        let local = at.to_zoned(tz.clone()).time();
        // Seconds count: 01:59:59 is before 02:00 and inside a window ending at 02:00.
        let t = TimeOfDay { hour: local.hour() as u8, minute: local.minute() as u8 };
        self.contains(t)
    }

    /// The first instant after `at` at which the window opens (if it is closed at `at`) or closes
    /// (if open).
    pub fn next_change(&self, at: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> jiff::Timestamp {
        let open = self.is_open(at, tz);
        let mut candidates = self.boundaries(at, tz);
        candidates.sort();
        candidates
            .into_iter()
            .filter(|c| *c > at)
            .find(|c| self.is_open(*c, tz) != open)
            .unwrap_or_else(|| at + jiff::SignedDuration::from_hours(24))
    }

    /// Every instant in the three days around `at` at which openness may flip: the window's
    /// start and end on each day (both readings of an ambiguous or missing wall time), and the
    /// zone's offset transitions.
    fn boundaries(&self, at: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> Vec<jiff::Timestamp> {
        let today = at.to_zoned(tz.clone()).date();
        let mut out = Vec::new();
        for days in -1..=2i64 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(days)) else { continue };
            for t in [self.start, self.end] {
                let local = date.at(t.hour as i8, t.minute as i8, 0, 0);
                let ambiguous = tz.to_ambiguous_timestamp(local);
                out.extend(ambiguous.earlier().ok());
                out.extend(ambiguous.later().ok());
            }
        }
        let horizon = at + jiff::SignedDuration::from_hours(72);
        out.extend(tz.following(at).map(|transition| transition.timestamp()).take_while(|ts| *ts <= horizon));
        out
    }
}

/// A time zone by IANA name (`Asia/Shanghai`, `UTC`), or an error naming the value.
pub fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, ModelError> {
    jiff::tz::TimeZone::get(name).map_err(|_| ModelError::invalid("time zone", name, "not an IANA time zone name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TimeOfDay {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_the_same_text() {
        for s in ["01:00-05:00", "22:00-04:00", "00:00-23:59", "23:59-00:00"] {
            assert_eq!(s.parse::<RunWindow>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_malformed_windows_naming_the_value() {
        for bad in [
            "24:00-05:00",
            "01:60-05:00",
            "5:7-08:00",
            "01:00-01:00",
            "garbage",
            "",
            "01:00",
            "01:00-",
            "-01:00",
            "01:00-05:00-06:00",
            "+1:00-05:00",
            "01:00 -05:00",
            "０1:00-05:00",
        ] {
            let err = bad.parse::<RunWindow>().unwrap_err();
            match &err {
                ModelError::Invalid { field: "run window", value, .. } => assert_eq!(value, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn contains_is_half_open_and_wraps_midnight() {
        let day: RunWindow = "01:00-05:00".parse().unwrap();
        assert!(day.contains(t("01:00")) && day.contains(t("04:59")));
        assert!(!day.contains(t("05:00")) && !day.contains(t("00:59")));
        let night: RunWindow = "22:00-04:00".parse().unwrap();
        assert!(night.wraps_midnight());
        assert!(night.contains(t("22:00")) && night.contains(t("23:59")) && night.contains(t("00:00")));
        assert!(night.contains(t("03:59")) && !night.contains(t("04:00")) && !night.contains(t("21:59")));
        assert!(!night.contains(t("12:00")));
    }

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn open_and_next_change_in_a_fixed_zone() {
        let tz = time_zone("Asia/Shanghai").unwrap();
        let night: RunWindow = "22:00-04:00".parse().unwrap();
        // 23:00 local (+08:00) is 15:00Z.
        assert!(night.is_open(ts("2026-11-21T15:00:00Z"), &tz));
        assert_eq!(night.next_change(ts("2026-11-21T15:00:00Z"), &tz), ts("2026-11-21T20:00:00Z"));
        // 12:00 local: closed, opens at 22:00 local = 14:00Z.
        assert!(!night.is_open(ts("2026-11-21T04:00:00Z"), &tz));
        assert_eq!(night.next_change(ts("2026-11-21T04:00:00Z"), &tz), ts("2026-11-21T14:00:00Z"));
        // Exactly at the end: closed (half-open), next change is the next opening.
        assert!(!night.is_open(ts("2026-11-21T20:00:00Z"), &tz));
        assert_eq!(night.next_change(ts("2026-11-21T20:00:00Z"), &tz), ts("2026-11-22T14:00:00Z"));
    }

    #[test]
    fn a_start_inside_the_spring_gap_opens_at_the_end_of_the_gap() {
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00Z).
        let tz = time_zone("America/New_York").unwrap();
        let w: RunWindow = "02:30-05:00".parse().unwrap();
        let before = ts("2026-03-08T06:00:00Z"); // 01:00 EST
        assert!(!w.is_open(before, &tz));
        assert_eq!(w.next_change(before, &tz), ts("2026-03-08T07:00:00Z"), "opens at 03:00 EDT");
        assert!(w.is_open(ts("2026-03-08T07:00:00Z"), &tz));
        assert_eq!(w.next_change(ts("2026-03-08T07:00:00Z"), &tz), ts("2026-03-08T09:00:00Z"), "closes 05:00 EDT");
    }

    #[test]
    fn a_window_in_the_repeated_autumn_hour_is_open_twice() {
        // New York, 2026-11-01: 02:00 EDT falls back to 01:00 EST (06:00Z); 01:xx happens twice.
        let tz = time_zone("America/New_York").unwrap();
        let w: RunWindow = "01:00-02:00".parse().unwrap();
        let first = ts("2026-11-01T05:00:00Z"); // 01:00 EDT
        assert!(w.is_open(first, &tz));
        assert_eq!(w.next_change(first, &tz), ts("2026-11-01T07:00:00Z"), "02:00 EST, two hours later");
        assert!(w.is_open(ts("2026-11-01T06:30:00Z"), &tz), "01:30 EST, the second time round");
        let late: RunWindow = "01:30-03:00".parse().unwrap();
        assert_eq!(late.next_change(ts("2026-11-01T04:00:00Z"), &tz), ts("2026-11-01T05:30:00Z"), "first 01:30");
    }

    #[test]
    fn unknown_time_zones_are_named() {
        let err = time_zone("Mars/Olympus").unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"), "{err}");
    }

    #[test]
    fn serde_uses_the_text_form_and_validates() {
        let w: RunWindow = "22:00-04:00".parse().unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"22:00-04:00\"");
        assert!(serde_json::from_str::<RunWindow>("\"25:00-04:00\"").is_err());
    }
}
