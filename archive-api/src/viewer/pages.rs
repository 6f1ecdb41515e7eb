//! What every page shares (the frame: who is signed in, the sections their roles reach, the
//! CSRF token for the sign-out form), rendering, error pages, and the start page.

use super::session::Session;
use crate::auth::Role;
use crate::error::ApiError;
use askama::Template;
use axum::extract::Extension;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

/// A link in the navigation.
pub(crate) struct Link {
    pub href: String,
    pub label: String,
    /// Whether it is the page shown.
    pub current: bool,
}

/// What the frame of a page shows.
pub(crate) struct Frame {
    pub title: String,
    /// The signed-in user, if any.
    pub user: Option<String>,
    pub roles: String,
    pub purpose: Option<String>,
    pub csrf: String,
    pub nav: Vec<Link>,
    /// Whether the user signed in with the development sign-in (a banner says so).
    pub development: bool,
}

impl Frame {
    /// The frame of a page before sign-in.
    pub fn anonymous(title: &str) -> Self {
        Frame {
            title: title.to_string(),
            user: None,
            roles: String::new(),
            purpose: None,
            csrf: String::new(),
            nav: Vec::new(),
            development: false,
        }
    }

    /// The frame of `session`'s page `title`, whose path is `here`.
    pub fn of(session: &Session, title: &str, here: &str) -> Self {
        let d = &session.data;
        let has = |roles: &[Role]| d.roles.iter().any(|r| roles.contains(r));
        let mut nav = vec![("/ui/", "Start")];
        if has(&[Role::RecordsManager]) {
            nav.push(("/ui/search", "Patient search"));
        }
        if has(&[Role::RecordsManager, Role::Admin]) {
            nav.push(("/ui/records", "Records management"));
        }
        if has(&[Role::Auditor, Role::Admin]) {
            nav.push(("/ui/audit", "Audit log"));
            nav.push(("/ui/audit/break-glass", "Break-the-glass review"));
            nav.push(("/ui/audit/disclosures", "Disclosures"));
        }
        Frame {
            title: title.to_string(),
            user: Some(d.user.clone()),
            roles: d
                .roles
                .iter()
                .map(|r| role_label(*r))
                .collect::<Vec<_>>()
                .join(", "),
            purpose: d.purpose.clone(),
            csrf: d.csrf.clone(),
            nav: nav
                .into_iter()
                .map(|(href, label)| Link {
                    href: href.to_string(),
                    label: label.to_string(),
                    current: href == here,
                })
                .collect(),
            development: d.how == "development",
        }
    }
}

/// Fails with a page saying so unless the session's user has one of `roles`.
pub(crate) fn require(session: &Session, roles: &[Role]) -> Result<(), PageError> {
    if session.data.roles.iter().any(|r| roles.contains(r)) {
        Ok(())
    } else {
        Err(ApiError::Forbidden.into())
    }
}

/// A role as people say it.
pub(crate) fn role_label(role: Role) -> &'static str {
    match role {
        Role::Clinician => "clinician",
        Role::Researcher => "researcher",
        Role::RecordsManager => "records manager",
        Role::Auditor => "auditor",
        Role::Admin => "administrator",
        Role::System => "system",
    }
}

/// A page, rendered (a template that fails to render is an internal error, logged).
pub(crate) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            PageError(ApiError::Internal(format!("a page did not render: {e}"))).into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct MessagePage<'a> {
    frame: Frame,
    heading: &'a str,
    message: &'a str,
    error: bool,
    link: Option<Link>,
}

/// A page that says one thing, with `status`.
pub(crate) fn message(status: StatusCode, heading: &str, text: &str) -> Response {
    render(
        status,
        &MessagePage {
            frame: Frame::anonymous(heading),
            heading,
            message: text,
            error: status.is_client_error() || status.is_server_error(),
            link: Some(Link {
                href: "/ui/".into(),
                label: "Back to the start".into(),
                current: false,
            }),
        },
    )
}

/// An [`ApiError`] as a page: the same status and the same message as the API gives (nothing
/// internal).
pub(crate) struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<strata_control::ControlError> for PageError {
    fn from(e: strata_control::ControlError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self.0 {
            tracing::error!(%detail, "internal error");
        }
        let status = self.0.status();
        let heading = match status {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::BAD_REQUEST => "Cannot do that",
            StatusCode::TOO_MANY_REQUESTS => "Too many requests",
            _ => "Something went wrong",
        };
        let text = match &self.0 {
            ApiError::Forbidden => "Your role does not allow this.".to_string(),
            other => {
                let t = other.to_string();
                let mut c = t.chars();
                c.next().map_or(String::new(), |f| {
                    f.to_uppercase().collect::<String>() + c.as_str()
                }) + "."
            }
        };
        message(status, heading, &text)
    }
}

#[derive(Template)]
#[template(path = "home.html")]
struct Home {
    frame: Frame,
    clinician: bool,
    patients: Vec<String>,
}

/// `GET /ui/`: the start page of the signed-in user's roles.
pub(crate) async fn home(Extension(session): Extension<Session>) -> Response {
    let clinician = session.data.roles.contains(&Role::Clinician);
    render(
        StatusCode::OK,
        &Home {
            frame: Frame::of(&session, "Start", "/ui/"),
            clinician,
            patients: session.data.patients.clone(),
        },
    )
}
