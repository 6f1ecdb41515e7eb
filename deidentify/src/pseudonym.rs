//! Keyed pseudonyms and per-patient date shifts (45 CFR 164.514(c)): derived from the value
//! with HMAC-SHA-256 under a key that never leaves Strata, so they cannot be reversed or
//! recomputed without it, and the same value gets the same pseudonym wherever the key is the
//! same. A study's key is derived from the site's key and the study's name, so exports of two
//! studies cannot be linked by their pseudonyms.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key pseudonyms and date shifts are computed under.
#[derive(Clone)]
pub struct PseudonymKey {
    /// Keyed once; cloned for every value (no re-keying per value).
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymKey(..)")
    }
}

impl PseudonymKey {
    /// A key from its bytes (32 or more).
    pub fn new(key: &[u8]) -> Self {
        PseudonymKey {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length"),
        }
    }

    fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// The key of study `study`: HMAC of the study's name under this key.
    pub fn for_study(&self, study: &str) -> PseudonymKey {
        PseudonymKey::new(&self.digest(&[b"strata study key v1:", study.as_bytes()]))
    }

    /// The key of exports under profile `profile`: exports under two profiles cannot be linked
    /// by their pseudonyms (a Safe Harbor export's real years to a limited data set's shifted
    /// dates, say).
    pub fn for_profile(&self, profile: &str) -> PseudonymKey {
        PseudonymKey::new(&self.digest(&[b"strata profile key v1:", profile.as_bytes()]))
    }

    /// The pseudonym of `value` in `domain` (32 hex digits): HMAC-SHA-256 of `domain:value`,
    /// cut to 128 bits.
    pub fn pseudonym(&self, domain: &str, value: &str) -> String {
        hex::encode(&self.digest(&[domain.as_bytes(), b":", value.as_bytes()])[..16])
    }

    /// The days `patient`'s dates move by: 1 to 365, either way, never 0.
    pub fn shift_days(&self, patient: &str) -> i32 {
        let d = self.digest(&[b"date shift:", patient.as_bytes()]);
        let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        let offset = (n % 730) as i32 - 365;
        if offset >= 0 {
            offset + 1
        } else {
            offset
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_between_keys_studies_and_domains() {
        let k = PseudonymKey::new(&[7; 32]);
        let same = PseudonymKey::new(&[7; 32]);
        let other = PseudonymKey::new(&[8; 32]);
        let p = k.pseudonym("patient", "17");
        assert_eq!(p.len(), 32);
        assert_eq!(p, same.pseudonym("patient", "17"));
        assert_ne!(p, other.pseudonym("patient", "17"));
        assert_ne!(p, k.pseudonym("encounters", "17"));
        assert_ne!(p, k.for_study("a").pseudonym("patient", "17"));
        assert_ne!(
            k.for_profile("safe_harbor").pseudonym("patient", "17"),
            k.for_profile("limited_data_set").pseudonym("patient", "17")
        );
        assert_ne!(
            k.for_study("a").pseudonym("patient", "17"),
            k.for_study("b").pseudonym("patient", "17")
        );
        // The pseudonym the API wrote before studies existed: HMAC of "patient:17".
        use hmac::Mac;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&[7; 32]).unwrap();
        mac.update(b"patient:17");
        assert_eq!(p, hex::encode(&mac.finalize().into_bytes()[..16]));
    }

    #[test]
    fn shifts_are_within_a_year_never_zero_and_stable() {
        let k = PseudonymKey::new(&[1; 32]);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..5_000 {
            let s = k.shift_days(&i.to_string());
            assert!((1..=365).contains(&s.abs()), "{s}");
            assert_eq!(s, k.shift_days(&i.to_string()));
            seen.insert(s);
        }
        assert!(seen.len() > 500, "shifts spread over the range");
    }
}
