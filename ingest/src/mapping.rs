//! Declared column mappings (`[tables.T.columns.C]`): value maps, defaults for NULLs and dates
//! in explicit formats and time zones, applied to each row as read, before it is typed and
//! decided; renames apply where the row is written (operational table and archive).

use crate::config::ColumnMapping;
use crate::value::{ColumnType, Value};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// `UTC`, `Z` or `+hh:mm` / `-hh:mm`.
pub fn parse_offset(tz: &str) -> Option<FixedOffset> {
    if tz.eq_ignore_ascii_case("UTC") || tz == "Z" {
        return FixedOffset::east_opt(0);
    }
    let sign = match tz.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, m) = tz[1..].split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=14).contains(&h) && (0..60).contains(&m))
        .then(|| FixedOffset::east_opt(sign * (h * 3600 + m * 60)))
        .flatten()
}

/// Conventional and SI units of the analytes Strata converts, by LOINC code: (code,
/// conventional unit, SI unit, factor from conventional to SI).
const ANALYTES: [(&str, &str, &str, f64); 6] = [
    ("2345-7", "mg/dL", "mmol/L", 0.0555),  // glucose
    ("2093-3", "mg/dL", "mmol/L", 0.02586), // cholesterol
    ("2571-8", "mg/dL", "mmol/L", 0.01129), // triglycerides
    ("2160-0", "mg/dL", "umol/L", 88.42),   // creatinine
    ("3094-0", "mg/dL", "mmol/L", 0.357),   // urea nitrogen
    ("718-7", "g/dL", "g/L", 10.0),         // hemoglobin
];

/// A unit conversion, with the positions of the unit and code columns in the row.
#[derive(Debug, Clone)]
pub struct UnitConversion {
    /// The unit column.
    pub unit: usize,
    /// The LOINC code column.
    pub code: usize,
    /// Towards SI (else towards conventional units).
    pub to_si: bool,
    /// Decimal places kept.
    pub decimals: u32,
}

impl UnitConversion {
    /// Converts `values[value]` in place when its analyte and unit call for it.
    pub fn apply(&self, values: &mut [Value], value: usize) {
        let (Some(code), Some(unit)) = (
            values[self.code].as_key_text(),
            values[self.unit].as_key_text(),
        ) else {
            return;
        };
        let Some(&(_, conventional, si, factor)) =
            ANALYTES.iter().find(|(c, ..)| *c == code.trim())
        else {
            return;
        };
        let (from, to, factor) = if self.to_si {
            (conventional, si, factor)
        } else {
            (si, conventional, 1.0 / factor)
        };
        if !unit.trim().eq_ignore_ascii_case(from) {
            return;
        }
        let number = match &values[value] {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            Value::Text(t) => match t.trim().parse::<f64>() {
                Ok(f) => f,
                Err(_) => return, // left as it is: typing decides
            },
            _ => return,
        };
        let scale = 10f64.powi(self.decimals as i32);
        let converted = (number * factor * scale).round() / scale;
        values[value] = match &values[value] {
            Value::Text(_) => Value::Text(format!("{converted:.*}", self.decimals as usize)),
            _ => Value::Float(converted),
        };
        values[self.unit] = Value::Text(to.to_string());
    }
}

/// One column's mapping, ready to apply.
#[derive(Debug, Clone, Default)]
pub struct ColumnMap {
    values: Vec<(String, String)>,
    default: Option<String>,
    date_format: Option<String>,
    offset: Option<FixedOffset>,
    /// Set by the layout, which knows the columns' positions.
    pub convert: Option<UnitConversion>,
}

impl ColumnMap {
    /// From the config (validated already).
    pub fn new(m: &ColumnMapping) -> Self {
        ColumnMap {
            values: m.values.clone().into_iter().collect(),
            default: m.default.clone(),
            date_format: m.date_format.clone(),
            offset: m.timezone.as_deref().and_then(parse_offset),
            convert: None,
        }
    }

    /// Whether it changes anything.
    pub fn is_identity(&self) -> bool {
        self.values.is_empty()
            && self.default.is_none()
            && self.date_format.is_none()
            && self.convert.is_none()
    }

