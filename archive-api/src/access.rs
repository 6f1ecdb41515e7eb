//! Who may read a patient, and on what grounds: roles, purpose of use, break-the-glass.
//!
//! A patient's archived data is read by clinicians only, each read stating a purpose of use
//! (`X-Purpose-Of-Use`, HL7 PurposeOfUse codes). A clinician's normal scope is the patients their
//! token names (the `patients` claim, or `patient` as a SMART on FHIR launch gives it). Outside
//! it, a clinician may break the glass by giving a reason (`X-Break-Glass-Reason`): the read is
//! allowed, flagged in the audit log and listed for review. Researchers never look patients up;
//! records managers, auditors and admins do not read patient data either (they see keys and
//! counts in reports and the audit log).

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use axum::http::HeaderMap;

/// Header stating the purpose of use.
pub const PURPOSE_HEADER: &str = "x-purpose-of-use";
/// Header giving the reason to break the glass.
pub const BREAK_GLASS_HEADER: &str = "x-break-glass-reason";

/// Purposes of use accepted for reading a patient's record (HL7 v3 PurposeOfUse): treatment,
/// emergency treatment, care management, coordination of care, payment, operations, a request by
/// the patient, legal, public health, records management.
pub const PURPOSES: &[&str] = &[
    "TREAT",
    "ETREAT",
    "CAREMGT",
    "COC",
    "HPAYMT",
    "HOPERAT",
    "PATRQT",
    "LEGAL",
    "PUBHLTH",
    "RECORDMGT",
];

/// The shortest reason accepted to break the glass, in characters.
const MIN_REASON_CHARS: usize = 10;
/// Reasons are kept to this many characters.
const MAX_REASON_CHARS: usize = 500;

/// On what grounds a patient read is allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientAccess {
    /// The stated purpose of use.
    pub purpose: String,
    /// The reason given, when the patient is outside the caller's care.
    pub break_glass: Option<String>,
}

/// The stated purpose, if any and valid.
pub fn stated_purpose(headers: &HeaderMap) -> Option<String> {
    let p = headers.get(PURPOSE_HEADER)?.to_str().ok()?.trim();
    PURPOSES
        .iter()
        .find(|k| k.eq_ignore_ascii_case(p))
        .map(|k| k.to_string())
}

/// The break-the-glass reason, if given (trimmed, control and invisible formatting characters
/// made spaces, cut to 500 characters). Clinicians do not all write English: the header may carry UTF-8 (or, from an
/// old client, ISO-8859-1), an RFC 8187 value (`UTF-8''Patientin%20bewusstlos`), or
/// percent-encoded UTF-8 as a browser's `encodeURIComponent` makes it (a literal `%` followed
/// by two hex digits is then written `%25`).
pub fn break_glass_reason(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(BREAK_GLASS_HEADER)?.as_bytes();
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t.to_string(),
        Err(_) => raw.iter().map(|&b| char::from(b)).collect(),
    };
    let text = match text.get(..7) {
        Some(charset) if charset.eq_ignore_ascii_case("utf-8''") => {
            percent_decoded(&text[7..]).unwrap_or(text)
        }
        _ if has_percent_escape(&text) => percent_decoded(&text).unwrap_or(text),
        _ => text,
    };
    cleaned_reason(&text)
}

/// Whether `c` is a control character or an invisible formatting one (zero-width, bidi
/// overrides and isolates, byte-order mark): text that reaches the audit log must read there
/// as what it is.
pub(crate) fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Whether `text` holds a `%` followed by two hex digits.
fn has_percent_escape(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// `text` with its percent escapes decoded, if that makes UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|t| t.into_owned())
}

/// Decides whether `principal` may read `patient`: 403 for another role, 400 without a valid
/// purpose of use, 403 outside their care without a reason (400 for a reason too short to
/// review).
pub fn patient_access(
    principal: &Principal,
    headers: &HeaderMap,
    patient: &str,
) -> Result<PatientAccess, ApiError> {
    principal.require(&[Role::Clinician])?;
    grounds(
        principal,
        stated_purpose(headers).as_deref(),
        break_glass_reason(headers),
        patient,
    )
}

/// [`patient_access`] on grounds given otherwise than in headers (the viewer keeps a
/// session's purpose and the reasons its user gave to break the glass): `purpose` one of
/// [`PURPOSES`], `reason` cleaned as [`break_glass_reason`] cleans a header's.
pub fn grounds(
    principal: &Principal,
    purpose: Option<&str>,
    reason: Option<String>,
    patient: &str,
) -> Result<PatientAccess, ApiError> {
    principal.require(&[Role::Clinician])?;
    let purpose = purpose
        .and_then(|p| PURPOSES.iter().find(|k| k.eq_ignore_ascii_case(p)))
        .map(|k| k.to_string())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state a purpose of use in X-Purpose-Of-Use, one of {}",
                PURPOSES.join(", ")
            ))
        })?;
    if principal.patients.iter().any(|p| p == patient) {
        return Ok(PatientAccess {
            purpose,
            break_glass: None,
        });
    }
    match reason {
        None => Err(ApiError::OutsideScope),
        Some(r) if r.chars().count() < MIN_REASON_CHARS => Err(ApiError::BadRequest(format!(
            "a reason to break the glass needs at least {MIN_REASON_CHARS} characters"
        ))),
        Some(r) => Ok(PatientAccess {
            purpose,
            break_glass: Some(r),
        }),
    }
}

