//! Lab trends as SVG drawn on the server: per LOINC code (and unit), the results in date order
//! on a line, the reference range as a band where the data has one. Every point carries its
//! date and its value as archived (`data-date`, `data-value`, and a `<title>` screen readers
//! and tooltips read), so what is plotted can be checked against the archive.

use chrono::NaiveDate;

/// One numeric lab result.
pub(crate) struct Reading {
    pub code: String,
    pub name: String,
    pub unit: String,
    /// YYYY-MM-DD (empty when the record has no date: not plotted).
    pub date: String,
    pub value: f64,
    /// The value as archived, as text.
    pub shown: String,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// A label on an axis, at a coordinate.
pub(crate) struct Tick {
    pub at: String,
    pub label: String,
}

/// A plotted result.
pub(crate) struct Point {
    pub x: String,
    pub y: String,
    pub date: String,
    pub value: String,
}

/// The chart of one code's results.
pub(crate) struct Trend {
    pub code: String,
    pub name: String,
    pub unit: String,
    /// The reference range as text, when known.
    pub range: Option<String>,
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub right: f64,
    pub top: f64,
    pub bottom: f64,
    pub plot_width: f64,
    /// The reference range's band: its top and its height.
    pub band: Option<(String, String)>,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub polyline: String,
    pub points: Vec<Point>,
    pub first: String,
    pub last: String,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = WIDTH - 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = HEIGHT - 30.0;

fn coordinate(v: f64) -> String {
    format!("{v:.1}")
}

/// A number as an axis shows it: up to four significant digits.
fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let text = format!("{v:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// The trends of `readings`: one per code and unit with at least one dated result, in the
/// order of their names.
pub(crate) fn trends(readings: Vec<Reading>) -> Vec<Trend> {
    let mut groups: std::collections::BTreeMap<(String, String), Vec<Reading>> = Default::default();
    for r in readings {
        if NaiveDate::parse_from_str(&r.date, "%Y-%m-%d").is_ok() {
            groups
                .entry((r.code.clone(), r.unit.clone()))
                .or_default()
                .push(r);
        }
    }
    let mut out: Vec<Trend> = groups.into_values().map(trend).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.code.cmp(&b.code)));
    out
}

fn trend(mut readings: Vec<Reading>) -> Trend {
    readings.sort_by(|a, b| a.date.cmp(&b.date));
    let day = |r: &Reading| {
        NaiveDate::parse_from_str(&r.date, "%Y-%m-%d")
            .map(|d| d.num_days_from_ce() as f64)
            .unwrap_or(0.0)
    };
    use chrono::Datelike;
    let (first_day, last_day) = (day(&readings[0]), day(&readings[readings.len() - 1]));
    let low = readings.iter().find_map(|r| r.low);
    let high = readings.iter().find_map(|r| r.high);
    let mut min = readings
        .iter()
        .map(|r| r.value)
        .fold(f64::INFINITY, f64::min);
    let mut max = readings
        .iter()
        .map(|r| r.value)
        .fold(f64::NEG_INFINITY, f64::max);
    for bound in [low, high].into_iter().flatten() {
        min = min.min(bound);
        max = max.max(bound);
    }
    if (max - min).abs() < f64::EPSILON {
        min -= 1.0;
        max += 1.0;
    }
    let pad = (max - min) * 0.08;
    let (min, max) = (min - pad, max + pad);
    let x = |d: f64| {
        if last_day > first_day {
            LEFT + (d - first_day) / (last_day - first_day) * (RIGHT - LEFT)
        } else {
            (LEFT + RIGHT) / 2.0
        }
    };
    let y = |v: f64| BOTTOM - (v - min) / (max - min) * (BOTTOM - TOP);
    let points: Vec<Point> = readings
        .iter()
        .map(|r| Point {
            x: coordinate(x(day(r))),
            y: coordinate(y(r.value)),
            date: r.date.clone(),
            value: r.shown.clone(),
        })
        .collect();
    let polyline = points
        .iter()
        .map(|p| format!("{},{}", p.x, p.y))
        .collect::<Vec<_>>()
        .join(" ");
    let y_ticks = (0..5)
        .map(|i| {
            let v = min + (max - min) * f64::from(i) / 4.0;
            Tick {
                at: coordinate(y(v)),
                label: label(v),
            }
        })
        .collect();
    let mut x_ticks = vec![Tick {
        at: coordinate(x(first_day)),
        label: readings[0].date.clone(),
    }];
    if last_day > first_day {
        x_ticks.push(Tick {
            at: coordinate(x(last_day)),
            label: readings[readings.len() - 1].date.clone(),
        });
    }
    let band = match (low, high) {
        (None, None) => None,
        (l, h) => {
            let top = y(h.unwrap_or(max));
            let bottom = y(l.unwrap_or(min));
            Some((coordinate(top), coordinate(bottom - top)))
        }
    };
    let range = match (low, high) {
        (Some(l), Some(h)) => Some(format!("{}–{}", label(l), label(h))),
        (Some(l), None) => Some(format!("≥ {}", label(l))),
        (None, Some(h)) => Some(format!("≤ {}", label(h))),
        (None, None) => None,
    };
    let r0 = &readings[0];
    Trend {
        code: r0.code.clone(),
        name: if r0.name.is_empty() {
            r0.code.clone()
        } else {
            r0.name.clone()
        },
        unit: r0.unit.clone(),
        range,
        width: WIDTH,
        height: HEIGHT,
        left: LEFT,
        right: RIGHT,
        top: TOP,
        bottom: BOTTOM,
        plot_width: RIGHT - LEFT,
        band,
        y_ticks,
        x_ticks,
        polyline,
        first: r0.date.clone(),
        last: readings[readings.len() - 1].date.clone(),
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(code: &str, unit: &str, date: &str, value: f64) -> Reading {
        Reading {
            code: code.into(),
            name: format!("test {code}"),
            unit: unit.into(),
            date: date.into(),
            value,
            shown: value.to_string(),
            low: Some(4.0),
            high: Some(6.0),
        }
    }

    #[test]
    fn points_are_in_date_order_inside_the_plot_and_higher_values_higher() {
        let t = trends(vec![
            reading("2345-7", "mg/dL", "2020-03-01", 7.5),
            reading("2345-7", "mg/dL", "2019-01-01", 5.0),
            reading("2345-7", "mmol/L", "2019-01-01", 0.3),
            reading("718-7", "g/dL", "", 13.0),
        ]);
        assert_eq!(
            t.len(),
            2,
            "one per code and unit; undated results are not plotted"
        );
        let mg = t.iter().find(|t| t.unit == "mg/dL").unwrap();
        let dates: Vec<&str> = mg.points.iter().map(|p| p.date.as_str()).collect();
        assert_eq!(dates, ["2019-01-01", "2020-03-01"]);
        let (x0, x1): (f64, f64) = (
            mg.points[0].x.parse().unwrap(),
            mg.points[1].x.parse().unwrap(),
        );
        assert_eq!((x0, x1), (LEFT, RIGHT));
        let (y0, y1): (f64, f64) = (
            mg.points[0].y.parse().unwrap(),
            mg.points[1].y.parse().unwrap(),
        );
        assert!(y1 < y0, "7.5 is drawn above 5.0");
        assert!((TOP..=BOTTOM).contains(&y0) && (TOP..=BOTTOM).contains(&y1));
        assert_eq!(mg.range.as_deref(), Some("4–6"));
        let (band_top, band_height): (f64, f64) = (
            mg.band.as_ref().unwrap().0.parse().unwrap(),
            mg.band.as_ref().unwrap().1.parse().unwrap(),
        );
        assert!(
            band_top > y1 && band_top + band_height > y0,
            "the band spans 4 to 6"
        );
        assert_eq!(mg.points[1].value, "7.5");
    }

    #[test]
    fn axis_labels_keep_four_significant_digits() {
        assert_eq!(label(1234.5678), "1235");
        assert_eq!(label(0.012346), "0.01235");
        assert_eq!(label(5.0), "5");
        assert_eq!(label(-2.5), "-2.5");
    }
}