    /// Maps one value for a column of type `t`; an error names what did not fit.
    pub fn apply(&self, v: Value, t: ColumnType) -> Result<Value, &'static str> {
        let mut v = v;
        if !self.values.is_empty() {
            if let Some(text) = v.as_key_text() {
                if let Some((_, to)) = self.values.iter().find(|(from, _)| *from == text) {
                    v = Value::Text(to.clone());
                }
            }
        }
        if v.is_null() {
            if let Some(d) = &self.default {
                v = Value::Text(d.clone());
            }
        }
        let (Some(format), Value::Text(text)) = (&self.date_format, &v) else {
            return Ok(v);
        };
        let text = text.trim();
        let offset = self
            .offset
            .unwrap_or(FixedOffset::east_opt(0).expect("UTC"));
        let local = NaiveDateTime::parse_from_str(text, format)
            .or_else(|_| {
                NaiveDate::parse_from_str(text, format)
                    .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight"))
            })
            .map_err(|_| "does not match the column's date format")?;
        Ok(match t {
            ColumnType::Date => Value::Date(local.date()),
            ColumnType::TimestampTz => Value::TimestampTz(
                offset
                    .from_local_datetime(&local)
                    .single()
                    .map(|t| t.with_timezone(&Utc))
                    .ok_or("not a valid time in the column's time zone")?,
            ),
            ColumnType::Timestamp => Value::Timestamp(local),
            // A text column keeps an ISO form of what the format meant.
            _ => Value::Text(
                DateTime::<Utc>::from_naive_utc_and_offset(local, Utc)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_values_defaults_and_local_dates() {
        let m = ColumnMap::new(&ColumnMapping {
            values: [("A".to_string(), "active".to_string())].into(),
            default: Some("unknown".into()),
            ..Default::default()
        });
        assert_eq!(
            m.apply(Value::Text("A".into()), ColumnType::Text),
            Ok(Value::Text("active".into()))
        );
        assert_eq!(
            m.apply(Value::Text("X".into()), ColumnType::Text),
            Ok(Value::Text("X".into()))
        );
        assert_eq!(
            m.apply(Value::Null, ColumnType::Text),
            Ok(Value::Text("unknown".into()))
        );
        let d = ColumnMap::new(&ColumnMapping {
            date_format: Some("%d/%m/%Y %H:%M".into()),
            timezone: Some("+02:00".into()),
            ..Default::default()
        });
        assert_eq!(
            d.apply(
                Value::Text("31/01/2015 08:30".into()),
                ColumnType::TimestampTz
            ),
            Ok(Value::TimestampTz(
                NaiveDate::from_ymd_opt(2015, 1, 31)
                    .unwrap()
                    .and_hms_opt(6, 30, 0)
                    .unwrap()
                    .and_utc()
            ))
        );
        assert_eq!(
            d.apply(Value::Text("2015-01-31".into()), ColumnType::TimestampTz),
            Err("does not match the column's date format")
        );
        let day = ColumnMap::new(&ColumnMapping {
            date_format: Some("%m/%d/%Y".into()),
            ..Default::default()
        });
        assert_eq!(
            day.apply(Value::Text("01/31/2015".into()), ColumnType::Date),
            Ok(Value::Date(NaiveDate::from_ymd_opt(2015, 1, 31).unwrap()))
        );
        assert!(parse_offset("+01:00").is_some() && parse_offset("CET").is_none());
    }

    #[test]
    fn converts_known_analytes_between_unit_systems() {
        let si = UnitConversion {
            unit: 1,
            code: 2,
            to_si: true,
            decimals: 2,
        };
        let mut row = vec![
            Value::Text("100.0".into()),
            Value::Text("mg/dL".into()),
            Value::Text("2345-7".into()),
        ];
        si.apply(&mut row, 0);
        assert_eq!(row[0], Value::Text("5.55".into()));
        assert_eq!(row[1], Value::Text("mmol/L".into()));
        // Already SI, or an analyte Strata does not know: unchanged.
        si.apply(&mut row, 0);
        assert_eq!(row[0], Value::Text("5.55".into()));
        let mut other = vec![
            Value::Float(7.0),
            Value::Text("mg/dL".into()),
            Value::Text("9999-9".into()),
        ];
        si.apply(&mut other, 0);
        assert_eq!(other[0], Value::Float(7.0));
        let back = UnitConversion { to_si: false, ..si };
        let mut hb = vec![
            Value::Float(135.0),
            Value::Text("g/L".into()),
            Value::Text("718-7".into()),
        ];
        back.apply(&mut hb, 0);
        assert_eq!(
            (hb[0].clone(), hb[1].clone()),
            (Value::Float(13.5), Value::Text("g/dL".into()))
        );
    }
}
