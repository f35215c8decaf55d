//! Delivery state for callers: ListFailedDeliveries (keyset pages, newest first) and
//! GetMemberDeliveryState. Only ids, versions, reason codes and times: never profile data.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use mall_grpc::{ServiceError, Violations};
use mall_proto::member::v1::{
    FailedDelivery, ListFailedDeliveriesRequest, ListFailedDeliveriesResponse, MemberDeliveryState,
};
use sea_orm::{
    ColumnTrait as _, EntityTrait as _, QueryFilter as _, QueryOrder as _, QuerySelect as _,
};

use crate::{
    store::{Store, db_error, failed_deliveries, members, timestamp},
    validate::MAX_MEMBER_ID_CHARS,
};

/// Page size when the request leaves it 0.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page.
pub const MAX_PAGE_SIZE: u64 = 1_000;
/// Failures shown in a member's state.
pub const MEMBER_FAILURES: u64 = 10;

/// Lists failed deliveries; see the module docs.
///
/// # Errors
/// INVALID_ARGUMENT naming the bad field; UNAVAILABLE or INTERNAL from the database.
pub async fn list_failed(
    store: &Store,
    request: ListFailedDeliveriesRequest,
) -> Result<ListFailedDeliveriesResponse, ServiceError> {
    let mut violations = Violations::default();
    let size = match u64::try_from(request.page_size) {
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) if n <= MAX_PAGE_SIZE => n,
        _ => {
            violations.add("page_size", format!("must be 0 to {MAX_PAGE_SIZE}"));
            DEFAULT_PAGE_SIZE
        }
    };
    if request.member_id.chars().count() > MAX_MEMBER_ID_CHARS {
        violations.add(
            "member_id",
            format!("must be at most {MAX_MEMBER_ID_CHARS} characters"),
        );
    }
    let before = if request.page_token.is_empty() {
        None
    } else {
        match parse_token(&request.page_token, &request.member_id) {
            Some(seq) => Some(seq),
            None => {
                violations.add(
                    "page_token",
                    "is not a token returned by ListFailedDeliveries for this member_id; start \
                     again with an empty page_token",
                );
                None
            }
        }
    };
    violations.into_result()?;
    use failed_deliveries::Column as C;
    let mut query = failed_deliveries::Entity::find();
    if !request.member_id.is_empty() {
        query = query.filter(C::MemberId.eq(request.member_id.as_str()));
    }
    if let Some(seq) = before {
        query = query.filter(C::Seq.lt(seq));
    }
    // One more than the page, to know whether another page follows.
    let mut rows = query
        .order_by_desc(C::Seq)
        .limit(size + 1)
        .all(store.db())
        .await
        .map_err(|e| db_error(e, "list failed deliveries"))?;
    let more = rows.len() as u64 > size;
    rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
    let next_page_token = match (more, rows.last()) {
        (true, Some(last)) => token(last.seq, &request.member_id),
        _ => String::new(),
    };
    Ok(ListFailedDeliveriesResponse {
        failed_deliveries: rows.into_iter().map(failed).collect(),
        next_page_token,
    })
}

/// A member's delivery state; see the module docs.
///
/// # Errors
/// INVALID_ARGUMENT for a bad `member_id`; NOT_FOUND for a member never recorded;
/// UNAVAILABLE or INTERNAL from the database.
pub async fn member_state(
    store: &Store,
    member_id: &str,
) -> Result<MemberDeliveryState, ServiceError> {
    let n = member_id.chars().count();
    if n == 0 || n > MAX_MEMBER_ID_CHARS {
        return Err(ServiceError::invalid(
            "member_id",
            format!("must be 1 to {MAX_MEMBER_ID_CHARS} characters"),
        ));
    }
    let row = members::Entity::find_by_id(member_id.to_owned())
        .one(store.db())
        .await
        .map_err(|e| db_error(e, "read a member"))?
        .ok_or_else(|| ServiceError::NotFound {
            resource: "member",
            name: member_id.to_owned(),
        })?;
    use failed_deliveries::Column as C;
    let failures = failed_deliveries::Entity::find()
        .filter(C::MemberId.eq(member_id))
        .order_by_desc(C::Seq)
        .limit(MEMBER_FAILURES)
        .all(store.db())
        .await
        .map_err(|e| db_error(e, "read a member's failed deliveries"))?;
    let version = |v: i64| u64::try_from(v).unwrap_or_default();
    Ok(MemberDeliveryState {
        member_id: row.member_id.clone(),
        version: version(row.version),
        delivered_version: version(row.delivered_version),
        pending: row.queued_version > row.delivered_version,
        consented: row.consent_email || row.consent_sms || row.consent_push,
        failures: failures.into_iter().map(failed).collect(),
    })
}

fn failed(row: failed_deliveries::Model) -> FailedDelivery {
    FailedDelivery {
        member_id: row.member_id,
        version: u64::try_from(row.version).unwrap_or_default(),
        reason: row.reason,
        fail_time: Some(timestamp(row.fail_time)),
    }
}

/// `f1|<seq>|<member filter>`, base64: continues below `seq` under the same filter.
fn token(seq: i64, member_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("f1|{seq}|{member_id}"))
}

fn parse_token(token: &str, member_id: &str) -> Option<i64> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let (seq, filter) = text.strip_prefix("f1|")?.split_once('|')?;
    (filter == member_id).then_some(())?;
    seq.parse().ok().filter(|seq| *seq > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_continues_only_under_its_own_filter() {
        let page = token(42, "M-1");
        assert_eq!(parse_token(&page, "M-1"), Some(42));
        assert_eq!(parse_token(&page, ""), None);
        assert_eq!(parse_token("not a token", "M-1"), None);
    }
}
