//! Daily run windows: `[start, end)` wall-clock times, printed and parsed as `HH:MM-HH:MM`.
//!
//! A window has no date and no zone of its own: it is read in the cluster's configured time
//! zone. `start > end` wraps past midnight (`22:00-04:00` runs from 22:00 to 04:00 the next
//! morning). `start == end` is refused: it would mean either "never" or "always", and an
//! operator who wants "always" clears the window instead.

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

    #[test]
    fn serde_uses_the_text_form_and_validates() {
        let w: RunWindow = "22:00-04:00".parse().unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"22:00-04:00\"");
        assert!(serde_json::from_str::<RunWindow>("\"25:00-04:00\"").is_err());
    }
}
