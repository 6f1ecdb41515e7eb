//! Calendar durations as records managers write them: `10y`, `18m`, `30d`, `1y6m`.

use chrono::{Months, NaiveDate};
use serde::{Deserialize, Deserializer};
use std::fmt;

/// A calendar duration in years, months and days. Years and months move the calendar (a year
/// after 29 Feb is 28 Feb), which is what retention schedules mean by "N years".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyDuration {
    /// Whole years.
    pub years: u32,
    /// Whole months.
    pub months: u32,
    /// Whole days.
    pub days: u32,
}

/// A duration that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: expected numbers with units y, m or d, such as \"10y\", \"18m\", \"1y6m\" or \"30d\"")]
pub struct PolicyDurationError {
    /// The text as written.
    pub text: String,
}

impl PolicyDuration {
    /// Parses `10y`, `6m`, `30d` or combinations such as `1y6m`.
    pub fn parse(text: &str) -> Result<Self, PolicyDurationError> {
        let err = || PolicyDurationError {
            text: text.to_string(),
        };
        let mut out = PolicyDuration::default();
        let mut digits = String::new();
        let mut seen_unit = false;
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: u32 = digits.parse().map_err(|_| err())?;
            digits.clear();
            match c.to_ascii_lowercase() {
                'y' => out.years += n,
                'm' => out.months += n,
                'd' => out.days += n,
                _ => return Err(err()),
            }
            seen_unit = true;
        }
        if !digits.is_empty() || !seen_unit {
            return Err(err());
        }
        Ok(out)
    }

    /// The date this duration before `date` (saturating at the calendar's start).
    pub fn before(&self, date: NaiveDate) -> NaiveDate {
        let months = self.years * 12 + self.months;
        date.checked_sub_months(Months::new(months))
            .and_then(|d| d.checked_sub_days(chrono::Days::new(self.days as u64)))
            .unwrap_or(NaiveDate::MIN)
    }
}

impl PolicyDuration {
    /// The date this duration after `date` (saturating at the calendar's end).
    pub fn after(&self, date: NaiveDate) -> NaiveDate {
        let months = self.years * 12 + self.months;
        date.checked_add_months(Months::new(months))
            .and_then(|d| d.checked_add_days(chrono::Days::new(self.days as u64)))
            .unwrap_or(NaiveDate::MAX)
    }
}

impl fmt::Display for PolicyDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.years > 0 {
            write!(f, "{}y", self.years)?;
        }
        if self.months > 0 {
            write!(f, "{}m", self.months)?;
        }
        if self.days > 0 || (self.years == 0 && self.months == 0) {
            write!(f, "{}d", self.days)?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for PolicyDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PolicyDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_subtracts() {
        let d = PolicyDuration::parse("1y6m").unwrap();
        assert_eq!((d.years, d.months, d.days), (1, 6, 0));
        let date = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        assert_eq!(
            PolicyDuration::parse("1y").unwrap().before(date),
            NaiveDate::from_ymd_opt(2023, 2, 28).unwrap()
        );
        assert_eq!(
            PolicyDuration::parse("30d").unwrap().before(date),
            NaiveDate::from_ymd_opt(2024, 1, 30).unwrap()
        );
        for bad in ["", "10", "y", "10w", "-1y", "1.5y"] {
            assert!(PolicyDuration::parse(bad).is_err(), "{bad} should fail");
        }
    }
}
