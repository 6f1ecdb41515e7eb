//! Stacked bar charts as SVG drawn on the server (the plan's rows per tier per year, patients
//! per tier per table). Every segment carries its label, tier and value (`data-*` and a
//! `<title>`), so what is drawn can be read back and checked.

/// The tiers, in the order they stack (bottom first), with their CSS class.
pub(crate) const TIERS: [(&str, &str); 3] = [
    ("operational", "Operational"),
    ("archive", "Archive"),
    ("purge", "Past retention"),
];

/// A drawn segment.
pub(crate) struct Segment {
    pub tier: &'static str,
    pub tier_label: &'static str,
    pub value: u64,
    pub x: String,
    pub y: String,
    pub width: String,
    pub height: String,
}

/// A bar: its label and its segments.
pub(crate) struct Bar {
    pub label: String,
    /// Whether the axis shows its label (every few bars when there are many).
    pub labelled: bool,
    pub label_x: String,
    pub segments: Vec<Segment>,
    pub total: u64,
}

/// A chart of stacked vertical bars.
pub(crate) struct Bars {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub bottom: f64,
    pub right: f64,
    pub top: f64,
    pub bars: Vec<Bar>,
    /// The value axis: the largest total, at the top.
    pub max_label: String,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = WIDTH - 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = HEIGHT - 28.0;

fn c(v: f64) -> String {
    format!("{v:.1}")
}

/// Bars for `rows`: (label, [operational, archive, purge]).
pub(crate) fn stacked(rows: &[(String, [u64; 3])]) -> Bars {
    let max = rows
        .iter()
        .map(|(_, v)| v.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let slot = (RIGHT - LEFT) / rows.len().max(1) as f64;
    let width = (slot * 0.7).min(48.0);
    let scale = (BOTTOM - TOP) / max as f64;
    let every = rows.len().div_ceil(14).max(1);
    let bars = rows
        .iter()
        .enumerate()
        .map(|(i, (label, values))| {
            let x = LEFT + slot * i as f64 + (slot - width) / 2.0;
            let mut base = BOTTOM;
            let segments = TIERS
                .iter()
                .zip(values)
                .filter(|(_, v)| **v > 0)
                .map(|((tier, tier_label), v)| {
                    let h = *v as f64 * scale;
                    base -= h;
                    Segment {
                        tier,
                        tier_label,
                        value: *v,
                        x: c(x),
                        y: c(base),
                        width: c(width),
                        height: c(h),
                    }
                })
                .collect();
            Bar {
                label: label.clone(),
                labelled: i % every == 0,
                label_x: c(x + width / 2.0),
                segments,
                total: values.iter().sum(),
            }
        })
        .collect();
    Bars {
        width: WIDTH,
        height: HEIGHT,
        left: LEFT,
        bottom: BOTTOM,
        right: RIGHT,
        top: TOP,
        bars,
        max_label: max.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_stack_in_tier_order_and_heights_follow_values() {
        let b = stacked(&[("2019".into(), [10, 30, 0]), ("2020".into(), [40, 0, 0])]);
        assert_eq!(b.bars.len(), 2);
        let s = &b.bars[0].segments;
        assert_eq!(
            s.iter().map(|s| (s.tier, s.value)).collect::<Vec<_>>(),
            [("operational", 10), ("archive", 30)]
        );
        let h = |s: &Segment| s.height.parse::<f64>().unwrap();
        assert!((h(&s[1]) - 3.0 * h(&s[0])).abs() < 0.2);
        let tallest = h(&b.bars[1].segments[0]);
        assert!(
            (tallest - (BOTTOM - TOP)).abs() < 0.1,
            "the largest total reaches the top"
        );
        let y0: f64 = s[0].y.parse().unwrap();
        let y1: f64 = s[1].y.parse().unwrap();
        assert!(y1 < y0, "archive stacks above operational");
    }
}
