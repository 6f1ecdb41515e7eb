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

/// The break-the-glass reason, if given (trimmed, cut to 500 characters).
pub fn break_glass_reason(headers: &HeaderMap) -> Option<String> {
    let r = headers.get(BREAK_GLASS_HEADER)?.to_str().ok()?.trim();
    (!r.is_empty()).then(|| r.chars().take(MAX_REASON_CHARS).collect())
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
    let purpose = stated_purpose(headers).ok_or_else(|| {
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
    match break_glass_reason(headers) {
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
