//! Limits of EnqueueMemberChanges and their checks. A violation names the field
//! (`changes[3].profile.phone`) and the rule, never the value: values are personal data.

use mall_grpc::{ServiceError, Violations};
use mall_proto::member::v1::{
    EnqueueMemberChangesRequest, EraseMemberRequest, MarketingProfile, MemberChange,
};

/// Changes per request.
pub const MAX_CHANGES: usize = 1_000;
/// Longest `request_id`, in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;
/// Longest `member_id`, in characters.
pub const MAX_MEMBER_ID_CHARS: usize = 64;
/// Longest e-mail address, in characters.
pub const MAX_EMAIL_CHARS: usize = 254;
/// Longest display name, in characters.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
/// Longest language tag, in characters.
pub const MAX_LANGUAGE_CHARS: usize = 35;
/// Longest grade, in characters.
pub const MAX_GRADE_CHARS: usize = 32;
/// Most interest tags, and the longest, in characters.
pub const MAX_INTERESTS: usize = 50;
/// Longest interest tag, in characters.
pub const MAX_INTEREST_CHARS: usize = 64;
/// Longest `tracestate`, in characters.
pub const MAX_TRACESTATE_CHARS: usize = 512;

/// Checks a whole request; every problem is reported at once.
///
/// # Errors
/// INVALID_ARGUMENT with one field violation per problem.
pub fn check_request(request: &EnqueueMemberChangesRequest) -> Result<(), ServiceError> {
    let mut violations = Violations::default();
    if request.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        violations.add(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_CHARS} characters"),
        );
    }
    match request.changes.len() {
        0 => violations.add("changes", "must hold at least one change"),
        n if n > MAX_CHANGES => violations.add(
            "changes",
            format!("holds {n} changes; at most {MAX_CHANGES} per request"),
        ),
        _ => {
            for (index, change) in request.changes.iter().enumerate() {
                check_change(change, &format!("changes[{index}]"), &mut violations);
            }
        }
    }
    violations.into_result()
}

/// Checks an EraseMember request.
///
/// # Errors
/// INVALID_ARGUMENT with one field violation per problem.
pub fn check_erasure(request: &EraseMemberRequest) -> Result<(), ServiceError> {
    let mut violations = Violations::default();
    if request.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
        violations.add(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID_CHARS} characters"),
        );
    }
    let id = request.member_id.chars().count();
    if id == 0 || id > MAX_MEMBER_ID_CHARS {
        violations.add(
            "member_id",
            format!("must be 1 to {MAX_MEMBER_ID_CHARS} characters"),
        );
    }
    if request.version == 0 || i64::try_from(request.version).is_err() {
        violations.add("version", format!("must be 1 to {}", i64::MAX));
    }
    violations.into_result()
}

fn check_change(change: &MemberChange, at: &str, violations: &mut Violations) {
    let id = change.member_id.chars().count();
    if id == 0 || id > MAX_MEMBER_ID_CHARS {
        violations.add(
            format!("{at}.member_id"),
            format!("must be 1 to {MAX_MEMBER_ID_CHARS} characters"),
        );
    } else if change.member_id.chars().any(char::is_control) {
        violations.add(
            format!("{at}.member_id"),
            "must not contain control characters",
        );
    }
    if change.version == 0 || i64::try_from(change.version).is_err() {
        violations.add(
            format!("{at}.version"),
            format!("must be 1 to {}", i64::MAX),
        );
    }
    if change.consent.is_none() {
        violations.add(format!("{at}.consent"), "is required");
    }
    if let Some(profile) = &change.profile {
        check_profile(profile, &format!("{at}.profile"), violations);
    }
    if let Some(trace) = &change.trace_context {
        if !trace.traceparent.is_empty() && !is_traceparent(&trace.traceparent) {
            violations.add(
                format!("{at}.trace_context.traceparent"),
                "must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
            );
        }
        if trace.tracestate.chars().count() > MAX_TRACESTATE_CHARS {
            violations.add(
                format!("{at}.trace_context.tracestate"),
                format!("must be at most {MAX_TRACESTATE_CHARS} characters"),
            );
        }
    }
}

fn check_profile(profile: &MarketingProfile, at: &str, violations: &mut Violations) {
    let mut at_most = |field: &str, value: &str, max: usize| {
        if value.chars().count() > max {
            violations.add(
                format!("{at}.{field}"),
                format!("must be at most {max} characters"),
            );
        }
    };
    at_most("email", &profile.email, MAX_EMAIL_CHARS);
    at_most(
        "display_name",
        &profile.display_name,
        MAX_DISPLAY_NAME_CHARS,
    );
    at_most(
        "preferred_language",
        &profile.preferred_language,
        MAX_LANGUAGE_CHARS,
    );
    at_most("grade", &profile.grade, MAX_GRADE_CHARS);
    if !profile.email.is_empty() && !is_email(&profile.email) {
        violations.add(
            format!("{at}.email"),
            "must be an e-mail address (local@domain)",
        );
    }
    if !profile.phone.is_empty() && !is_e164(&profile.phone) {
        violations.add(
            format!("{at}.phone"),
            "must be in E.164 form: '+' and 8 to 15 digits",
        );
    }
    if profile.interests.len() > MAX_INTERESTS {
        violations.add(
            format!("{at}.interests"),
            format!("must hold at most {MAX_INTERESTS} tags"),
        );
    }
    for (i, tag) in profile.interests.iter().enumerate() {
        let n = tag.chars().count();
        if n == 0 || n > MAX_INTEREST_CHARS {
            violations.add(
                format!("{at}.interests[{i}]"),
                format!("must be 1 to {MAX_INTEREST_CHARS} characters"),
            );
        }
    }
}

/// A plausible address: one `@` with something on both sides and no spaces (the partner
/// checks deliverability).
fn is_email(value: &str) -> bool {
    match value.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

fn is_e164(value: &str) -> bool {
    value.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_phones_and_traceparents() {
        assert!(is_email("kim@example.com"));
        assert!(!is_email("kim.example.com") && !is_email("@x") && !is_email("a b@x"));
        assert!(is_e164("+821012345678"));
        assert!(!is_e164("01012345678") && !is_e164("+82-10") && !is_e164("+1234567"));
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_traceparent("00-4bf9-00f0-01"));
    }
}
