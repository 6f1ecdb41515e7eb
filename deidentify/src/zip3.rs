//! ZIP codes cut to their first three digits, with the small areas' digits replaced by `000`
//! (Safe Harbor, 45 CFR 164.514(b)(2)(i)(B)).

use std::collections::BTreeSet;

/// The restricted three-digit ZIP codes shipped with Strata (HHS guidance, 2000 Census), with
/// their source in the file's header.
pub const HHS_RESTRICTED_ZIP3: &str = include_str!("../data/restricted-zip3.txt");

/// Three-digit ZIP codes whose areas hold 20,000 people or fewer.
#[derive(Debug, Clone, PartialEq)]
pub struct RestrictedZip3 {
    codes: BTreeSet<String>,
}

impl Default for RestrictedZip3 {
    fn default() -> Self {
        RestrictedZip3::parse(HHS_RESTRICTED_ZIP3).expect("the shipped list parses")
    }
}

impl RestrictedZip3 {
    /// Reads a list: one three-digit code per line, `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut codes = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let code = line.split('#').next().unwrap_or("").trim();
            if code.is_empty() {
                continue;
            }
            if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "line {}: {code:?} is not a three-digit ZIP code",
                    n + 1
                ));
            }
            codes.insert(code.to_string());
        }
        Ok(RestrictedZip3 { codes })
    }

    /// How many codes the list holds.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// The first three digits of a US ZIP code (`07302`, `07302-1234`, `073021234`), `000` when
    /// they are restricted; None for a value that is not a ZIP code (it does not leave).
    pub fn zip3(&self, zip: &str) -> Option<String> {
        let digits: String = zip.trim().chars().filter(|c| *c != '-').collect();
        if !(digits.len() == 5 || digits.len() == 9) || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let three = &digits[..3];
        Some(if self.codes.contains(three) {
            "000".into()
        } else {
            three.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_areas_become_000_and_others_keep_three_digits() {
        let r = RestrictedZip3::default();
        assert_eq!(r.len(), 17);
        assert_eq!(r.zip3("07302").as_deref(), Some("073"));
        assert_eq!(r.zip3("07302-1234").as_deref(), Some("073"));
        assert_eq!(r.zip3("03601").as_deref(), Some("000"));
        assert_eq!(r.zip3("89301").as_deref(), Some("000"));
        assert_eq!(r.zip3("SW1A 1AA"), None);
        assert_eq!(r.zip3("0730"), None);
        let site = RestrictedZip3::parse("# newer census\n073\n").unwrap();
        assert_eq!(site.zip3("07302").as_deref(), Some("000"));
        assert_eq!(site.zip3("03601").as_deref(), Some("036"));
        assert!(RestrictedZip3::parse("73\n")
            .unwrap_err()
            .contains("line 1"));
    }
}
