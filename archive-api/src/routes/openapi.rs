//! The OpenAPI document: every operation, the schemas of bodies and refusals, the bearer
//! scheme. Served at `/openapi.json` and kept in `docs/openapi.json`.

use super::clinical::History;
use super::records::{DestructionDecision, NewHold, Release};
use super::{auditor, clinical, operations, records};
use crate::exports::routes as export_routes;
use crate::exports::ExportRequest;
use crate::history::HistoryRecord;
use serde::Serialize;

/// Purposes of use accepted for reading a patient (HL7 v3 PurposeOfUse; see
/// [`crate::access::PURPOSES`]). For the OpenAPI document only.
#[derive(utoipa::ToSchema)]
#[allow(clippy::upper_case_acronyms, dead_code)]
pub(crate) enum PurposeOfUse {
    TREAT,
    ETREAT,
    CAREMGT,
    COC,
    HPAYMT,
    HOPERAT,
    PATRQT,
    LEGAL,
    PUBHLTH,
    RECORDMGT,
}

/// The refusals every `/v1` operation may answer with (for the OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum Refusals {
    /// No valid bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The role or the scope does not allow it.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The caller's rate limit is spent (see Retry-After).
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// The audit log cannot record the request, so it is not served.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// An error as clients see it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong (never paths, keys, SQL or internal detail).
    pub error: String,
}

/// Adds the bearer-token scheme.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
    }
}

/// The API's OpenAPI document (served at `/openapi.json`, kept in `docs/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Strata archive API", version = "1",
        description = "Read-only access to the encrypted archive: patient history and documents for clinicians, policies, holds and reports for records managers, the audit log for auditors, de-identified exports for researchers (Parquet, and FHIR Bulk Data with SMART Backend Services for system clients). Every /v1 and /fhir request is authenticated, authorized and audited."),
    paths(clinical::history, clinical::document, auditor::disclosures, auditor::audit_list,
        auditor::audit_verify, records::policies, records::plan, records::holds,
        records::place_hold, records::release_hold, records::last_run_report,
        records::destruction_report, records::destruction_requests,
        records::decide_destruction, records::verification_reports, export_routes::start_export,
        export_routes::export_status, export_routes::export_file, export_routes::create_group,
        export_routes::list_groups, crate::bulk::export_system, crate::bulk::export_patients,
        crate::bulk::export_group, crate::bulk::status, crate::bulk::cancel, crate::bulk::file,
        crate::smart::configuration, crate::smart::token, operations::healthz,
        operations::readyz, operations::metrics, operations::openapi_json),
    components(schemas(ErrorBody, PurposeOfUse, ExportRequest, History, HistoryRecord, crate::history::DocumentLink, NewHold, Release, DestructionDecision)),
    modifiers(&BearerScheme),
    security(("bearer" = []))
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_purposes_are_the_accepted_ones() {
        let doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["PurposeOfUse"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(listed, crate::access::PURPOSES);
    }
}