/// A reason typed into a form, cleaned as a header's is (control and invisible formatting
/// characters made spaces, trimmed, cut to 500 characters); None when blank.
pub fn cleaned_reason(text: &str) -> Option<String> {
    let r: String = text
        .chars()
        .map(|c| if is_hidden(c) { ' ' } else { c })
        .collect();
    let r = r.trim();
    (!r.is_empty()).then(|| r.chars().take(MAX_REASON_CHARS).collect())
}

/// The shortest reason to break the glass, in characters (for forms to say).
pub const MIN_BREAK_GLASS_REASON: usize = MIN_REASON_CHARS;

#[cfg(test)]
mod tests {
    use super::*;

    fn clinician(patients: &[&str]) -> Principal {
        Principal {
            user: "dr-a".into(),
            roles: vec![Role::Clinician],
            patients: patients.iter().map(|p| p.to_string()).collect(),
            scopes: Vec::new(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn in_scope_needs_a_purpose_and_out_of_scope_a_reason() {
        let c = clinician(&["P1"]);
        let treat = headers(&[(PURPOSE_HEADER, "treat")]);
        assert_eq!(
            patient_access(&c, &treat, "P1").unwrap(),
            PatientAccess {
                purpose: "TREAT".into(),
                break_glass: None
            }
        );
        assert!(matches!(
            patient_access(&c, &HeaderMap::new(), "P1"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            patient_access(&c, &headers(&[(PURPOSE_HEADER, "CURIOSITY")]), "P1"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            patient_access(&c, &treat, "P2"),
            Err(ApiError::OutsideScope)
        ));
        let short = headers(&[(PURPOSE_HEADER, "ETREAT"), (BREAK_GLASS_HEADER, "because")]);
        assert!(matches!(
            patient_access(&c, &short, "P2"),
            Err(ApiError::BadRequest(_))
        ));
        let btg = headers(&[
            (PURPOSE_HEADER, "ETREAT"),
            (
                BREAK_GLASS_HEADER,
                "unconscious patient in the emergency department",
            ),
        ]);
        assert_eq!(
            patient_access(&c, &btg, "P2")
                .unwrap()
                .break_glass
                .as_deref(),
            Some("unconscious patient in the emergency department")
        );
    }

    #[test]
    fn reasons_in_any_language_are_read() {
        let c = clinician(&[]);
        let reason = "Patientin bewusstlos – Notaufnahme";
        let raw = |bytes: &[u8]| {
            let mut h = headers(&[(PURPOSE_HEADER, "ETREAT")]);
            h.insert(
                BREAK_GLASS_HEADER,
                axum::http::HeaderValue::from_bytes(bytes).unwrap(),
            );
            h
        };
        let given = |h: &HeaderMap| patient_access(&c, h, "P9").ok().and_then(|a| a.break_glass);
        let expected = Some(reason.to_string());
        assert_eq!(given(&raw(reason.as_bytes())), expected, "UTF-8");
        let encoded = "Patientin%20bewusstlos%20%E2%80%93%20Notaufnahme";
        assert_eq!(given(&raw(encoded.as_bytes())), expected, "percent-encoded");
        assert_eq!(
            given(&raw(format!("UTF-8''{encoded}").as_bytes())),
            expected,
            "RFC 8187"
        );
        assert_eq!(
            given(&raw(b"Bewu\xdftlos in der Notaufnahme")),
            Some(String::from("Bewußtlos in der Notaufnahme")),
            "ISO-8859-1"
        );
        assert_eq!(
            given(&raw("患者意识不清，急诊抢救中".as_bytes())),
            Some(String::from("患者意识不清，急诊抢救中"))
        );
        assert!(
            matches!(
                patient_access(&c, &raw("意识不清".as_bytes()), "P9"),
                Err(ApiError::BadRequest(_))
            ),
            "characters count, not bytes: four are too few"
        );
        assert_eq!(
            given(&raw(b"50% dose given, patient unresponsive")),
            Some(String::from("50% dose given, patient unresponsive")),
            "a percent sign alone is text"
        );
        assert_eq!(
            given(&raw("bidi \u{202E}override\u{202C} hidden".as_bytes())),
            Some(String::from("bidi  override  hidden")),
            "invisible formatting characters too"
        );
        assert_eq!(
            given(&raw(b"line%0Abreak%09and tab in the reason")),
            Some(String::from("line break and tab in the reason")),
            "control characters become spaces"
        );
    }

    #[test]
    fn other_roles_never_read_patients() {
        for role in [
            Role::Researcher,
            Role::RecordsManager,
            Role::Auditor,
            Role::Admin,
        ] {
            let p = Principal {
                user: "u".into(),
                roles: vec![role],
                patients: vec!["P1".into()],
                scopes: Vec::new(),
            };
            let h = headers(&[
                (PURPOSE_HEADER, "TREAT"),
                (
                    BREAK_GLASS_HEADER,
                    "a long enough reason to break the glass",
                ),
            ]);
            assert!(matches!(
                patient_access(&p, &h, "P1"),
                Err(ApiError::Forbidden)
            ));
        }
    }
}
