//! Exact decimals: which columns hold them (PostgreSQL's `numeric`, CSV amounts staged by
//! Strata) and their values in units of the last digit, never rounded, for the archive's
//! Parquet DECIMAL columns.

use crate::db::DbKind;
use crate::value::Value;

/// A column whose values are exact decimals, archived as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decimal {
    /// At most `precision` digits, `scale` after the point: Parquet DECIMAL.
    Fixed {
        /// Digits in all (1 to 38).
        precision: u8,
        /// Digits after the point.
        scale: i8,
    },
    /// Any decimal, kept as its text (NaN and infinities too).
    Text,
}

/// The declared type Strata stages a CSV column of decimals as: text affinity in SQLite (which
/// would turn `136.00` into `136` in a NUMERIC column), read back as a decimal.
pub const CSV_DECIMAL_DECL: &str = "DECIMAL_TEXT";

impl Decimal {
    /// The decimal a column holds by its declared type: PostgreSQL's `numeric(p,s)` (DECIMAL
    /// when p <= 38) and `numeric` (text) from a PostgreSQL source, and Strata's own
    /// [`CSV_DECIMAL_DECL`] from a staged CSV file. SQLite's own NUMERIC columns hold
    /// integers and floats, not exact decimals: they keep their types.
    pub fn of(decl: &str, source: DbKind) -> Option<Decimal> {
        let d = decl.trim();
        let params = if source == DbKind::Postgres && (d == "numeric" || d.starts_with("numeric("))
        {
            &d["numeric".len()..]
        } else if d.len() >= CSV_DECIMAL_DECL.len()
            && d[..CSV_DECIMAL_DECL.len()].eq_ignore_ascii_case(CSV_DECIMAL_DECL)
        {
            &d[CSV_DECIMAL_DECL.len()..]
        } else {
            return None;
        };
        let Some(inner) = params.strip_prefix('(').and_then(|p| p.strip_suffix(')')) else {
            return Some(Decimal::Text);
        };
        let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
        match (p.trim().parse::<u8>(), s.trim().parse::<i8>()) {
            (Ok(precision), Ok(scale))
                if (1..=38).contains(&precision) && (0..=precision as i8).contains(&scale) =>
            {
                Some(Decimal::Fixed { precision, scale })
            }
            _ => Some(Decimal::Text),
        }
    }

    /// The value in units of the last digit, when `value` is a decimal this column holds
    /// exactly (never rounded).
    pub fn units(self, value: &Value) -> Option<i128> {
        let Decimal::Fixed { precision, scale } = self else {
            return None;
        };
        let text = match value {
            Value::Text(t) => std::borrow::Cow::Borrowed(t.as_str()),
            Value::Int(i) => std::borrow::Cow::Owned(i.to_string()),
            _ => return None,
        };
        let t = text.trim();
        let (negative, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let scale = scale as usize;
        let frac = frac.trim_end_matches('0');
        let int = int.trim_start_matches('0');
        if frac.len() > scale
            || int.len() + scale > precision as usize
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
            || int.is_empty() && frac.is_empty() && !digits.starts_with(['0', '.'])
        {
            return None;
        }
        let all = format!("{int}{frac:0<scale$}");
        let units: i128 = if all.is_empty() { 0 } else { all.parse().ok()? };
        Some(if negative { -units } else { units })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_decimals_are_recognised_and_never_rounded() {
        let fixed = Decimal::Fixed {
            precision: 10,
            scale: 2,
        };
        assert_eq!(Decimal::of("numeric(10,2)", DbKind::Postgres), Some(fixed));
        assert_eq!(
            Decimal::of("numeric", DbKind::Postgres),
            Some(Decimal::Text)
        );
        assert_eq!(
            Decimal::of("numeric(60,2)", DbKind::Postgres),
            Some(Decimal::Text)
        );
        assert_eq!(
            Decimal::of("DECIMAL_TEXT(10,2)", DbKind::Sqlite),
            Some(fixed)
        );
        // SQLite's own NUMERIC columns hold integers and floats.
        assert_eq!(Decimal::of("NUMERIC(10,2)", DbKind::Sqlite), None);
        assert_eq!(Decimal::of("integer", DbKind::Postgres), None);
        let units = |t: &str| fixed.units(&Value::Text(t.into()));
        assert_eq!(units("136.00"), Some(13600));
        assert_eq!(units("-0.5"), Some(-50));
        assert_eq!(units("0"), Some(0));
        assert_eq!(units("12345678.99"), Some(1234567899));
        assert_eq!(units("123456789.00"), None, "too many digits");
        assert_eq!(units("1.005"), None, "would be rounded");
        assert_eq!(units("NaN"), None);
        assert_eq!(fixed.units(&Value::Int(7)), Some(700));
    }
}
